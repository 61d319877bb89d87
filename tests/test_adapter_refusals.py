"""Every adapter the host must refuse, each with its exact one-line error: another base
(fingerprint or tensor shapes), another task, a missing method plugin, corrupt, truncated or
oversized-header safetensors files, pickle files without the opt-in, wrong dtypes and LoRA
variants the host does not implement."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from plugtune.artifacts.adapters import MANIFEST_FILE, WEIGHTS_FILE, read_adapter, save_adapter
from plugtune.cli import main
from plugtune.kernel.errors import AdapterError
from plugtune.serving.host import AdapterHost
from plugtune.plugins.methods.lora_hosting import UNSUPPORTED
from plugtune.plugins.methods.lora import random_lora_adapter
from plugtune.data.tasks import build_task
from plugtune.testing import build_tiny_llama

TASK = build_task(dict(type="causal-lm", prompt="{q}", response=" {a}"))
TEXTS = ["what is the colour of the sky ?", "the film was great"]
Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama) -> Path:
    base = AdapterHost.from_base(str(tiny_llama), TASK).base
    return random_lora_adapter(tmp_path_factory.mktemp("ok") / "a", base, TASK, r=4, seed=1, scale=0.5)


@pytest.fixture
def host(tiny_llama) -> AdapterHost:
    return AdapterHost.from_base(str(tiny_llama), TASK)


def _rewrite(src: Path, dst: Path, *, state: dict[str, torch.Tensor] | None = None,
             config: dict[str, Any] | None = None, **manifest: Any) -> Path:
    """A copy of ``src`` with other tensors, config or manifest fields, saved consistently
    (hashes recomputed), so only the change under test is wrong."""
    original = read_adapter(src)
    record = original.manifest.model_dump()
    record.pop("files")
    record.update(manifest)
    return save_adapter(dst, state=state if state is not None else original.state,
                        config=config if config is not None else original.config, manifest=record)


def _refused(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(AdapterError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


# -- another base, another task, another method ----------------------------------------------


def test_another_base_by_fingerprint(adapter, tiny_llama, tmp_path):
    other = AdapterHost.from_base(str(build_tiny_llama(tmp_path / "other", seed=123)), TASK)
    ours = read_adapter(adapter).manifest.base_model
    assert _refused(other.load, adapter) == (
        f"adapter 'a' was trained on base {str(tiny_llama)!r} ({ours.fingerprint}), "
        f"but the resident base is {str(tmp_path / 'other')!r} ({other.base.info.fingerprint})")


def test_another_base_by_tensor_shape(adapter, host, tmp_path):
    state = dict(read_adapter(adapter).state)
    state[Q_PROJ_A] = torch.zeros(4, 16)
    bad = _rewrite(adapter, tmp_path / "narrow", state=state, name="narrow")
    assert _refused(host.load, bad) == (
        "adapter 'narrow' does not fit this base: model.layers.0.self_attn.q_proj has lora_A (4, 16) and "
        "lora_B (32, 4), the base layer maps 32 to 32 features")
    assert host.adapters == {} and host.list() == []  # nothing half-loaded


def test_a_module_the_base_lacks(adapter, host, tmp_path):
    state = dict(read_adapter(adapter).state)
    state["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    state["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)
    bad = _rewrite(adapter, tmp_path / "deep", state=state, name="deep")
    assert _refused(host.load, bad) == (
        "adapter 'deep' does not fit this base: it targets model.layers.7.self_attn.q_proj, which this base does not have")


def test_another_task(adapter, host, tmp_path):
    task = build_task(dict(type="sequence-classification", text="{text}", labels=["negative", "positive"])).to_dict()
    bad = _rewrite(adapter, tmp_path / "cls", task=task, name="cls")
    assert _refused(host.load, bad) == (
        "adapter 'cls' is for task sequence-classification (labels ['negative', 'positive']); "
        "this host serves causal-lm (labels None)")


def test_missing_method_plugin(adapter, host, tmp_path):
    bad = _rewrite(adapter, tmp_path / "dora", method={"name": "dora-x", "distribution": "plugtune-dora", "version": "9.9"})
    assert _refused(host.load, bad) == (
        "adapter 'a' was made by tuning method 'dora-x' from distribution plugtune-dora 9.9, which is not installed; "
        "install that plugin (see `plugtune plugins`)")


@pytest.mark.parametrize(("key", "label"), list(UNSUPPORTED.items()))
def test_lora_variant_the_host_does_not_implement(adapter, host, tmp_path, key, label):
    bad = _rewrite(adapter, tmp_path / "variant", config={**read_adapter(adapter).config, key: True})
    assert _refused(host.load, bad) == f"adapter 'a' uses {label}, which the adapter host's LoRA layers do not support"
    assert host.adapters == {} and host.list() == []  # nothing half-loaded


def test_integer_weights(adapter, host, tmp_path):
    state = dict(read_adapter(adapter).state)
    state[Q_PROJ_A] = state[Q_PROJ_A].round().to(torch.int64)
    bad = _rewrite(adapter, tmp_path / "ints", state=state, name="ints")
    assert _refused(host.load, bad) == (
        f"adapter 'ints': tensor {Q_PROJ_A!r} has dtype int64; LoRA weights must be floating point")


# -- damaged files ------------------------------------------------------------------------------


def _copy(adapter: Path, tmp_path: Path) -> tuple[Path, Path, bytes]:
    folder = tmp_path / "copy"
    shutil.copytree(adapter, folder)
    weights = folder / WEIGHTS_FILE
    return folder, weights, weights.read_bytes()


def test_corrupt_bytes(adapter, host, tmp_path):
    folder, weights, data = _copy(adapter, tmp_path)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # one byte of tensor data
    weights.write_bytes(bytes(flipped))
    assert _refused(host.load, folder) == f"{weights}: content does not match the manifest's sha256 (corrupt or replaced)"


def test_truncated_file(adapter, host, tmp_path):
    folder, weights, data = _copy(adapter, tmp_path)
    weights.write_bytes(data[:-100])
    recorded = read_adapter(adapter).manifest.files[WEIGHTS_FILE]["bytes"]
    assert _refused(host.load, folder) == f"{weights}: {len(data) - 100} bytes, the manifest says {recorded} (truncated or replaced)"
    header = int.from_bytes(data[:8], "little")
    need = len(data) - 8 - header
    assert _refused(read_adapter, folder, verify_hashes=False) == (
        f"{weights}: the tensors need {need} bytes of data but the file holds {need - 100} (truncated)")


def test_header_claiming_a_huge_size(adapter, host, tmp_path):
    folder, weights, data = _copy(adapter, tmp_path)
    weights.write_bytes((1 << 40).to_bytes(8, "little") + data[8:])  # same file size: only the header lies
    assert _refused(host.load, folder) == (
        f"{weights}: the safetensors header claims 1099511627776 bytes but the file has {len(data)} (corrupt or truncated)")


def test_garbled_header(adapter, host, tmp_path):
    folder, weights, data = _copy(adapter, tmp_path)
    header = int.from_bytes(data[:8], "little")
    weights.write_bytes(data[:8] + b"x" * header + data[8 + header:])
    assert _refused(host.load, folder) == (
        f"{weights}: not a readable safetensors file (bad header: Expecting value: line 1 column 1 (char 0))")


def test_too_short_for_safetensors(adapter, host, tmp_path):
    folder, weights, _ = _copy(adapter, tmp_path)
    weights.write_bytes(b"abc")
    assert _refused(read_adapter, folder, verify_hashes=False) == f"{weights}: 3 bytes, too short for a safetensors file (truncated)"


# -- pickle files -------------------------------------------------------------------------------


def _pickled(adapter: Path, tmp_path: Path, filename: str, payload: Any) -> Path:
    folder = tmp_path / f"pickled-{filename}"
    shutil.copytree(adapter, folder)
    (folder / WEIGHTS_FILE).unlink()
    torch.save(payload, folder / filename)
    return folder


@pytest.mark.parametrize("filename", ["adapter_model.bin", "weights.pt", "weights.pth"])
def test_pickle_refused_without_opt_in(adapter, host, tmp_path, filename):
    folder = _pickled(adapter, tmp_path, filename, read_adapter(adapter).state)
    assert _refused(host.load, folder) == (
        f"{folder}: {WEIGHTS_FILE} is missing (found {filename}: pickle files are not loaded; "
        "opt in with allow_pickle=True or --allow-pickle if you trust it)")


def test_pickle_loads_with_opt_in_and_matches(adapter, host, tmp_path):
    folder = _pickled(adapter, tmp_path, "adapter_model.bin", read_adapter(adapter).state)
    host.load(adapter)
    host.load(folder, "from-pickle", allow_pickle=True)
    torch.testing.assert_close(host.logits(TEXTS, "from-pickle"), host.logits(TEXTS, "a"), atol=0, rtol=0)


def test_pickle_with_opt_in_still_refuses_non_tensors(adapter, host, tmp_path):
    folder = _pickled(adapter, tmp_path, "adapter_model.bin", {"weights": "not a tensor"})
    assert _refused(host.load, folder, allow_pickle=True) == f"{folder / 'adapter_model.bin'}: not a mapping of tensor names to tensors"
    folder = _pickled(adapter, tmp_path, "model.pt", {"weights": Path("code")})  # an arbitrary object
    message = _refused(host.load, folder, allow_pickle=True)
    assert message.startswith(f"{folder / 'model.pt'}: not loadable with torch.load(weights_only=True) (")


def test_cli_pickle_opt_in(adapter, tmp_path, capsys):
    folder = _pickled(adapter, tmp_path, "adapter_model.bin", read_adapter(adapter).state)
    assert main(["generate", "the sky", "--adapter", str(folder), "--max-new-tokens", "2"]) == 5
    assert capsys.readouterr().err.strip() == (
        f"error: {folder}: {WEIGHTS_FILE} is missing (found adapter_model.bin: pickle files are not loaded; "
        "opt in with allow_pickle=True or --allow-pickle if you trust it)")
    assert main(["generate", "the sky", "--adapter", str(folder), "--max-new-tokens", "2", "--allow-pickle"]) == 0


def test_manifest_records_what_the_refusals_check(adapter):
    manifest = json.loads((adapter / MANIFEST_FILE).read_text())
    assert manifest["files"][WEIGHTS_FILE]["bytes"] == (adapter / WEIGHTS_FILE).stat().st_size
    assert manifest["base_model"]["fingerprint"].startswith("sha256:")
