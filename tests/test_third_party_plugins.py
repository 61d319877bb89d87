"""Third-party plugins installed as real distributions, driven through the real CLI.

A module-scoped fixture pip-installs three distributions (no dependencies, no build isolation,
so no network) into a folder of its own (``--target``) that the CLI processes of these tests
find on their ``PYTHONPATH``; the shared environment is never touched, so no other test, on
any xdist worker, sees them come or go:

* ``examples/plugtune-example-plugin``: the ``mean_length`` evaluator and a step logger;
* ``tests/fixtures/broken_plugin``: raises at import time;
* ``tests/fixtures/dup_plugin``: registers ``accuracy`` again, plus ``dup_only``.

All three are installed at once (entry points are global to a process's path), and each test
picks the set it needs with ``PLUGTUNE_DISABLE_PLUGINS``. Every CLI call is a subprocess, so
each sees a freshly built registry.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from installs import install_into, installed_here, process_env
from plugtune.testing import recipe_dict

REPO = Path(__file__).resolve().parents[1]
SOURCES = {
    "plugtune-example-plugin": REPO / "examples" / "plugtune-example-plugin",
    "plugtune-broken-plugin": REPO / "tests" / "fixtures" / "broken_plugin",
    "plugtune-dup-plugin": REPO / "tests" / "fixtures" / "dup_plugin",
}
ENTRY_POINTS = {"plugtune-example-plugin": "example", "plugtune-broken-plugin": "broken", "plugtune-dup-plugin": "dup"}
BROKEN_WARNING = "plugin 'broken' (distribution plugtune-broken-plugin 0.1.0) failed to import: RuntimeError: boom at import"


SITE = Path()  # where installed_plugins put the distributions, for the length of this module


@pytest.fixture(scope="module", autouse=True)
def installed_plugins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Install the three plugin distributions for this module into a folder of their own,
    :data:`SITE` (tests/installs.py; :func:`cli` gives it to every process as ``PYTHONPATH``).
    One installed in the venv already gets no second copy."""
    global SITE
    SITE = install_into(tmp_path_factory.mktemp("plugins"), *(SOURCES[dist] for dist in SOURCES if not installed_here(dist)))
    yield
    SITE = Path()


