"""The hostile-input catalog: one test per way a recipe, a data file, an adapter or a plugin
can be broken, each driven through the real command (``plugtune.cli.main``), each asserting
the exact error line, a non-zero exit, no traceback, and that nothing was written or lost
(every file under the test's folder is byte-identical before and after).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tracemalloc
from pathlib import Path

import plugtune
import pytest
import torch
import yaml
from plugtune.artifacts.adapters import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE
from plugtune.cli import main
from plugtune.kernel.registry import build_plugin_system, get_plugin_system, set_plugin_system
from plugtune.testing import recipe_dict

# -- helpers ----------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes (FIFOs, sockets and links to devices are
    listed, never read)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or not p.exists():
            out[str(p.relative_to(root))] = os.readlink(p).encode() if p.is_symlink() else b"?"
        elif p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
        elif not p.is_dir():
            out[str(p.relative_to(root))] = b"<special>"
    return out


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, list[str]]:
    """Run the command in-process; returns the exit code and stderr's ``error:`` lines (and
    their continuation lines), after checking there is no traceback."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("error: ")), len(lines))
    return code, lines[first:]


def refused(capsys, root: Path, *args: object) -> tuple[int, list[str]]:
    """``cli`` plus: exit code non-zero and nothing under ``root`` written, changed or removed."""
    before = snapshot(root)
    code, lines = cli(capsys, *args)
    assert code != 0, lines
    assert lines, "no error line"
    assert snapshot(root) == before
    return code, lines


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def tiny_raw(tiny_llama: Path, tiny_data: Path, tmp_path: Path, **sections) -> dict:
    raw = recipe_dict(tiny_llama, tiny_data, **sections)
    raw.setdefault("output", {"dir": str(tmp_path / "out")})
    return raw


def run_refused(capsys, tmp_path: Path, raw: dict) -> tuple[Path, int, list[str]]:
    """Write ``raw`` as ``tmp_path/recipe.yaml`` and ``plugtune run`` it, with ``refused``'s
    checks; returns the recipe's path (error lines name it), the exit code and the lines."""
    path = write_yaml(tmp_path / "recipe.yaml", raw)
    code, lines = refused(capsys, tmp_path, "run", path, "--quiet")
    return path, code, lines


def installed(kind: str) -> str:
    return ", ".join(get_plugin_system().names(kind))


# -- recipes ----------------------------------------------------------------------------------


