"""Validation that sees the model: components check a recipe against the base model's
outline (config and module names, built on the meta device) before any weight loads."""

from __future__ import annotations

import json

from pathlib import Path
from typing import Any

import pytest
import yaml

from plugtune import hookimpl
from plugtune.artifacts.outline import outline_for
from plugtune.cli import main
from plugtune.kernel.components import ChecksModel, ComponentOptions
from plugtune.kernel.errors import RecipeError
from plugtune.kernel.registry import build_plugin_system, set_plugin_system
from plugtune.testing import recipe_dict
from plugtune.training.recipe import load_recipe

LLAMA_SUFFIXES = "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load a model's weights fails the test."""
    import safetensors
    import transformers

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("validation loaded weights")

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(auto, "from_pretrained", forbidden)
    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    monkeypatch.setattr("safetensors.torch.load_file", forbidden)


def _write(tmp_path: Path, recipe: dict[str, Any]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _lora(**options: Any) -> dict[str, Any]:
    return {"name": "lora", "options": {"r": 4, **options}}


def test_target_modules_matching_nothing_fails_validate_without_loading_weights(
    tmp_path: Path, tiny_llama: Path, tiny_data: Path, no_weights: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, recipe_dict(tiny_llama, tiny_data, method=_lora(target_modules=["q_projj"])))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "method.options" in line)
    assert line.endswith(
        "method.options.target_modules: ['q_projj'] matches no linear layer of this model "
        f"(its linear layers end in: {LLAMA_SUFFIXES})"
    )


def test_matching_targets_pass_without_loading_weights(tiny_llama: Path, tiny_data: Path, no_weights: None) -> None:
    for options in ({"target_modules": ["q_proj", "v_proj"]}, {"target_modules": ["self_attn.o_proj"]},
                    {"target_modules": "all-linear"}, {"target_regex": r".*\.mlp\.(up|down)_proj"}):
        recipe = load_recipe(raw=recipe_dict(tiny_llama, tiny_data, method=_lora(**options)))
        assert recipe.method.name == "lora"


def test_target_regex_matching_nothing_fails(tiny_llama: Path, tiny_data: Path, no_weights: None) -> None:
    # a suffix is not a full match: the regex must cover the whole dotted name
    with pytest.raises(RecipeError) as caught:
        load_recipe(raw=recipe_dict(tiny_llama, tiny_data, method=_lora(target_regex="q_proj")))
    assert caught.value.problems == [
        "method.options.target_regex: 'q_proj' matches no linear layer of this model "
        f"(its linear layers end in: {LLAMA_SUFFIXES})"
    ]


def test_int8_inherits_the_check(tiny_llama: Path, tiny_data: Path, no_weights: None) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(raw=recipe_dict(tiny_llama, tiny_data, method={"name": "int8", "options": {"target_modules": ["qkv"]}}))
    assert any(p.startswith("method.options.target_modules: ['qkv'] matches no linear layer") for p in caught.value.problems)


def test_sequence_classification_on_bert_uses_the_classifier_skeleton(
    tiny_bert: Path, tiny_data: Path, no_weights: None
) -> None:
    recipe = load_recipe(raw=recipe_dict(tiny_bert, tiny_data, classification=True,
                                         method=_lora(target_modules=["query", "value"])))
    outline = outline_for(str(tiny_bert), recipe.task)
    assert outline is not None and outline.head == "classifier"
    assert "classifier" in outline.linear_names()  # the head the classifier task loads, not a bare BertModel
    assert "bert.encoder.layer.0.attention.self.query" in outline.linear_names()
    assert all(str(p.device) == "meta" for p in outline.skeleton.parameters())
    with pytest.raises(RecipeError) as caught:
        load_recipe(raw=recipe_dict(tiny_bert, tiny_data, classification=True, method=_lora(target_modules=["q_proj"])))
    [problem] = caught.value.problems
    assert problem.startswith("method.options.target_modules: ['q_proj'] matches no linear layer of this model")
    assert "classifier, dense, key, query, value" in problem


def test_a_base_model_that_is_not_local_skips_the_check(tiny_llama: Path, tiny_data: Path, no_weights: None) -> None:
    recipe = load_recipe(raw=recipe_dict("org/name", tiny_data, method=_lora(target_modules=["q_projj"])))
    assert outline_for("org/name", recipe.task) is None


class _Unfetched:
    description = "an alias whose weights are not here yet"

    def local(self) -> None:
        return None

    def locate(self) -> Path:
        raise AssertionError("validation fetched a model")


class LayerOptions(ComponentOptions):
    layer: str


