"""The real ``plugtune`` command, run as a subprocess: exit codes, one ``error:`` line per
problem on stderr, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
TICKETS = REPO / "recipes" / "data" / "support_tickets.csv"


def plugtune(*args: str | Path, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PLUGTUNE_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", COLUMNS="1000", NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "plugtune.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr without plugin-loading warnings (an installed third-party plugin may be broken;
    that is reported as ``warning: ...`` and is not what these tests are about)."""
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]


def quickstart_raw(**changes) -> dict:
    raw = yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))
    raw["data"]["options"]["path"] = str(TICKETS)
    raw.update(changes)
    return raw


def write(folder: Path, raw: dict | str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def bad_unknown_plugin(tmp: Path) -> tuple[Path, str]:
    return write(tmp, quickstart_raw(method={"name": "loar"})), \
        "method.name: unknown tuning method 'loar'; did you mean 'lora'? (installed: "


def bad_option_type(tmp: Path) -> tuple[Path, str]:
    return write(tmp, quickstart_raw(method={"name": "lora", "options": {"r": "eight"}})), \
        "method.options.r: Input should be a valid integer, unable to parse string as an integer (got 'eight')"


def bad_missing_data_file(tmp: Path) -> tuple[Path, str]:
    raw = quickstart_raw()
    raw["data"]["options"]["path"] = "data/nope.csv"
    return write(tmp, raw), f"data.options.path: file not found: {tmp / 'data' / 'nope.csv'}"


def bad_missing_column(tmp: Path) -> tuple[Path, str]:
    raw = quickstart_raw()
    raw["task"]["prompt"] = "Route: {txet}\nDepartment:"
    return write(tmp, raw), "task.prompt: column 'txet' is not in the data; did you mean 'text'? (columns: text, label)"


def bad_malformed_yaml(tmp: Path) -> tuple[Path, str]:
    return write(tmp, "name: x\n  base_model: y\n"), "malformed YAML: line 2, column 13: mapping values are not allowed here"


def bad_nonexistent(tmp: Path) -> tuple[Path, str | None]:
    return tmp / "nope.yaml", None  # the message is "recipe file not found: PATH", without the PATH prefix


BAD = {
    "unknown-plugin": bad_unknown_plugin,
    "option-type": bad_option_type,
    "missing-data-file": bad_missing_data_file,
    "missing-column": bad_missing_column,
    "malformed-yaml": bad_malformed_yaml,
    "nonexistent-recipe": bad_nonexistent,
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, dict]]:
    """Run the cheap CLI calls concurrently (each pays for the interpreter start and the plugin
    imports); tests then check one result each."""
    tmp = tmp_path_factory.mktemp("cli")
    jobs: dict[str, tuple[list, dict]] = {
        "help": (["--help"], {}),
        "validate-ok": (["validate", "recipes/quickstart.yaml"], {}),
        "validate-override": (["validate", "recipes/quickstart.yaml", "training.batch_size=0"], {}),
    }
    for key, make_bad in BAD.items():
        folder = tmp / key
        folder.mkdir()
        path, problem = make_bad(folder)
        jobs[f"bad:{key}"] = (["validate", path], {"path": path, "problem": problem})
    several = write(tmp, quickstart_raw(method={"name": "loar"}, training={"batch_size": -1}), "several.yaml")
    jobs["several"] = (["validate", several], {"path": several})
    empty = tmp / "no-adapters"
    empty.mkdir()
    jobs["adapters"] = (["adapters", empty], {"dir": empty})
    with ThreadPoolExecutor(max_workers=min(4, max(2, os.cpu_count() or 2))) as pool:
        futures = {key: pool.submit(plugtune, *args) for key, (args, _) in jobs.items()}
    return {key: (futures[key].result(), info) for key, (_, info) in jobs.items()}


def test_help(cli) -> None:
    result, _ = cli["help"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: plugtune")
    for command in ("run", "validate", "plugins", "adapters", "eval", "generate", "classify", "fetch"):
        assert f"    {command} " in result.stdout


def test_validate_quickstart(cli) -> None:
    result, _ = cli["validate-ok"]
    assert result.returncode == 0, result.stderr
    assert error_lines(result) == []
    assert result.stdout.startswith("ok recipes/quickstart.yaml: quickstart")
    assert "lora on smollm2-135m" in result.stdout


def test_validate_with_override(cli) -> None:
    result, _ = cli["validate-override"]
    assert result.returncode == 2
    assert error_lines(result) == [
        "error: recipes/quickstart.yaml: training.batch_size: Input should be greater than 0 (got 0)"
    ]


@pytest.mark.parametrize("key", list(BAD))
def test_validate_bad_recipe(cli, key: str) -> None:
    result, info = cli[f"bad:{key}"]
    path, problem = info["path"], info["problem"]
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    expected = f"error: recipe file not found: {path}" if problem is None else f"error: {path}: {problem}"
    assert lines[0].startswith(expected), (lines[0], expected)
    assert result.stdout == ""


def test_validate_several_problems(cli) -> None:
    result, info = cli["several"]
    assert result.returncode == 2
    lines = error_lines(result)
    assert lines[0] == f"error: {info['path']}: 2 problems"
    assert len(lines) == 3, lines
    assert lines[1] == "  - training.batch_size: Input should be greater than 0 (got -1)"
    assert lines[2].startswith("  - method.name: unknown tuning method 'loar'; did you mean 'lora'?")


def test_adapters_empty_dir(cli) -> None:
    result, info = cli["adapters"]
    assert result.returncode == 0, result.stderr
    assert error_lines(result) == []
    assert result.stdout.strip() == f"no adapters under {info['dir']}"


def test_run_refuses_existing_output(make_recipe, tmp_path: Path) -> None:
    out = tmp_path / "existing-run"
    path = make_recipe(output={"dir": str(out)})
    out.mkdir()
    previous = {
        "plugtune.json": b'{"name": "earlier"}\n',
        "adapter_model.safetensors": bytes(range(256)) * 4,
        "metrics.jsonl": b'{"step": 1, "loss": 2.5}\n',
    }
    for name, data in previous.items():
        (out / name).write_bytes(data)
    result = plugtune("run", path, "--quiet")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # `run` imports the training stack, whose libraries may log to stderr (bitsandbytes does on
    # CPU); what matters is the one error line.
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: output.dir: {out} already holds a run; pass --overwrite")
    assert "--overwrite" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
