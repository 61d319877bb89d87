"""learning_rate: auto — the documented rule, every built-in method's reference, the new head's
own rate, and the choice printed and recorded."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from plugtune.kernel.registry import get_plugin_system
from plugtune.training.rates import (
    ENCODER_FACTOR, FALLBACK_RATE, NEW_LAYER_RATE, REFERENCE_BATCH, REFERENCE_WIDTH, choose_rates, is_new_parameter, model_width, scaled,
    with_head_rate,
)
from plugtune.training.recipe import load_recipe
from plugtune.training.train import run


def test_the_rule_scales_inversely_with_width_and_with_the_root_of_the_batch() -> None:
    assert scaled(2e-3, REFERENCE_WIDTH, REFERENCE_BATCH) == 2e-3
    assert scaled(2e-3, 2 * REFERENCE_WIDTH, REFERENCE_BATCH) == 1e-3
    assert scaled(2e-3, REFERENCE_WIDTH, 4 * REFERENCE_BATCH) == 4e-3
    assert scaled(2e-3, 4096, 16) == 2.5e-4  # LoRA on a 7B-wide model: the rate its users train at


def test_width_comes_from_the_config_whatever_it_calls_it() -> None:
    assert model_width(SimpleNamespace(hidden_size=576)) == 576
    assert model_width(SimpleNamespace(n_embd=768)) == 768
    assert model_width(SimpleNamespace(text_config=SimpleNamespace(hidden_size=2048))) == 2048
    assert model_width(SimpleNamespace()) == REFERENCE_WIDTH


def test_every_built_in_method_declares_its_reference_rate() -> None:
    system = get_plugin_system()
    built_in = [c for c in (system.get("method", n) for n in system.names("method")) if c.plugin.builtin]
    assert len(built_in) >= 15
    for component in built_in:
        assert callable(getattr(component.obj, "reference_learning_rate", None)), component.name


def test_encoders_take_the_encoder_share_and_decoders_the_whole_rule() -> None:
    from transformers import BertConfig, GPT2Config, LlamaConfig

    lora = SimpleNamespace(reference_learning_rate=lambda: 2e-3)
    encoder = choose_rates(lora, BertConfig(hidden_size=384), 32, has_new_layer=True)
    assert encoder.factor == ENCODER_FACTOR < 1 and "an encoder" in encoder.describe()
    assert encoder.adapter == scaled(2e-3, 384, 32, ENCODER_FACTOR) and encoder.head == scaled(NEW_LAYER_RATE, 384, 32, ENCODER_FACTOR)
    for config in (LlamaConfig(hidden_size=576), GPT2Config(n_embd=576)):
        decoder = choose_rates(lora, config, 16, has_new_layer=False)
        assert decoder.factor == 1.0 and decoder.adapter == scaled(2e-3, 576, 16) and "encoder" not in decoder.describe()


def test_a_method_without_a_reference_gets_the_fallback_and_says_so() -> None:
    rates = choose_rates(object(), SimpleNamespace(hidden_size=REFERENCE_WIDTH), REFERENCE_BATCH, has_new_layer=False)
    assert rates.adapter == FALLBACK_RATE and not rates.declared and "declares no reference" in rates.describe()
    assert rates.head is None


def test_a_new_head_gets_a_fresh_layers_rate_in_groups_of_its_own() -> None:
    full = SimpleNamespace(reference_learning_rate=lambda: 2e-4)
    rates = choose_rates(full, SimpleNamespace(hidden_size=256), 8, has_new_layer=True)
    assert rates.adapter == scaled(2e-4, 256, 8) and rates.head == scaled(NEW_LAYER_RATE, 256, 8)
    body, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    named = [("base_model.model.bert.layer.0.weight", body), ("base_model.model.classifier.modules_to_save.default.weight", head)]
    groups = with_head_rate([{"params": [body, head], "weight_decay": 0.1}], named, frozenset({"classifier.weight"}), rates.head)
    assert [(g["params"], g.get("lr"), g["weight_decay"]) for g in groups] == [([body], None, 0.1), ([head], rates.head, 0.1)]
    assert not is_new_parameter("bert.classifier_norm.weight", frozenset({"classifier.weight"}))


def test_auto_trains_at_the_rule_s_rate_and_records_it(make_recipe, tmp_path: Path, capsys) -> None:
    out = tmp_path / "auto"
    path = make_recipe(classification=True, training={"learning_rate": "auto", "max_steps": 4, "batch_size": 4,
                                                      "device": "cpu", "max_length": 48, "eval_before": False,
                                                      "scheduler": "constant"}, output={"dir": str(out)})
    recipe = load_recipe(path)
    run(recipe, show_progress=False)
    record = json.loads((out / "plugtune.json").read_text())["training"]["learning_rate"]
    config = json.loads((Path(recipe.spec.base_model) / "config.json").read_text())
    assert record["auto"] and record["width"] == config["hidden_size"] and record["rows_per_step"] == 4
    assert record["factor"] == ENCODER_FACTOR  # the tiny classifier is a BERT encoder
    assert record["adapter"] == scaled(2e-3, config["hidden_size"], 4, ENCODER_FACTOR)  # LoRA's reference
    assert record["head"] == scaled(NEW_LAYER_RATE, config["hidden_size"], 4, ENCODER_FACTOR)  # the new head
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["lr"] for r in records if r.get("event") == "train"}
    assert lrs == {record["adapter"]}  # the first group's (the adapter's) rate, constant schedule
    assert "learning_rate auto:" in capsys.readouterr().err


def test_a_fixed_rate_is_recorded_as_given(make_recipe, tmp_path: Path) -> None:
    out = tmp_path / "fixed"
    path = make_recipe(training={"learning_rate": 3e-3, "max_steps": 2, "batch_size": 4, "device": "cpu",
                                 "max_length": 48, "eval_before": False}, output={"dir": str(out)})
    run(load_recipe(path), show_progress=False)
    assert json.loads((out / "plugtune.json").read_text())["training"]["learning_rate"] == 3e-3


@pytest.mark.parametrize("value", ["fast", -1, 0, float("nan")])
def test_a_bad_rate_is_a_validation_error(make_recipe, value) -> None:
    from plugtune.kernel.errors import RecipeError

    path = make_recipe(training={"learning_rate": value, "device": "cpu"})
    with pytest.raises(RecipeError, match=r"training\.learning_rate"):
        load_recipe(path)


def test_rule_constants_are_sane() -> None:
    assert math.isclose(scaled(NEW_LAYER_RATE, REFERENCE_WIDTH, REFERENCE_BATCH), NEW_LAYER_RATE)
