"""``training.precision``: what ``auto`` chooses on a CPU and why, the choice in the manifest, and
the per-example loss in bf16 against fp32 (bench/precision.py measures the real model)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import plugtune
import pytest
import torch
from plugtune.artifacts.adapters import read_manifest
from plugtune.data.labels import per_example_loss
from plugtune.data.tasks import collate
from plugtune.kernel import hardware
from plugtune.training.loss import label_token_losses
from plugtune.training.runtime import MIN_BF16_HIDDEN, training_precision

SMOLLM2_SHAPES = SimpleNamespace(hidden_size=576, intermediate_size=1536)

# bf16 keeps 8 bits of mantissa (a relative step of 2**-8 = 0.4%); through the tiny model's
# layers a per-example loss moves by about that, so the tolerance is a few of those steps.
BF16_RELATIVE_TOLERANCE = 0.03


def _probe(monkeypatch, *, native: bool, bf16_faster: bool) -> list[tuple]:
    calls: list[tuple] = []

    def probe(hidden, intermediate, *, rows, repeats=7):
        calls.append((hidden, intermediate, rows))
        dtype = torch.bfloat16 if bf16_faster else torch.float32
        return hardware.PrecisionChoice(dtype, f"{'bf16' if bf16_faster else 'fp32'}: probe", 2.0, 1.0)

    monkeypatch.setattr(hardware, "native_bf16", lambda: native)
    monkeypatch.setattr(hardware, "choose_cpu_dtype", probe)
    return calls


def test_auto_on_a_cpu_with_native_bf16_takes_bf16_only_where_the_probe_shows_it_faster(monkeypatch):
    calls = _probe(monkeypatch, native=True, bf16_faster=True)
    chosen = training_precision("auto", False, SMOLLM2_SHAPES, 16 * 64)
    assert (chosen.mixed_precision, chosen.record()["chosen"]) == ("bf16", "bf16")
    assert "the adapter and optimizer state in fp32" in chosen.reason
    assert calls == [(576, 1536, 1024)] and chosen.probed  # the model's own shapes, a batch's tokens as rows
    assert chosen.record()["bf16_speedup"] == 2.0  # the probe's fp32 ms / bf16 ms, a number in the manifest
    _probe(monkeypatch, native=True, bf16_faster=False)
    kept_fp32 = training_precision("auto", False, SMOLLM2_SHAPES, 1024)
    assert kept_fp32.mixed_precision == "no" and kept_fp32.record()["bf16_speedup"] == 2.0


def test_auto_keeps_fp32_without_native_bf16_for_small_models_and_without_a_configuration(monkeypatch):
    calls = _probe(monkeypatch, native=False, bf16_faster=True)
    chosen = training_precision("auto", False, SMOLLM2_SHAPES, 1024)
    assert chosen.mixed_precision == "no" and "no native bf16" in chosen.reason and calls == []
    calls = _probe(monkeypatch, native=True, bf16_faster=True)
    tiny = training_precision("auto", False, SimpleNamespace(hidden_size=MIN_BF16_HIDDEN - 1, intermediate_size=64), 64)
    unknown = training_precision("auto", False, None, 64)
    assert (tiny.mixed_precision, unknown.mixed_precision, calls) == ("no", "no", [])
    assert not (chosen.probed or tiny.probed or unknown.probed)  # nothing measured: nothing printed
    assert f"hidden size {MIN_BF16_HIDDEN - 1}" in tiny.reason and "configuration" in unknown.reason


def test_explicit_precision_and_gpus_are_not_probed(monkeypatch):
    calls = _probe(monkeypatch, native=True, bf16_faster=True)
    assert training_precision("fp32", False, SMOLLM2_SHAPES, 1024).mixed_precision == "no"
    assert training_precision("bf16", False, SMOLLM2_SHAPES, 1024).record() == {
        "requested": "bf16", "chosen": "bf16", "reason": "bf16: as the recipe says"}
    assert training_precision("auto", True, SMOLLM2_SHAPES, 1024).mixed_precision in ("bf16", "fp16")
    assert calls == []


def test_the_choice_is_kept_in_the_manifest(make_recipe, tmp_path: Path):
    out = tmp_path / "auto"
    recipe = plugtune.load_recipe(make_recipe(training={"max_steps": 2, "batch_size": 4, "device": "cpu", "eval_before": False},
                                              output={"dir": str(out)}))
    plugtune.run(recipe, show_progress=False)
    precision = read_manifest(out).training["precision"]
    assert precision["requested"] == "auto" and precision["chosen"] == "fp32"  # the tiny model is never probed
    assert precision["reason"].startswith("fp32: ")


def test_a_bf16_run_trains_and_says_so(make_recipe, tmp_path: Path):
    out = tmp_path / "bf16"
    recipe = plugtune.load_recipe(make_recipe(training={"max_steps": 12, "batch_size": 8, "learning_rate": 1e-2,
                                                        "precision": "bf16", "device": "cpu", "eval_before": True},
                                              output={"dir": str(out)}))
    result = plugtune.run(recipe, show_progress=False)
    assert read_manifest(out).training["precision"]["chosen"] == "bf16"
    assert result.after["loss"] < result.before["loss"]
    # the frozen base trained in bf16 (as on a GPU); the adapter is fp32 and hosts on the fp32 base
    from safetensors.torch import load_file
    from plugtune.artifacts.adapters import WEIGHTS_FILE
    from plugtune.serving.host import AdapterHost

    assert {t.dtype for t in load_file(out / WEIGHTS_FILE).values()} == {torch.float32}
    host = AdapterHost.from_adapters(out)
    assert next(host.model.parameters()).dtype == torch.float32
    # accelerate keeps one precision per process; the next run in this one may choose another
    again = plugtune.load_recipe(make_recipe(training={"max_steps": 1, "batch_size": 8, "precision": "fp32", "device": "cpu",
                                                       "eval_before": False}, output={"dir": str(tmp_path / "fp32")}))
    plugtune.run(again, show_progress=False)
    assert read_manifest(tmp_path / "fp32").training["precision"]["chosen"] == "fp32"


def test_per_example_loss_in_bf16_autocast_is_fp32_s_within_the_tolerance(tiny_llama, tiny_data, make_recipe):
    from test_performance import _rows

    model, rows, pad = _rows(tiny_llama, tiny_data, make_recipe)
    batch = collate(rows[:12], pad, classification=False)
    with torch.no_grad():
        fp32 = per_example_loss(*label_token_losses(model, batch))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            token_losses, positions = label_token_losses(model, batch)
        bf16 = per_example_loss(token_losses.float(), positions)
    relative = ((bf16 - fp32).abs() / fp32).max()
    assert 0 < relative < BF16_RELATIVE_TOLERANCE, relative  # not zero: bf16 did run


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_bert"])
def test_fp32_attention_gives_fp32_runs_the_same_logits_and_bf16_runs_fp32_attention(which, request):
    """Under bf16 autocast on a CPU the attention runs in fp32 (torch's CPU kernels are slower in
    bf16); outside autocast the swapped implementation is transformers' SDPA exactly."""
    from plugtune.data.tasks import build_task
    from plugtune.artifacts.models import load_base
    from plugtune.training import runtime

    task = build_task(dict(type="causal-lm", prompt="q : {question} a :", response=" {answer}") if which == "tiny_llama"
                      else dict(type="sequence-classification", text="{text}", label="label", labels=["neg", "pos"]))
    model = load_base(str(request.getfixturevalue(which)), task, seed=0).model.eval()
    ids = torch.randint(5, 40, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    seen = []
    real = runtime._fp32_sdpa

    def spy(module, query, key, value, *args, **kwargs):
        out = real(module, query, key, value, *args, **kwargs)
        seen.append((query.dtype, value.dtype, out[0].dtype))
        return out

    assert runtime.use_fp32_attention(model) and model.config._attn_implementation == runtime.FP32_SDPA
    from transformers import AttentionInterface

    AttentionInterface.register(runtime.FP32_SDPA, spy)
    try:
        with torch.no_grad():
            after = model(input_ids=ids, attention_mask=mask).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(input_ids=ids, attention_mask=mask)
    finally:
        AttentionInterface.register(runtime.FP32_SDPA, real)
    assert torch.equal(before, after)
    assert seen and all(query == out for query, _, out in seen), seen  # the output keeps the query's dtype; fp32 inside
    if which == "tiny_llama":  # the value projection ran in bf16 under autocast (RoPE's fp32 tables promote q and k)
        assert seen[-1][1] == torch.bfloat16, seen


def test_a_bf16_classifier_run_keeps_its_new_head_and_adapter_in_fp32(make_recipe, tmp_path: Path):
    """The frozen base is bf16 in a bf16 run; the trained weights (LoRA and the new head, which
    comes from the base's dtype) are fp32 master weights, saved as fp32."""
    from safetensors.torch import load_file
    from plugtune.artifacts.adapters import WEIGHTS_FILE

    out = tmp_path / "bf16-classifier"
    recipe = plugtune.load_recipe(make_recipe(classification=True, training={"max_steps": 6, "batch_size": 8, "precision": "bf16",
                                                                             "device": "cpu", "eval_before": False},
                                              output={"dir": str(out)}))
    plugtune.run(recipe, show_progress=False)
    saved = load_file(out / WEIGHTS_FILE)
    assert any("classifier" in name or "score" in name for name in saved)
    assert {t.dtype for t in saved.values()} == {torch.float32}