def test_recipe_malformed_yaml(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("name: x\n  base_model: y\n")
    code, lines = refused(capsys, tmp_path, "run", path, "--quiet")
    assert code == 2
    assert lines == [f"error: {path}: malformed YAML: line 2, column 13: mapping values are not allowed here"]


def test_recipe_unknown_key(tmp_path, tiny_llama, tiny_data, capsys):
    raw = tiny_raw(tiny_llama, tiny_data, tmp_path)
    raw["training"]["batchsize"] = 4
    path, code, lines = run_refused(capsys, tmp_path, raw)
    assert code == 2
    assert lines == [f"error: {path}: training.batchsize: unknown key; did you mean 'batch_size'?"]


def test_recipe_unknown_plugin_name(tmp_path, tiny_llama, tiny_data, capsys):
    raw = tiny_raw(tiny_llama, tiny_data, tmp_path, regularizers=[{"name": "wieght_decay"}])
    path, code, lines = run_refused(capsys, tmp_path, raw)
    assert code == 2
    assert lines == [(f"error: {path}: regularizers[0].name: unknown regularizer 'wieght_decay'; "
                     f"did you mean 'weight_decay'? (installed: {installed('regularizer')})")]


def test_recipe_wrong_types(tmp_path, tiny_llama, tiny_data, capsys):
    raw = tiny_raw(tiny_llama, tiny_data, tmp_path)
    raw["training"]["eval_before"] = "maybe"
    raw["method"]["options"]["alpha"] = [16]
    path, code, lines = run_refused(capsys, tmp_path, raw)
    assert code == 2
    assert lines == [
        f"error: {path}: 2 problems",
        "  - training.eval_before: Input should be a valid boolean, unable to interpret input (got 'maybe')",
        "  - method.options.alpha: Input should be a valid number",
    ]


def test_recipe_negative_and_zero_sizes(tmp_path, tiny_llama, tiny_data, capsys):
    raw = tiny_raw(tiny_llama, tiny_data, tmp_path)
    raw["training"].update(batch_size=0, max_length=-5, checkpoint_every=-1)
    raw["method"]["options"]["r"] = 0
    path, code, lines = run_refused(capsys, tmp_path, raw)
    assert code == 2
    assert lines == [
        f"error: {path}: 4 problems",
        "  - training.batch_size: Input should be greater than 0 (got 0)",
        "  - training.max_length: Input should be greater than 0 (got -5)",
        "  - training.checkpoint_every: Input should be greater than or equal to 0 (got -1)",
        "  - method.options.r: Input should be greater than 0 (got 0)",
    ]


def test_recipe_learning_rate_as_text(tmp_path, tiny_llama, tiny_data, capsys):
    raw = tiny_raw(tiny_llama, tiny_data, tmp_path)
    raw["training"]["learning_rate"] = "fast"
    path, code, lines = run_refused(capsys, tmp_path, raw)
    assert code == 2
    assert lines == [(f"error: {path}: training.learning_rate: Input should be a finite number above 0 such as 1e-3, "
                     f"or auto (got 'fast')")]


def test_recipe_broken_template(tmp_path, tiny_llama, tiny_data, capsys):
    raw = tiny_raw(tiny_llama, tiny_data, tmp_path)
    raw["task"]["prompt"] = "Question: {question"
    path, code, lines = run_refused(capsys, tmp_path, raw)
    assert code == 2
    assert lines == [(f"error: {path}: task.prompt: not a valid template (expected '}}' before end of string); "
                      "write a literal brace as {{ or }}, and name columns as {column}")]


def test_recipe_output_dir_holds_another_run(tmp_path, tiny_llama, tiny_data, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_FILE).write_text('{"name": "earlier"}')
    (out / WEIGHTS_FILE).write_bytes(bytes(range(256)))
    (out / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')
    path, code, lines = run_refused(capsys, tmp_path, tiny_raw(tiny_llama, tiny_data, tmp_path))
    assert code == 2
    assert lines == [f"error: output.dir: {out} already holds a run; pass --overwrite or set output.overwrite: true"]


def test_recipe_output_dir_unwritable(tmp_path, tiny_llama, tiny_data, capsys):
    # Tests may run as root, who may write anywhere: a regular file where a folder must be
    # is unwritable for everyone.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file")
    out = blocker / "adapters" / "tiny"
    path, code, lines = run_refused(capsys, tmp_path, tiny_raw(tiny_llama, tiny_data, tmp_path, output={"dir": str(out)}))
    assert code == 2
    assert lines == [f"error: output.dir: cannot write to {out} ({blocker} is not a folder)"]


# -- data -------------------------------------------------------------------------------------


def table_recipe(tmp_path: Path, tiny_llama: Path, tiny_data: Path, train: str, test: str | None = None,
                 classification: bool = False, **training) -> Path:
    raw = recipe_dict(tiny_llama, tiny_data, classification=classification)
    raw["data"]["options"] = {"path": train, **({"test_path": test} if test else {})}
    raw["training"].update(training)
    raw["output"] = {"dir": str(tmp_path / "out")}
    return write_yaml(tmp_path / "recipe.yaml", raw)


def test_data_missing_file(tmp_path, tiny_bert, tiny_data, capsys):
    path = table_recipe(tmp_path, tiny_bert, tiny_data, "data/nope.csv", classification=True)
    code, lines = refused(capsys, tmp_path, "run", path, "--quiet")
    assert code == 2
    assert lines == [(f"error: {path}: data.options.path: file not found: {tmp_path / 'data' / 'nope.csv'} "
                     f"(paths are relative to the recipe's folder)")]


def test_data_empty_file(tmp_path, tiny_bert, tiny_data, capsys):
    (tmp_path / "empty.csv").write_text("")
    path = table_recipe(tmp_path, tiny_bert, tiny_data, "empty.csv", classification=True)
    code, lines = refused(capsys, tmp_path, "run", path, "--quiet")
    assert code == 2
    assert lines == [f"error: {path}: data.options: {tmp_path / 'empty.csv'}: the file is empty"]


def test_data_missing_columns(tmp_path, tiny_bert, tiny_data, capsys):
    (tmp_path / "data.csv").write_text("sentence,label\nthe film was great,positive\nawful,negative\n")
    path = table_recipe(tmp_path, tiny_bert, tiny_data, "data.csv", classification=True)
    code, lines = refused(capsys, tmp_path, "run", path, "--quiet")
    assert code == 2
    assert lines == [(f"error: {path}: task.text: column 'text' is not in the data (columns: sentence, label); "
                     f"rename it with data.options.columns")]


def test_data_non_utf8_bytes_name_the_file_line_and_byte(tmp_path, tiny_bert, tiny_data, capsys):
    # The bad byte sits past the first 64 KB, which validation reads: loading finds it, line by line.
    good = "".join(f"the film was great {i % 10},positive\n" for i in range(3000))
    data = ("text,label\n" + good).encode() + "caf\xe9 dull,negative\n".encode("latin-1")
    (tmp_path / "data.csv").write_bytes(data)
    offset = data.index(b"\xe9")
    path = table_recipe(tmp_path, tiny_bert, tiny_data, "data.csv", classification=True)
    code, lines = refused(capsys, tmp_path, "run", path, "--quiet")
    assert code == 3
    assert lines == [f"error: {tmp_path / 'data.csv'}: not UTF-8 text (byte {offset}, line 3002); re-save it as UTF-8"]


def test_data_empty_strings(tmp_path, tiny_bert, tiny_data, capsys):
    rows = ["text,label"] + [f"the film was great {i},positive" for i in range(8)] + [",negative", "   ,negative"]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.csv").write_text("text,label\nthe film,positive\n")
    path = table_recipe(tmp_path, tiny_bert, tiny_data, "train.csv", "test.csv", classification=True)
    code, lines = refused(capsys, tmp_path, "run", path, "--quiet")
    assert code == 3
    assert lines == [('error: train split: 2 row(s) have an empty \'text\' (first: {"text": "", "label": "negative"}); '
                     "fill them in or remove them")]


def test_data_test_labels_never_seen_in_training(tmp_path, tiny_bert, tiny_data, capsys):
    (tmp_path / "train.csv").write_text("text,label\nthe film was great,positive\nthe film was awful,negative\n")
    (tmp_path / "test.csv").write_text("text,label\nthe film,positive\nthe film was a film,neutral\n")
    path = table_recipe(tmp_path, tiny_bert, tiny_data, "train.csv", "test.csv", classification=True)
    code, lines = refused(capsys, tmp_path, "run", path, "--quiet")
    assert code == 3
    assert lines == ["error: test row 2: label 'neutral' never appears in the training data (labels: negative, positive)"]


def long_rows(tmp_path: Path) -> None:
    long_text = " ".join(["the film was great"] * 50)  # 200 words: longer than the tiny BERT's 128 positions
    rows = ["text,label"] + [f"the film was great {i},positive" for i in range(6)] + [f"{long_text},negative"] * 2
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.csv").write_text("text,label\nthe film,positive\nawful film,negative\n")


def test_data_rows_longer_than_the_model_context_refused(tmp_path, tiny_bert, tiny_data, capsys):
    long_rows(tmp_path)
    path = table_recipe(tmp_path, tiny_bert, tiny_data, "train.csv", "test.csv", classification=True,
                        max_length=512, overlong="refuse")
    code, lines = refused(capsys, tmp_path, "run", path, "--quiet")
    assert code == 3
    assert lines == [("error: train split: 2 row(s) are longer than 128 tokens (the longest: 202); "
                     "raise training.max_length, or set training.overlong to truncate or drop")]


def test_data_rows_longer_than_the_model_context_refused_again_from_the_cache(tmp_path, tmp_path_factory, tiny_bert,
                                                                               tiny_data, capsys, monkeypatch):
    """The refusal is part of the cached split: a rerun tokenizes nothing and refuses with
    the same line, exit code and nothing written."""
    from plugtune.plugins.tasks.sequence_classification import SequenceClassification

    home = tmp_path_factory.mktemp("home")  # outside the folder that must stay unchanged
    monkeypatch.setenv("PLUGTUNE_HOME", str(home))
    encodes = []
    real = SequenceClassification.encode
    monkeypatch.setattr(SequenceClassification, "encode", lambda *a, **k: encodes.append(1) or real(*a, **k))
    long_rows(tmp_path)
    path = table_recipe(tmp_path, tiny_bert, tiny_data, "train.csv", "test.csv", classification=True,
                        max_length=512, overlong="refuse")
    expected = [("error: train split: 2 row(s) are longer than 128 tokens (the longest: 202); "
                 "raise training.max_length, or set training.overlong to truncate or drop")]
    for tokenized in (8, 0):  # the train split's rows, then none: the cache hit
        encodes.clear()
        code, lines = refused(capsys, tmp_path, "run", path, "--quiet")
        assert (code, lines, len(encodes)) == (3, expected, tokenized)
    assert len(list((home / "tokenized").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_data_rows_longer_than_the_model_context_truncated_or_dropped_with_a_count(
        tmp_path, tiny_bert, tiny_data, capsys, policy):
    long_rows(tmp_path)
    path = table_recipe(tmp_path, tiny_bert, tiny_data, "train.csv", "test.csv", classification=True,
                        max_length=512, overlong=policy, max_steps=2, eval_before=False)
    capsys.readouterr()
    assert main(["run", str(path), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "training.max_length=512 is longer than the model's context (128); using 128" in err
    if policy == "drop":
        assert "dropped 2 train row(s) longer than 128 tokens (training.overlong: drop)" in err
        assert json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())["training"]["train_rows"] == 6
    else:
        assert "2 train and 0 test rows exceed max_length=128 and were truncated or dropped" in err
        assert json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())["training"]["train_rows"] == 8


def test_data_100mb_file_is_streamed(tmp_path):
    """Loading a ~100 MB TSV holds the rows it returns and little else: no second copy of the
    file (a whole-file read, an Arrow cache) at any point. tracemalloc's peak during the load
    minus what the rows hold afterwards must stay under 10% of the file's size."""
    from plugtune.plugins.loaders.table import TableLoader, TableOptions

    lines = [" ".join(f"word{(i * 7 + j) % 97}" for j in range(180)) + ("\tpos\n" if i % 2 else "\tneg\n") for i in range(64)]
    block = "".join(lines).encode()
    path = tmp_path / "big.tsv"
    with open(path, "wb") as fh:
        fh.write(b"text\tlabel\n")
        fh.writelines(block for _ in range(100_000_000 // len(block) + 1))
    size = path.stat().st_size
    table = TableLoader(TableOptions.model_validate({"path": str(path), "test_path": str(path)}))
    table.options.test_path = None  # one file, split in memory
    tracemalloc.start()
    try:
        splits = table.load(seed=0)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rows = len(splits["train"]) + len(splits["test"])
    assert rows == (size - len(b"text\tlabel\n")) // len(block) * 64
    assert peak - held < 0.10 * size, (peak, held, size)
    assert held < 1.6 * size, (held, size)  # the rows themselves: text plus Python's per-object overhead


# -- adapters ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, tiny_data) -> Path:
    root = tmp_path_factory.mktemp("hostile-adapter")
    raw = recipe_dict(tiny_llama, tiny_data, name="victim")
    raw["training"]["max_steps"] = 2
    raw["output"] = {"dir": str(root / "victim")}
    return plugtune.run(write_yaml(root / "victim.yaml", raw), show_progress=False).adapter_dir


def adapter_copy(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "adapter"
    shutil.copytree(trained, copy)
    return copy


def rewrite_weights(adapter: Path, data: bytes) -> None:
    """Replace the weights file and make the manifest's size and hash agree with it, so that
    only the content itself can give it away."""
    import hashlib

    (adapter / WEIGHTS_FILE).write_bytes(data)
    manifest = json.loads((adapter / MANIFEST_FILE).read_text())
    manifest["files"][WEIGHTS_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (adapter / MANIFEST_FILE).write_text(json.dumps(manifest))


def generate(capsys, tmp_path: Path, adapter: Path) -> tuple[int, list[str]]:
    return refused(capsys, tmp_path, "generate", "--adapter", adapter, "the film")


def test_adapter_truncated_safetensors(trained, tmp_path, capsys):
    adapter = adapter_copy(trained, tmp_path)
    data = (adapter / WEIGHTS_FILE).read_bytes()
    (adapter / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    code, lines = generate(capsys, tmp_path, adapter)
    assert code == 5
    assert lines == [f"error: {adapter / WEIGHTS_FILE}: {len(data) // 2} bytes, the manifest says {len(data)} (truncated or replaced)"]


def test_adapter_safetensors_header_claiming_a_huge_size(trained, tmp_path, capsys):
    adapter = adapter_copy(trained, tmp_path)
    data = (adapter / WEIGHTS_FILE).read_bytes()
    rewrite_weights(adapter, struct.pack("<Q", 1 << 60) + data[8:])  # the header length field: 1 EiB
    code, lines = generate(capsys, tmp_path, adapter)
    assert code == 5
    size = len(data)
    assert lines == [f"error: {adapter / WEIGHTS_FILE}: the safetensors header claims {1 << 60} bytes "
                     f"but the file has {size} (corrupt or truncated)"]


def tensors_of(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(adapter / WEIGHTS_FILE)


def test_adapter_wrong_dtypes(trained, tmp_path, capsys):
    from safetensors.torch import save

    adapter = adapter_copy(trained, tmp_path)
    rewrite_weights(adapter, save({k: v.to(torch.int32) for k, v in tensors_of(adapter).items()}))
    code, lines = generate(capsys, tmp_path, adapter)
    assert code == 5
    assert len(lines) == 1 and "dtype" in lines[0], lines


def test_adapter_wrong_shapes(trained, tmp_path, capsys):
    from safetensors.torch import save

    adapter = adapter_copy(trained, tmp_path)
    rewrite_weights(adapter, save({k: torch.zeros(v.shape[0] + 1, v.shape[-1]) for k, v in tensors_of(adapter).items()}))
    code, lines = generate(capsys, tmp_path, adapter)
    assert code == 5
    assert len(lines) == 1, lines
    assert re.fullmatch(r"error: adapter 'victim' does not fit this base: model\.layers\.\d+\.[\w.]+ has lora_A "
                        r"\((\d+), (\d+)\) and lora_B \((\d+), 4\), the base layer maps \2 to \d+ features", lines[0]), lines


def test_adapter_manifest_for_another_base(trained, tmp_path, capsys):
    adapter = adapter_copy(trained, tmp_path)
    manifest = json.loads((adapter / MANIFEST_FILE).read_text())
    real = manifest["base_model"]["fingerprint"]
    manifest["base_model"]["fingerprint"] = "sha256:" + "0" * 64
    (adapter / MANIFEST_FILE).write_text(json.dumps(manifest))
    code, lines = generate(capsys, tmp_path, adapter)
    assert code == 5
    base = manifest["base_model"]["id"]
    assert lines == [(f"error: adapter 'victim' was trained on base {base!r} (sha256:{'0' * 64}), "
                     f"but the resident base is {base!r} ({real})")]


def test_adapter_pickle_bin_refused(trained, tmp_path, capsys):
    adapter = adapter_copy(trained, tmp_path)
    (adapter / WEIGHTS_FILE).unlink()
    torch.save({"lora": torch.zeros(2)}, adapter / "adapter_model.bin")
    code, lines = generate(capsys, tmp_path, adapter)
    assert code == 5
    assert lines == [f"error: {adapter}: {WEIGHTS_FILE} is missing (found adapter_model.bin: pickle files are not loaded; "
                     "opt in with allow_pickle=True or --allow-pickle if you trust it)"]


def test_adapter_pickle_bin_loads_only_when_the_user_opts_in(trained, tmp_path):
    from plugtune.artifacts.adapters import read_adapter

    adapter = adapter_copy(trained, tmp_path)
    state = tensors_of(adapter)
    (adapter / WEIGHTS_FILE).unlink()
    torch.save(state, adapter / "adapter_model.bin")
    loaded = read_adapter(adapter, allow_pickle=True)
    assert all(torch.equal(loaded.state[k], v) for k, v in state.items())


def test_adapter_method_plugin_missing(trained, tmp_path, capsys):
    adapter = adapter_copy(trained, tmp_path)
    manifest = json.loads((adapter / MANIFEST_FILE).read_text())
    manifest["method"].update(name="dora-x", plugin="dora", distribution="plugtune-dora", version="9.9")
    (adapter / MANIFEST_FILE).write_text(json.dumps(manifest))
    code, lines = generate(capsys, tmp_path, adapter)
    assert code == 5
    assert len(lines) == 1
    assert "tuning method 'dora-x' from distribution plugtune-dora 9.9, which is not installed" in lines[0]


def test_adapter_path_traversal_through_the_server(trained, tmp_path):
    """Names and paths sent to the server's load endpoint cannot leave its adapters root."""
    from plugtune.serving.host import AdapterHost
    from plugtune.serving.server import Service, create_app
    from starlette.testclient import TestClient

    root = tmp_path / "served"
    shutil.copytree(trained, root / "victim")
    outside = tmp_path / "outside"
    shutil.copytree(trained, outside)
    service = Service(AdapterHost.from_adapters(root / "victim"), adapters_root=root)
    before = snapshot(tmp_path)
    with TestClient(create_app(service)) as client:
        for path in ("../outside", str(outside), "victim/../../outside", "/etc"):
            response = client.post("/v1/adapters", json={"name": "x", "path": path})
            assert response.status_code == 403, (path, response.text)
            assert "outside the adapters root" in response.json()["error"]["message"], response.text
        for name in ("../x", "a/b", ".hidden"):
            response = client.post("/v1/adapters", json={"name": name, "path": "victim"})
            assert response.status_code == 400 and "is not allowed" in response.json()["error"]["message"], response.text
        assert [a["name"] for a in client.get("/v1/adapters").json()["data"]] == ["victim"]
    assert snapshot(tmp_path) == before


# -- plugins ----------------------------------------------------------------------------------

HOSTILE_PLUGIN = '''
import os

from plugtune import hookimpl

MODE = os.environ.get("PLUGTUNE_HOSTILE_MODE", "")
if MODE == "import":
    raise RuntimeError("boom at import")


class Noisy:
    """A regularizer whose transform_batch raises at step 2."""

    def __init__(self, options):
        self.options = options

    def transform_batch(self, batch, step):
        if MODE == "component" and step == 2:
            raise ValueError("noise generator broke")
        return batch


@hookimpl
def register_regularizers(register):
    if MODE == "register":
        raise RuntimeError("boom at registration")
    register("hostile_noise", Noisy)


@hookimpl
def on_step_end(run, step, metrics):
    if MODE == "hook" and step == 3:
        raise RuntimeError("step hook exploded")
'''


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """An installed third-party plugin (module + dist-info on sys.path); ``mode`` picks where
    it fails. Yields a function that sets the mode and rebuilds the registry."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "plugtune_hostile.py").write_text(HOSTILE_PLUGIN)
    info = root / "plugtune_hostile-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugtune-hostile\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[plugtune]\nhostile = plugtune_hostile\n")
    monkeypatch.syspath_prepend(str(root))

    def use(mode: str) -> None:
        import sys

        monkeypatch.setenv("PLUGTUNE_HOSTILE_MODE", mode)
        sys.modules.pop("plugtune_hostile", None)
        set_plugin_system(build_plugin_system())

    yield use
    import sys

    sys.modules.pop("plugtune_hostile", None)
    set_plugin_system(None)


HOSTILE = "plugin 'hostile' (distribution plugtune-hostile 0.3)"


def hostile_recipe(tmp_path: Path, tiny_llama: Path, tiny_data: Path, **training) -> Path:
    raw = tiny_raw(tiny_llama, tiny_data, tmp_path, regularizers=[{"name": "hostile_noise"}])
    raw["training"].update(checkpoint_every=2, max_steps=6, **training)
    return write_yaml(tmp_path / "recipe.yaml", raw)


def test_plugin_raising_at_import(tmp_path, tiny_llama, tiny_data, hostile, capsys):
    path = hostile_recipe(tmp_path, tiny_llama, tiny_data)
    capsys.readouterr()
    hostile("import")
    warnings = capsys.readouterr().err.splitlines()
    assert f"warning: {HOSTILE} failed to import: RuntimeError: boom at import" in warnings
    code, lines = refused(capsys, tmp_path, "run", path, "--quiet")
    assert code == 2
    # its components are unknown (they register only once it imports), but the broken plugin is named
    assert lines == [(f"error: {path}: regularizers[0].name: unknown regularizer 'hostile_noise' "
                     f"(installed: {installed('regularizer')}); plugins that failed to import and may provide it: "
                     f"{HOSTILE}: RuntimeError: boom at import")]


def test_plugin_raising_at_registration(tmp_path, tiny_llama, tiny_data, hostile, capsys):
    path = hostile_recipe(tmp_path, tiny_llama, tiny_data)
    capsys.readouterr()
    hostile("register")
    warnings = capsys.readouterr().err.splitlines()
    assert f"warning: {HOSTILE} failed in hook register_regularizers: RuntimeError: boom at registration" in warnings
    assert "on_step_end" in [impl.function.__name__ for impl in get_plugin_system().pm.hook.on_step_end.get_hookimpls()]
    code, lines = refused(capsys, tmp_path, "run", path, "--quiet")
    assert code == 2
    assert lines[0].startswith(f"error: {path}: regularizers[0].name: unknown regularizer 'hostile_noise'")


def test_plugin_raising_in_a_lifecycle_hook_during_training(tmp_path, tiny_llama, tiny_data, hostile, capsys):
    path = hostile_recipe(tmp_path, tiny_llama, tiny_data)
    hostile("hook")
    code, lines = cli(capsys, "run", path, "--quiet")
    assert code == 6
    assert lines == [f"error: {HOSTILE} failed in hook on_step_end: RuntimeError: step hook exploded"]
    out = tmp_path / "out"
    from plugtune.training.checkpoints import latest_checkpoint, read_checkpoint

    assert latest_checkpoint(out).name == "step-2"
    assert read_checkpoint(latest_checkpoint(out)).step == 2  # the last checkpoint is whole
    assert not (out / WEIGHTS_FILE).exists()
    hostile("")  # the plugin fixed: the run resumes from that checkpoint and finishes
    code, lines = cli(capsys, "run", path, "--quiet", "--resume")
    assert code == 0, lines
    assert json.loads((out / MANIFEST_FILE).read_text())["training"]["steps"] == 6


def test_plugin_raising_in_a_component_during_training(tmp_path, tiny_llama, tiny_data, hostile, capsys):
    path = hostile_recipe(tmp_path, tiny_llama, tiny_data)
    out = tmp_path / "out"
    hostile("component")
    code, lines = cli(capsys, "run", path, "--quiet")
    assert code == 6
    assert lines == [(f"error: {HOSTILE} failed in regularizer 'hostile_noise' (transform_batch): "
                     f"ValueError: noise generator broke")]
    assert not (out / WEIGHTS_FILE).exists()


def test_nan_loss_names_the_step_and_keeps_the_checkpoint_and_the_previous_adapter(trained, tmp_path, tiny_llama,
                                                                                    tiny_data, capsys):
    out = adapter_copy(trained, tmp_path)  # a finished adapter already in the output folder
    previous = snapshot(out)
    raw = tiny_raw(tiny_llama, tiny_data, tmp_path, output={"dir": str(out)})
    raw["training"].update(learning_rate=1e30, checkpoint_every=1, max_steps=6)  # diverges within a few steps
    path = write_yaml(tmp_path / "recipe.yaml", raw)
    code, lines = cli(capsys, "run", path, "--quiet", "--overwrite")
    assert code == 7
    assert len(lines) == 1
    value, step = lines[0].split("loss became ")[1].split(";")[0].split(" at step ")
    assert value in {"nan", "inf", "-inf"}
    step = int(step)
    assert lines[0] == f"error: loss became {value} at step {step}; lower training.learning_rate or check the data"
    # the previous adapter, and its log kept as metrics.previous.jsonl (metrics.jsonl is the failed run's)
    assert {k: v for k, v in snapshot(out).items() if not k.startswith("checkpoints/") and k != "metrics.jsonl"} == \
        {("metrics.previous.jsonl" if k == "metrics.jsonl" else k): v for k, v in previous.items()}
    from plugtune.training.checkpoints import latest_checkpoint, read_checkpoint

    last = latest_checkpoint(out)
    assert last is not None and last.name == f"step-{step - 1}"
    assert all(torch.isfinite(t).all() for t in read_checkpoint(last).trainable.values())


def test_adapter_save_that_fails_midway_leaves_the_previous_adapter(trained, tmp_path, monkeypatch):
    """A crash while an adapter is written (here: the second file's write raises) leaves the
    previous adapter byte for byte, and no staging folder behind."""
    from plugtune import adapters

    out = adapter_copy(trained, tmp_path)
    previous = snapshot(out)
    calls = {"n": 0}
    real = adapters.fsync_write

    def failing_write(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(adapters, "fsync_write", failing_write)
    state = tensors_of(out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    with pytest.raises(plugtune.AdapterError) as info:
        adapters.save_adapter(out, state={k: v + 1 for k, v in state.items()},
                              config=json.loads((out / CONFIG_FILE).read_text()), manifest=manifest)
    assert str(info.value) == f"could not write the adapter to {out} (No space left on device); the previous adapter is unchanged"
    assert snapshot(out) == previous
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