def cli(*args: str, cwd: Path, enable: tuple[str, ...] = (), env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``plugtune ARGS`` with only the test distributions in ``enable`` active."""
    full = process_env(SITE, drop=("PLUGTUNE_EXAMPLE_LOG",), COLUMNS="200")
    disabled = [ENTRY_POINTS[d] for d in SOURCES if d not in enable]
    if disabled:
        full["PLUGTUNE_DISABLE_PLUGINS"] = ",".join(disabled)
    full.update(env or {})
    # cwd is a scratch folder: `python -m` puts it first on sys.path, and the repository root
    # holds a plugtune.egg-info that would otherwise be read as a second copy of plugtune.
    return subprocess.run([sys.executable, "-m", "plugtune.cli", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=600)


def plugins_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in report["plugins"]}


def write_recipe(tmp_path: Path, base: Path, data: Path, **sections: Any) -> Path:
    recipe = recipe_dict(base, data, output={"dir": str(tmp_path / "adapter")}, **sections)
    recipe["training"]["max_steps"] = 2
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path





# -- the example plugin -----------------------------------------------------------------------


def test_plugins_json_lists_the_example_plugin(tmp_path: Path) -> None:
    report = plugins_json(cli("plugins", "--json", cwd=tmp_path, enable=("plugtune-example-plugin",)))
    assert report["problems"] == []
    rows = by_name(report)
    example = rows["example"]
    assert example["distribution"] == "plugtune-example-plugin"
    assert example["version"] == "0.1.0"
    assert example["module"] == "plugtune_example.plugin"
    assert example["builtin"] is False
    assert example["components"] == {"evaluator": ["mean_length"]}
    assert rows["classification_metrics"]["distribution"] == "plugtune"


def test_run_with_the_example_evaluator_and_step_logger(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_llama, tiny_data, evaluators=["accuracy", "loss", "mean_length"])
    log = tmp_path / "steps.jsonl"
    result = cli("run", str(recipe), "--quiet", cwd=tmp_path, enable=("plugtune-example-plugin",),
                 env={"PLUGTUNE_EXAMPLE_LOG": str(log)})
    assert result.returncode == 0, result.stderr
    assert "warning: plugin" not in result.stderr

    manifest = json.loads((tmp_path / "adapter" / "plugtune.json").read_text())
    after = manifest["metrics"]["after"]
    assert {"accuracy", "loss", "mean_length"} <= set(after)
    assert after["mean_length"] >= 1.0
    assert manifest["metrics"]["before"]["mean_length"] == after["mean_length"]  # same references

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(isinstance(line["loss"], float) and line["loss"] > 0 for line in lines)


def test_recipe_naming_mean_length_needs_the_plugin(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_llama, tiny_data, evaluators=["mean_length"])
    result = cli("validate", str(recipe), cwd=tmp_path, enable=("plugtune-example-plugin",))
    assert result.returncode == 0, result.stderr
    assert "mean_length" in result.stdout
    # and with the plugin disabled, the recipe names an unknown evaluator
    result = cli("validate", str(recipe), cwd=tmp_path)
    assert result.returncode != 0
    assert "unknown evaluator 'mean_length'" in result.stderr
    assert "Traceback" not in result.stderr


# -- a plugin that fails at import ------------------------------------------------------------


def test_broken_plugin_warns_and_the_cli_keeps_working(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    enable = ("plugtune-broken-plugin",)
    result = cli("--help", cwd=tmp_path, enable=enable)
    assert result.returncode == 0, result.stderr
    assert "usage: plugtune" in result.stdout
    assert "Traceback" not in result.stderr  # --help does not load plugins at all

    recipe = write_recipe(tmp_path, tiny_llama, tiny_data)
    runs = {name: cli(*args, cwd=tmp_path, enable=enable) for name, args in
            {"table": ("plugins",), "json": ("plugins", "--json"), "validate": ("validate", str(recipe))}.items()}
    for name, result in runs.items():
        assert result.returncode == 0, (name, result.stderr)
        assert "Traceback" not in result.stderr
        warnings = [line for line in result.stderr.splitlines() if "boom at import" in line]
        assert warnings == [f"warning: {BROKEN_WARNING}"], (name, result.stderr)
    report = plugins_json(runs["json"])
    assert report["problems"] == [BROKEN_WARNING]
    assert "broken" not in by_name(report) and "lora" in by_name(report)
    assert "lora" in runs["table"].stdout
    assert runs["validate"].stdout.startswith("ok ")


def test_broken_plugin_is_an_error_in_strict_mode(tmp_path: Path) -> None:
    result = cli("plugins", cwd=tmp_path, enable=("plugtune-broken-plugin",), env={"PLUGTUNE_STRICT_PLUGINS": "1"})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {BROKEN_WARNING} (PLUGTUNE_STRICT_PLUGINS=1)"


@pytest.mark.parametrize("name", ["broken", "plugtune-broken-plugin"])
def test_disabled_broken_plugin_gives_no_warning(tmp_path: Path, name: str) -> None:
    # everything installed, the duplicate plugin off as well so that nothing else warns
    result = cli("plugins", "--json", cwd=tmp_path, enable=tuple(SOURCES),
                 env={"PLUGTUNE_DISABLE_PLUGINS": f"{name},dup", "PLUGTUNE_STRICT_PLUGINS": "1"})
    report = plugins_json(result)
    assert result.stderr == ""
    assert report["problems"] == []
    assert "broken" not in by_name(report) and "example" in by_name(report)


# -- a plugin that duplicates a built-in name -------------------------------------------------


def test_duplicate_plugin_warns_and_the_builtin_wins(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    result = cli("plugins", "--json", cwd=tmp_path, enable=("plugtune-dup-plugin",))
    report = plugins_json(result)
    (problem,) = report["problems"]
    assert "distribution plugtune-dup-plugin" in problem
    assert "'classification_metrics' (distribution plugtune " in problem
    assert "evaluator 'accuracy'" in problem
    assert [line for line in result.stderr.splitlines() if line.startswith("warning:")] == [f"warning: {problem}"]

    rows = by_name(report)
    assert rows["dup"]["distribution"] == "plugtune-dup-plugin"
    assert rows["dup"]["components"] == {"evaluator": ["dup_only"]}
    assert "accuracy" in rows["classification_metrics"]["components"]["evaluator"]

    recipe = write_recipe(tmp_path, tiny_llama, tiny_data, evaluators=["accuracy", "dup_only"])
    result = cli("validate", str(recipe), cwd=tmp_path, enable=("plugtune-dup-plugin",))
    assert result.returncode == 0, result.stderr
    assert "dup_only" in result.stdout
