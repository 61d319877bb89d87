"""qlora (4-bit) and int8 (8-bit): the base is loaded already quantized, never as an fp32
copy first; it records the fp32 load's fingerprint; the adapters are ordinary LoRA adapters
that the host serves on the full-precision base and plain peft loads. Skipped with the
methods' own preflight reason where bitsandbytes cannot run here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import plugtune
from plugtune.artifacts.adapters import MANIFEST_FILE
from plugtune.artifacts.models import fingerprint, load_base
from plugtune.data.tasks import build_task
from plugtune.kernel.components import BaseLoading
from plugtune.kernel.errors import ModelError
from plugtune.serving.host import AdapterHost

TEXTS = ["question : what is the colour of the sky ? answer : blue", "the film was great and fun"]
CLS_TEXTS = ["the film was great wonderful fun", "the plot was awful dull tedious"]
LM = build_task({"type": "causal-lm", "prompt": "question : {question} answer :", "response": " {answer}"})
CLS = build_task({"type": "sequence-classification", "text": "{text}", "labels": ["negative", "positive"]})


def _method(name: str, **options):
    from plugtune.plugins.methods.int8 import Int8Method
    from plugtune.plugins.methods.qlora import QloraMethod

    cls = {"int8": Int8Method, "qlora": QloraMethod}[name]
    return cls(cls.Options(**options))


def _unavailable(name: str) -> str | None:
    return _method(name).preflight()


QUANTIZED = [pytest.param(name, marks=pytest.mark.skipif(_unavailable(name) is not None, reason=f"{name}: {_unavailable(name)}"))
             for name in ("qlora", "int8")]


def _layer_type(name: str):
    import bitsandbytes as bnb

    return {"qlora": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}[name]


from test_methods import keeper  # noqa: E402,F401  the fixture capturing the trained model (one Keeper for both files)


def _train(make_recipe, method: str, classification: bool = False, **options):
    targets = ["query", "value"] if classification else "all-linear"
    settings = {"max_steps": 24 if classification else 8, "batch_size": 8, "learning_rate": 2e-2, "seed": 0,
                "max_length": 48, "device": "cpu"}
    path = make_recipe(classification=classification, name=f"{method}-{'cls' if classification else 'lm'}",
                       method={"name": method, "options": {"r": 4, "alpha": 8, "target_modules": targets, **options}},
                       training=settings)
    return plugtune.run(path, show_progress=False)


@torch.no_grad()
def _logits(model, tokenizer, texts):
    model.eval()
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return model(**enc).logits


def _loaded(method, base: Path, task=LM):
    return load_base(str(base), task, loading=method.base_loading, loaded=getattr(method, "base_loaded", None))


# -- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", QUANTIZED)
def test_the_base_loads_already_quantized_with_the_fp32_fingerprint(name, tiny_llama):
    from torch import nn

    full = load_base(str(tiny_llama), LM)
    quantized = _loaded(_method(name), tiny_llama)
    layer = _layer_type(name)
    linear = {n: m for n, m in quantized.model.named_modules() if isinstance(m, nn.Linear)}
    assert sorted(n for n, m in linear.items() if not isinstance(m, layer)) == ["lm_head"]  # the head stays
    assert all(not m.weight.is_floating_point() for m in linear.values() if isinstance(m, layer))
    assert len([m for m in linear.values() if isinstance(m, layer)]) == 14  # 2 layers x (q k v o gate up down)
    assert quantized.info.fingerprint == full.info.fingerprint
    held = {m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
            for m in (full.model, quantized.model)}
    assert held[quantized.model] < held[full.model]  # (the tiny model is mostly embeddings, kept in fp32)
    # without the checkpoint to read the quantized weights from, there is no fp32 fingerprint to give
    with pytest.raises(ModelError, match="cannot fingerprint the quantized layer"):
        fingerprint(quantized.model)


def test_quantized_fingerprints_match_for_every_format_and_a_classifier(tiny_llama, tiny_bert):
    if _unavailable("qlora") or _unavailable("int8"):
        pytest.skip("bitsandbytes cannot run here")
    full = load_base(str(tiny_llama), LM).info.fingerprint
    for method in (_method("qlora", quant_type="fp4", double_quant=False), _method("qlora", compute_dtype="bfloat16"),
                   _method("int8", outlier_threshold=0.0)):
        assert _loaded(method, tiny_llama).info.fingerprint == full
    bert = load_base(str(tiny_bert), CLS)  # the checkpoint names tensors without the model's "bert." prefix
    for name in ("qlora", "int8"):
        loaded = _loaded(_method(name), tiny_bert, CLS)
        assert loaded.info.fingerprint == bert.info.fingerprint
        assert type(dict(loaded.model.named_modules())["classifier"]) is torch.nn.Linear  # the new head stays
        assert loaded.new_parameters == bert.new_parameters == {"classifier.weight", "classifier.bias"}


def test_the_head_modules_are_the_ones_outside_the_backbone(tiny_llama, tiny_bert):
    from plugtune.artifacts.models import head_modules

    assert head_modules(tiny_llama, LM) == ("lm_head",)
    assert head_modules(tiny_bert, CLS) == ("classifier",)
    assert head_modules(tiny_llama, CLS) == ("score",)


# -- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", QUANTIZED)
def test_trains_on_the_tiny_llama_and_the_adapter_is_hosted_on_the_full_precision_base(name, make_recipe, keeper, tiny_llama):
    result = _train(make_recipe, name)
    assert result.after["loss"] < result.before["loss"] - 0.05, (result.before, result.after)
    layer = _layer_type(name)
    quantized = [m for m in keeper.model.modules() if isinstance(m, layer)]
    assert len(quantized) == 14 and all(not m.weight.is_floating_point() for m in quantized)
    manifest = json.loads((result.adapter_dir / MANIFEST_FILE).read_text())
    assert manifest["method"]["name"] == name
    assert manifest["base_model"]["fingerprint"] == load_base(str(tiny_llama), LM).info.fingerprint

    host = AdapterHost.from_adapters(result.adapter_dir)  # the full-precision base
    assert not any(isinstance(m, layer) for m in host.base.model.modules())
    trained = _logits(keeper.model, host.tokenizer, TEXTS)
    effect = (host.logits(TEXTS, adapter=None) - trained).abs().max()
    gap = (host.logits(TEXTS) - trained).abs().max()
    assert effect > 0.05 and gap < effect / 3  # the quantization error is small next to what the adapter does


@pytest.mark.parametrize("name", QUANTIZED)
def test_trains_a_classifier_on_the_tiny_bert_with_the_head_in_full_precision(name, make_recipe, keeper):
    result = _train(make_recipe, name, classification=True)
    assert result.after["loss"] < result.before["loss"]
    head = dict(keeper.model.named_modules())["base_model.model.classifier.original_module"]
    assert type(head) is torch.nn.Linear
    assert any(isinstance(m, _layer_type(name)) for m in keeper.model.modules())
    host = AdapterHost.from_adapters(result.adapter_dir)
    trained = _logits(keeper.model, host.tokenizer, CLS_TEXTS)
    assert (host.logits(CLS_TEXTS) - trained).abs().max() < 0.5 * (host.logits(CLS_TEXTS, adapter=None) - trained).abs().max() + 0.05


@pytest.mark.parametrize("name", QUANTIZED)
def test_plain_peft_loads_the_adapter_on_a_quantized_and_a_full_precision_base(name, make_recipe, keeper, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = _train(make_recipe, name)
    trained = keeper.model
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    expected = _logits(trained, tokenizer, TEXTS)
    method = _method(name, r=4, alpha=8, target_modules="all-linear")
    context = BaseLoading(head_modules=("lm_head",))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, **method.base_loading(context))
    if hasattr(method, "base_loaded"):
        method.base_loaded(base)
    model = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    torch.testing.assert_close(_logits(model, tokenizer, TEXTS), expected, atol=1e-5, rtol=0)

    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), result.adapter_dir)
    host = AdapterHost.from_adapters(result.adapter_dir)
    torch.testing.assert_close(_logits(full, tokenizer, TEXTS), host.logits(TEXTS), atol=1e-5, rtol=0)


def test_qlora_and_int8_and_lora_adapters_share_the_lora_handler(make_recipe):
    if _unavailable("qlora") or _unavailable("int8"):
        pytest.skip("bitsandbytes cannot run here")
    dirs = [_train(make_recipe, name).adapter_dir for name in ("qlora", "int8", "lora")]
    host = AdapterHost.from_adapters(*dirs)
    assert len(host.handlers) == 1
    alone = {name: host.logits(TEXTS, adapter=name) for name in ("qlora-lm", "int8-lm", "lora-lm")}
    assert (alone["qlora-lm"] - alone["int8-lm"]).abs().max() > 1e-4
    for name in ("lora-lm", "qlora-lm", None, "int8-lm", "qlora-lm"):
        expected = alone[name] if name else host.logits(TEXTS, adapter=None)
        torch.testing.assert_close(host.logits(TEXTS, adapter=name), expected, atol=1e-6, rtol=0)


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"quant_type": "nf5"}, r"method\.options\.quant_type: Input should be 'nf4' or 'fp4' \(got 'nf5'\); did you mean 'nf4'\?"),
    ({"compute_dtype": "bfloat61"}, r"method\.options\.compute_dtype: .*'float32'.*; did you mean 'bfloat16'\?"),
    ({"double_qant": True}, r"method\.options\.double_qant: .*did you mean 'double_quant'"),
])
def test_bad_qlora_options_fail_validation(options, message, make_recipe):
    path = make_recipe(method={"name": "qlora", "options": {"r": 4, **options}})
    with pytest.raises(plugtune.RecipeError, match=message):
        plugtune.load_recipe(path)


def test_an_unknown_method_name_suggests_qlora(make_recipe):
    path = make_recipe(method={"name": "qlroa", "options": {}})
    with pytest.raises(plugtune.RecipeError, match="qlora"):
        plugtune.load_recipe(path)


def test_qlora_unavailable_is_a_validation_error(make_recipe, monkeypatch):
    from plugtune.plugins.methods import qlora

    monkeypatch.setattr(qlora.QloraMethod, "preflight", lambda self: "bitsandbytes 0.0 cannot run 4-bit layers on cpu here (x)")
    path = make_recipe(method={"name": "qlora", "options": {"r": 4}})
    with pytest.raises(plugtune.RecipeError, match=r"method.name: bitsandbytes 0.0 cannot run 4-bit layers on cpu here \(x\)$"):
        plugtune.load_recipe(path)


@pytest.mark.parametrize("name", QUANTIZED)
def test_an_adapter_folder_as_the_base_is_refused_with_the_way_out(name, make_recipe):
    first = _train(make_recipe, "lora")
    path = make_recipe(name="on-adapter", base_model=str(first.adapter_dir),
                       method={"name": name, "options": {"r": 4}})
    with pytest.raises(plugtune.RecipeError, match=r"base_model: .* is an adapter folder, merged into its base in full "
                                                   r"precision, .* `plugtune merge .* OUT`"):
        plugtune.load_recipe(path)
    with pytest.raises(ModelError, match="is an adapter folder"):  # and at load time, before any weight
        _loaded(_method(name), first.adapter_dir)