class LayerNoise:
    """A third-party regularizer that names a module of the model in its options."""

    Options = LayerOptions

    def __init__(self, options: LayerOptions) -> None:
        self.options = options

    def check_model(self, outline: Any, task: Any) -> list[str]:
        if self.options.layer in outline.module_names():
            return []
        return [f"options.layer: no module {self.options.layer!r} in this {outline.config.model_type} model"]


class ThirdParty:
    @hookimpl
    def register_regularizers(self, register):
        register("layer_noise", LayerNoise)

    @hookimpl
    def register_base_models(self, register):
        register("not-here-yet", _Unfetched())


@pytest.fixture
def third_party() -> Any:
    set_plugin_system(build_plugin_system(extra_plugins=[("third-party", ThirdParty())]))
    try:
        yield
    finally:
        set_plugin_system(None)


def test_a_third_party_components_problems_carry_its_block_path(
    tiny_llama: Path, tiny_data: Path, third_party: None, no_weights: None
) -> None:
    assert isinstance(LayerNoise(LayerOptions(layer="x")), ChecksModel)
    ok = [{"name": "layer_noise", "options": {"layer": "model.layers.1.mlp"}}]
    load_recipe(raw=recipe_dict(tiny_llama, tiny_data, regularizers=ok))
    bad = [{"name": "layer_noise", "options": {"layer": "model.layers.7.mlp"}}]
    with pytest.raises(RecipeError) as caught:
        load_recipe(raw=recipe_dict(tiny_llama, tiny_data, regularizers=bad,
                                    method=_lora(target_modules=["nope"])))
    problems = caught.value.problems
    assert "regularizers[0].options.layer: no module 'model.layers.7.mlp' in this llama model" in problems
    assert any(p.startswith("method.options.target_modules: ['nope']") for p in problems)  # both, in one error


def test_an_alias_whose_weights_are_not_local_is_not_fetched(tiny_data: Path, third_party: None) -> None:
    recipe = load_recipe(raw=recipe_dict("not-here-yet", tiny_data, method=_lora(target_modules=["q_projj"])))
    assert outline_for("not-here-yet", recipe.task) is None


def test_an_adapter_used_as_base_is_checked_against_its_own_base(tmp_path: Path, tiny_llama: Path, tiny_data: Path) -> None:
    from plugtune.artifacts.models import load_base
    from plugtune.plugins.methods.lora import random_lora_adapter

    task = load_recipe(raw=recipe_dict(tiny_llama, tiny_data)).task
    adapter = random_lora_adapter(tmp_path / "earlier", load_base(str(tiny_llama), task), task)
    load_recipe(raw=recipe_dict(adapter, tiny_data, method=_lora(target_modules=["o_proj"])))
    with pytest.raises(RecipeError) as caught:
        load_recipe(raw=recipe_dict(adapter, tiny_data, method=_lora(target_modules=["wq"])))
    assert caught.value.problems[0].startswith("method.options.target_modules: ['wq'] matches no linear layer")


def test_the_structure_is_built_once_then_read_from_the_cache(tiny_llama: Path, tiny_data: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUGTUNE_HOME", str(tmp_path / "home"))
    task = load_recipe(raw=recipe_dict(tiny_llama, tiny_data)).task
    first = outline_for(str(tiny_llama), task)
    assert first.parameter_shapes()["model.layers.0.self_attn.k_proj.weight"] == (16, 32)  # 2 kv heads of 8
    assert first.skeleton is first.skeleton
    assert len(list((tmp_path / "home" / "outlines").glob("*.json"))) == 1

    def no_skeleton(self: object) -> None:
        raise AssertionError("the cached structure should have been read")

    monkeypatch.setattr(type(first), "skeleton", property(no_skeleton))
    second = outline_for(str(tiny_llama), task)
    assert second is not first and second.linear_names() == first.linear_names()
    assert second.parameter_shapes() == first.parameter_shapes()

@pytest.mark.parametrize("planted", ["{not json", "[]", '{"modules": [1], "linear": [], "parameters": {}}'])
def test_a_damaged_structure_cache_entry_is_a_miss_with_a_note(planted: str, tiny_llama: Path, tiny_data: Path,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PLUGTUNE_HOME", str(tmp_path / "home"))
    task = load_recipe(raw=recipe_dict(tiny_llama, tiny_data)).task
    good = outline_for(str(tiny_llama), task).linear_names()
    (entry,) = (tmp_path / "home" / "outlines").glob("*.json")
    entry.write_text(planted)
    assert outline_for(str(tiny_llama), task).linear_names() == good
    assert f"model outline cache entry {entry.name} unreadable" in capsys.readouterr().err
    assert json.loads(entry.read_text())["linear"] == good  # rewritten whole
