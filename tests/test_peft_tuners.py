"""The peft tuner methods (``peft`` and its named entries): options validated against peft's
config dataclasses, every method's adapters on one host, DoRA mixed with LoRA and LoHa rows.

The per-method contracts (training, save/reload, peft format, switching, mixing, folding,
kill and resume, strict attach) run through the conformance kit in test_conformance.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import plugtune
from plugtune.artifacts.adapters import read_manifest
from plugtune.data.tasks import build_task
from plugtune.kernel.errors import RecipeError
from plugtune.kernel.registry import get_plugin_system
from plugtune.serving.host import AdapterHost
from plugtune.testing import PROBE_TEXTS, assert_base_unchanged, base_snapshot, recipe_dict, valid_positions

from test_conformance import METHODS


def _write(tmp_path: Path, tiny_llama: Path, tiny_data: Path, method: dict[str, Any], tag: str = "r", **training: Any) -> Path:
    raw = recipe_dict(tiny_llama, tiny_data, evaluators=["loss"], output={"dir": str(tmp_path / "adapters" / tag)})
    raw["method"] = method
    raw["training"].update({"max_steps": 4, "eval_before": False, **training})
    path = tmp_path / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _problems(tmp_path: Path, tiny_llama: Path, tiny_data: Path, method: dict[str, Any]) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        plugtune.load_recipe(_write(tmp_path, tiny_llama, tiny_data, method))
    return caught.value.problems


# -- options: validated against the installed peft's config dataclasses -----------------------


def test_unknown_option_gets_a_did_you_mean(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    problems = _problems(tmp_path, tiny_llama, tiny_data, {"name": "loha", "options": {"rr": 4, "module_dropuot": 0.1}})
    assert "method.options.rr: unknown key; did you mean 'r'?" in problems
    assert "method.options.module_dropuot: unknown key; did you mean 'module_dropout'?" in problems


def test_wrong_type_is_one_line_at_its_field(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    problems = _problems(tmp_path, tiny_llama, tiny_data, {"name": "lokr", "options": {"r": "four"}})
    assert len(problems) == 1 and problems[0].startswith("method.options.r: Input should be a valid integer")


def test_friendly_names_replace_peft_prefixes(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    problems = _problems(tmp_path, tiny_llama, tiny_data, {"name": "boft", "options": {"boft_block_size": 4}})
    assert problems == ["method.options.boft_block_size: unknown key; did you mean 'block_size'?"]


def test_the_configs_own_checks_run_at_validation(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    problems = _problems(tmp_path, tiny_llama, tiny_data, {"name": "oft", "options": {"r": 4, "block_size": 8}})
    assert len(problems) == 1 and "peft refuses this OFT config" in problems[0] and "oft_block_size" in problems[0]


def test_generic_peft_type_is_checked_with_a_did_you_mean(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    problems = _problems(tmp_path, tiny_llama, tiny_data, {"name": "peft", "options": {"type": "LOHAA", "r": 4}})
    assert problems == ["method.options.type: unknown peft type 'LOHAA'; did you mean 'LOHA'?"]
    problems = _problems(tmp_path, tiny_llama, tiny_data, {"name": "peft", "options": {"type": "prompt_tuning"}})
    assert problems == ["method.options.type: 'prompt_tuning' is prompt learning; use method 'prompt_tuning'"]


def test_generic_peft_options_are_that_types_fields(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    problems = _problems(tmp_path, tiny_llama, tiny_data, {"name": "peft", "options": {"type": "loha", "decompose_both": True}})
    assert problems[0].startswith("method.options.decompose_both: unknown key")  # a LoKr field, not LoHa's
    plugtune.load_recipe(_write(tmp_path, tiny_llama, tiny_data, {"name": "peft", "options": {"type": "lokr", "decompose_both": True}}))


def test_targets_that_match_nothing_fail_validation_before_weights_load(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    problems = _problems(tmp_path, tiny_llama, tiny_data, {"name": "loha", "options": {"target_modules": ["qq_proj"]}})
    assert len(problems) == 1 and problems[0].startswith("method.options: peft cannot apply this config")
    assert "qq_proj" in problems[0]


def test_managed_fields_are_not_options(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    problems = _problems(tmp_path, tiny_llama, tiny_data, {"name": "adalora", "options": {"total_step": 10, "task_type": "SEQ_CLS"}})
    assert {p.split(":")[0] for p in problems} == {"method.options.total_step", "method.options.task_type"}


# -- AdaLoRA: the rank allocation runs through the method's on_step ----------------------------


def test_adalora_allocates_ranks_while_training(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    recipe = _write(tmp_path, tiny_llama, tiny_data, {"name": "adalora", "options": {
        "init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 2, "deltaT": 1, "target_modules": ["q_proj", "v_proj"]}},
        max_steps=8, learning_rate=1e-2)
    result = plugtune.run(recipe, show_progress=False)
    config = read_manifest(result.adapter_dir)  # the manifest reads; the peft config carries the final ranks
    assert config.method.name == "adalora"
    saved = yaml.safe_load((Path(result.adapter_dir) / "adapter_config.json").read_text())
    ranks = saved["rank_pattern"]
    assert ranks, "AdaLoRA's update_and_allocate never ran: no rank pattern was recorded"
    kept = sum(sum(mask) for mask in ranks.values())
    assert kept < 6 * len(ranks), f"the budget did not shrink the ranks (kept {kept} of {6 * len(ranks)})"


# -- one host, every method --------------------------------------------------------------------


@pytest.fixture(scope="module")
def every_method(method_kits: dict[str, Any]) -> dict[str, Path]:
    """One adapter of every built-in tuning method that runs here (the conformance kits' ``a``)."""
    from test_conformance import _int8_unavailable, _qlora_unavailable

    unavailable = {"int8": _int8_unavailable(), "qlora": _qlora_unavailable()}
    return {name: kit.trained("a")[0] for name, kit in method_kits.items() if not unavailable.get(name)}


def test_every_builtin_method_is_in_the_method_table() -> None:
    """A new built-in tuning method must join METHODS (so the kit and the host test cover it)."""
    system = get_plugin_system()
    builtin = {name for name, c in system.components.get("method", {}).items() if c.plugin.distribution == "plugtune"}
    assert builtin == set(METHODS), f"not in test_conformance.METHODS: {sorted(builtin - set(METHODS))}"


def test_one_host_holds_every_method_and_switches_exactly(tiny_llama: Path, every_method: dict[str, Path]) -> None:
    texts = list(PROBE_TEXTS)
    task = build_task(read_manifest(every_method["lora"]).task)
    alone = {}
    for name, folder in every_method.items():  # each adapter alone on a fresh host
        host = AdapterHost.from_base(str(tiny_llama), task, device="cpu")
        host.load(folder, name)
        alone[name] = host.logits(texts, name)
    host = AdapterHost.from_base(str(tiny_llama), task, device="cpu")
    fresh = base_snapshot(host)
    bare = host.logits(texts, None)
    for name, folder in every_method.items():
        host.load(folder, name)
    mask = valid_positions(host, texts)
    for name in [*every_method, *reversed(list(every_method))]:
        host.use(name)
        diff = float((host.logits(texts)[mask] - alone[name][mask]).abs().max())
        assert diff <= 1e-5, f"{name} on the shared host differs from {name} alone (max |diff| {diff:.2e})"
    host.use(None)
    assert torch.equal(host.logits(texts), bare)
    for name in every_method:
        host.unload(name)
    assert_base_unchanged(host, fresh, "after every method was loaded, switched and unloaded")


def test_resident_bytes_are_the_adapters_own_tensors(tiny_llama: Path, every_method: dict[str, Path]) -> None:
    """A host reports what an adapter adds, not the base weights its layers wrap."""
    from plugtune.artifacts.adapters import read_adapter

    task = build_task(read_manifest(every_method["lora"]).task)
    host = AdapterHost.from_base(str(tiny_llama), task, device="cpu")
    for name in ("dora", "ia3", "loha", "vera", "adalora", "ln_tuning", "oft"):
        host.load(every_method[name], name)
        stored = sum(t.nbytes for t in read_adapter(every_method[name]).state.values())
        resident = next(r["resident_bytes"] for r in host.list() if r["name"] == name)
        assert stored <= resident <= 2 * stored + 4096, f"{name}: {resident} bytes resident for {stored} stored"


def test_mixed_batch_of_dora_lora_loha_and_base_rows_equals_each_row_alone(tiny_llama: Path, every_method: dict[str, Path]) -> None:
    texts = list(PROBE_TEXTS)[:4]
    names = ["dora", "lora", "loha", None]
    task = build_task(read_manifest(every_method["lora"]).task)
    host = AdapterHost.from_base(str(tiny_llama), task, device="cpu")
    for name in ("loha", "lora", "dora"):  # wrappers of three handlers stacked on the same layers
        host.load(every_method[name], name)
    mixed = host.logits(texts, names)
    mask = valid_positions(host, texts)
    for i, (text, name) in enumerate(zip(texts, names)):
        n = int(mask[i].sum())
        diff = float((mixed[i, :n] - host.logits([text], name)[0, :n]).abs().max())
        assert diff <= 1e-5, f"row {i} ({name}) in the mixed batch differs from the row alone (max |diff| {diff:.2e})"
    mixed_text = host.generate(texts, names, max_new_tokens=4)
    assert mixed_text == [host.generate([t], [n], max_new_tokens=4)[0] for t, n in zip(texts, names)]


# -- LoRA's init choices: LoftQ where its dependencies are -------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_loftq_init_is_refused_at_validation_without_cuda(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    problems = _problems(tmp_path, tiny_llama, tiny_data, {"name": "lora", "options": {"init": "loftq"}})
    assert len(problems) == 1 and "loftq needs" in problems[0]


def test_loftq_options_are_validated(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    problems = _problems(tmp_path, tiny_llama, tiny_data, {"name": "lora", "options": {"init": "loftq", "loftq_bits": 3}})
    assert any(p.startswith("method.options.loftq_bits: Input should be 4 or 8") for p in problems)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="LoftQ runs on a CUDA GPU")
def test_loftq_init_trains_on_a_gpu(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    recipe = _write(tmp_path, tiny_llama, tiny_data, {"name": "lora", "options": {"init": "loftq", "r": 4}})
    result = plugtune.run(recipe, show_progress=False)
    assert (Path(result.adapter_dir) / "adapter_model.safetensors").exists()


# -- combine: through an exact conversion to LoRA ------------------------------------------------


def test_loha_and_lokr_combine_into_a_lora_adapter_exactly(tmp_path: Path, tiny_llama: Path, every_method: dict[str, Path]) -> None:
    from plugtune.artifacts.combine import combine_adapters

    out = combine_adapters(tmp_path / "blend", [every_method["loha"], every_method["lokr"]], [1.0, 0.0], method="cat")
    manifest = read_manifest(out)
    assert manifest.method.name == "lora"
    task = build_task(read_manifest(every_method["loha"]).task)
    host = AdapterHost.from_base(str(tiny_llama), task, device="cpu")
    host.load(every_method["loha"], "loha")
    host.load(out, "blend")
    texts = list(PROBE_TEXTS)
    mask = valid_positions(host, texts)
    diff = float((host.logits(texts, "blend")[mask] - host.logits(texts, "loha")[mask]).abs().max())
    assert diff <= 1e-5, f"LoHa converted to LoRA and combined with weight 1 differs from LoHa (max |diff| {diff:.2e})"


@pytest.mark.parametrize("method", ["ia3", "dora", "oft"])
def test_updates_that_are_not_an_added_matrix_are_refused_with_the_reason(tmp_path: Path, every_method: dict[str, Path],
                                                                           method: str) -> None:
    from plugtune.artifacts.combine import combine_adapters
    from plugtune.kernel.errors import AdapterError

    with pytest.raises(AdapterError, match="not an added matrix"):
        combine_adapters(tmp_path / "blend", [every_method[method], every_method["loha"]], [0.5, 0.5], method="cat")
    assert not (tmp_path / "blend").exists()
