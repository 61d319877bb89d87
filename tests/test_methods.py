"""Every built-in tuning method on tiny models: the loss falls, the saved adapter reloads onto
a fresh base with the trained model's outputs, adapters of different methods share one base
and swap exactly, and full fine-tuning's delta applies and comes off bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

import plugtune
from plugtune import hookimpl
from plugtune.artifacts.adapters import CONFIG_FILE, MANIFEST_FILE, read_adapter
from plugtune.serving.host import AdapterHost
from plugtune.kernel.registry import build_plugin_system, set_plugin_system

TEXTS = ["question : what is the colour of the sky ? answer : blue", "the film was great and fun"]
CLS_TEXTS = ["the film was great wonderful fun", "the plot was awful dull tedious"]

METHODS = {
    "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
    "full": {},
    "full-top1": {"top_layers": 1},
    "full-lowrank": {"delta_rank": 31},  # hidden size 32: every matrix is factored, almost losslessly
    "prefix": {"num_virtual_tokens": 4},
    "prefix-projected": {"num_virtual_tokens": 4, "projection": True, "projection_hidden": 16},
}
LEARNING_RATES = {"lora": 2e-2, "prefix": 5e-2}


class Keeper:
    """Captures the trained model at the end of a run (through the lifecycle hook)."""

    model = None

    @hookimpl
    def on_train_end(self, run):
        self.model = run.model


@pytest.fixture
def keeper():
    keeper = Keeper()
    set_plugin_system(build_plugin_system(extra_plugins=[("keeper", keeper)]))
    yield keeper
    set_plugin_system(None)


def _train(make_recipe, method_key, classification=False, base_model=None, **training):
    method = method_key.split("-")[0]
    lr = LEARNING_RATES.get(method, 1e-2 if method == "full" else 2e-2)
    settings = {"max_steps": 8, "batch_size": 8, "learning_rate": lr, "seed": 0, "max_length": 48, "device": "cpu", **training}
    if classification:
        settings.update(max_steps=24)
    extra = {"base_model": str(base_model)} if base_model else {}
    path = make_recipe(classification=classification, name=method_key,
                       method={"name": method, "options": METHODS[method_key]}, training=settings, **extra)
    return plugtune.run(path, show_progress=False)


@torch.no_grad()
def _logits(model, tokenizer, texts):
    model.eval()
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return model(**enc).logits


@pytest.mark.parametrize("method_key", list(METHODS))
def test_method_learns_and_reloads_exactly(method_key, make_recipe, keeper):
    result = _train(make_recipe, method_key)
    assert result.after["loss"] < result.before["loss"] - 0.05, (result.before, result.after)
    manifest = json.loads((result.adapter_dir / MANIFEST_FILE).read_text())
    assert manifest["method"]["name"] == method_key.split("-")[0]

    host = AdapterHost.from_adapters(result.adapter_dir)
    trained = _logits(keeper.model, host.tokenizer, TEXTS)
    tolerance = 5e-3 if method_key == "full-lowrank" else 1e-5  # rank 31 of 32 drops a sliver
    torch.testing.assert_close(host.logits(TEXTS), trained, atol=tolerance, rtol=0)
    assert (host.logits(TEXTS, adapter=None) - trained).abs().max() > 0.05


@pytest.mark.parametrize("method_key", ["lora", "full", "prefix", "prefix-on-llama"])
def test_method_on_a_classifier(method_key, make_recipe, keeper, tiny_llama):
    METHODS["prefix-on-llama"] = METHODS["prefix"]
    result = _train(make_recipe, method_key, classification=True, base_model=tiny_llama if "llama" in method_key else None)
    assert result.after["loss"] < result.before["loss"]
    host = AdapterHost.from_adapters(result.adapter_dir)
    trained = _logits(keeper.model, host.tokenizer, CLS_TEXTS)
    torch.testing.assert_close(host.logits(CLS_TEXTS), trained, atol=1e-5, rtol=0)


def test_full_adapter_is_a_delta_and_lowrank_reports_its_error(make_recipe):
    full = _train(make_recipe, "full")
    METHODS["full-rank2"] = {"delta_rank": 2}
    lowrank = _train(make_recipe, "full-rank2")
    state = read_adapter(full.adapter_dir).state
    assert state and all(k.startswith("delta.") for k in state)
    low_state = read_adapter(lowrank.adapter_dir).state
    assert any(k.startswith("delta_a.") for k in low_state) and any(k.startswith("delta_b.") for k in low_state)
    config = json.loads((lowrank.adapter_dir / CONFIG_FILE).read_text())
    assert 0 < config["lowrank_relative_error_max"] < 1
    assert (lowrank.adapter_dir / "adapter_model.safetensors").stat().st_size < (full.adapter_dir / "adapter_model.safetensors").stat().st_size


def test_full_top_layers_touches_only_the_last_block(make_recipe):
    result = _train(make_recipe, "full-top1")
    names = list(read_adapter(result.adapter_dir).state)
    assert names and all(".layers.1." in n or n == "delta.model.norm.weight" for n in names), names


def test_full_apply_then_remove_restores_the_base_bit_for_bit(make_recipe):
    result = _train(make_recipe, "full")
    host = AdapterHost.from_adapters(result.adapter_dir)
    host.use(None)
    before = {k: v.clone() for k, v in host.base.model.state_dict().items()}
    for _ in range(3):
        host.use("full")
        host.use(None)
    after = host.base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    host.use("full")
    host.unload("full")
    assert all(torch.equal(before[k], v) for k, v in host.base.model.state_dict().items())


def test_adapters_of_every_method_share_one_base_and_swap_exactly(make_recipe):
    dirs = [_train(make_recipe, key).adapter_dir for key in ("lora", "full", "prefix")]
    host = AdapterHost.from_adapters(*dirs)
    expected = {name: host.logits(TEXTS, adapter=name) for name in [None, "lora", "full", "prefix"]}
    for name in ("lora", "full", "prefix"):
        assert (expected[name] - expected[None]).abs().max() > 1e-4
    # each equals the adapter alone on a fresh base
    for d, name in zip(dirs, ("lora", "full", "prefix")):
        solo = AdapterHost.from_adapters(d)
        torch.testing.assert_close(solo.logits(TEXTS), expected[name], atol=1e-5, rtol=0)
    for name in ["full", "prefix", None, "lora", "full", None, "prefix", "lora"]:
        torch.testing.assert_close(host.logits(TEXTS, adapter=name), expected[name], atol=1e-6, rtol=0)
    # generation through each, and per row in one call
    prompts = ["what is the colour of the sky ?"] * 4
    names = ["lora", "full", "prefix", None]
    assert host.generate(prompts, names, max_new_tokens=3) == [host.generate([p], n, max_new_tokens=3)[0] for p, n in zip(prompts, names)]
    for name in ("full", "prefix", "lora"):
        host.unload(name)
    torch.testing.assert_close(host.logits(TEXTS), expected[None], atol=1e-6, rtol=0)


# -- int8 ---------------------------------------------------------------------------------


def test_int8_trains_on_an_8bit_base_and_applies_to_the_fp32_base(make_recipe, keeper):
    import bitsandbytes as bnb

    METHODS["int8"] = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
    result = _train(make_recipe, "int8")
    assert result.after["loss"] < result.before["loss"] - 0.05
    quantized = [m for m in keeper.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert quantized and all(m.weight.dtype == torch.int8 for m in quantized)

    host = AdapterHost.from_adapters(result.adapter_dir)  # a full-precision base
    assert not any(isinstance(m, bnb.nn.Linear8bitLt) for m in host.base.model.modules())
    trained = _logits(keeper.model, host.tokenizer, TEXTS)
    effect = (host.logits(TEXTS, adapter=None) - trained).abs().max()
    gap = (host.logits(TEXTS) - trained).abs().max()
    assert effect > 0.05 and gap < effect / 5  # quantization error is small next to what the adapter does


def test_int8_adapter_applies_to_an_8bit_base_with_plain_peft(make_recipe, keeper, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plugtune.plugins.methods.int8 import quantize_linear_layers

    METHODS["int8"] = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
    result = _train(make_recipe, "int8")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert quantize_linear_layers(base) == 14  # 2 layers x (q k v o gate up down); the tied head stays
    model = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    torch.testing.assert_close(_logits(model, tokenizer, TEXTS), _logits(keeper.model, tokenizer, TEXTS), atol=1e-5, rtol=0)


def test_int8_with_the_8bit_optimizer_and_a_classifier(make_recipe, keeper):
    import bitsandbytes as bnb

    METHODS["int8-opt"] = {"r": 4, "alpha": 8, "target_modules": ["query", "value"], "optimizer_8bit": True}
    result = _train(make_recipe, "int8-opt", classification=True)
    assert result.after["loss"] < result.before["loss"]
    head = dict(keeper.model.named_modules())["base_model.model.classifier.original_module"]
    assert not isinstance(head, bnb.nn.Linear8bitLt)  # the new head stays in full precision


def test_int8_and_lora_adapters_share_the_lora_handler(make_recipe):
    METHODS["int8"] = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
    dirs = [_train(make_recipe, "int8").adapter_dir, _train(make_recipe, "lora").adapter_dir]
    host = AdapterHost.from_adapters(*dirs)
    assert len(host.handlers) == 1
    a, b = host.logits(TEXTS, adapter="int8"), host.logits(TEXTS, adapter="lora")
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(host.logits(TEXTS, adapter="int8"), a, atol=1e-6, rtol=0)


def test_int8_unavailable_is_a_validation_error(make_recipe, monkeypatch):
    from plugtune.plugins.methods import int8

    monkeypatch.setattr(int8.Int8Method, "preflight", lambda self: "bitsandbytes 0.0 cannot run 8-bit layers on cpu here (x)")
    path = make_recipe(method={"name": "int8", "options": {"r": 4}})
    with pytest.raises(plugtune.RecipeError, match=r"^.*method.name: bitsandbytes 0.0 cannot run 8-bit layers on cpu here \(x\)$"):
        plugtune.load_recipe(path)


def test_prefix_adapter_loads_in_plain_peft_with_identical_logits(make_recipe, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    METHODS["prefix-projected"] = {"num_virtual_tokens": 4, "projection": True, "projection_hidden": 16}
    result = _train(make_recipe, "prefix-projected")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    host = AdapterHost.from_adapters(result.adapter_dir)
    torch.testing.assert_close(_logits(model, tokenizer, TEXTS), host.logits(TEXTS), atol=1e-5, rtol=0)


def test_loraplus_gives_the_b_matrices_their_own_rate_and_keeps_the_groups_settings(tiny_llama):
    from transformers import AutoModelForCausalLM

    from plugtune.data.tasks import build_task
    from plugtune.plugins.methods.lora import LoraMethod, LoraOptions
    from plugtune.sdk import PrepareContext

    method = LoraMethod(LoraOptions(r=4, alpha=8, target_modules=["q_proj", "v_proj"], loraplus_lr_ratio=16))
    model = method.prepare(AutoModelForCausalLM.from_pretrained(tiny_llama), build_task({"type": "causal-lm", "text": "{t}"}),
                           PrepareContext())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in named], "weight_decay": 0.01}]
    optimizer = method.optimizer(groups, 1e-3)
    by_id = {id(p): n for n, p in named}
    rates = {by_id[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert len(rates) == len(named) == 8
    assert all(rate == (pytest.approx(1.6e-2), 0.01) for n, rate in rates.items() if ".lora_B." in n)
    assert all(rate == (1e-3, 0.01) for n, rate in rates.items() if ".lora_A." in n)
    # without the ratio, the groups are the core's, untouched
    plain = LoraMethod(LoraOptions(r=4, alpha=8))
    assert plain.loraplus_groups(groups, 1e-3) is groups


def test_loraplus_trains_from_a_recipe_and_is_recorded(make_recipe):
    with pytest.raises(plugtune.RecipeError, match=r"method.options.loraplus_lr_ratio: Input should be greater than 0"):
        plugtune.load_recipe(make_recipe(method={"name": "lora", "options": {"loraplus_lr_ratio": 0}}))
    result = plugtune.run(make_recipe(method={"name": "lora", "options": {"r": 4, "alpha": 8, "target_modules": "all-linear",
                                                                           "loraplus_lr_ratio": 16}}), show_progress=False)
    assert result.after["loss"] < result.before["loss"]
    manifest = json.loads((result.adapter_dir / MANIFEST_FILE).read_text())
    assert manifest["method"]["options"]["loraplus_lr_ratio"] == 16
