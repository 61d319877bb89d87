"""The two sides of a tuning method: what ``prepare`` receives (``PrepareContext``, and the
older two-argument form), how a method names its handler (``handler``, the deprecated
``hosted_by``, the pre-split single class), and how a manifest finds its handler."""

from __future__ import annotations

from typing import Any

import pytest

from plugtune.artifacts.adapters import Manifest
from plugtune.artifacts.handlers import resolve_handler
from plugtune.artifacts.models import load_base
from plugtune.data.tasks import build_task
from plugtune.kernel.components import (
    Combines, Folds, Merges, MixesRows, NoOptions, PrepareContext, ReportsResidentBytes, StartsDecoding,
    call_prepare, handler_class, mixes_rows,
)
from plugtune.kernel.errors import AdapterError
from plugtune.kernel.registry import FailedPlugin, build_plugin_system
from plugtune.plugins.methods.full import FullHandler, FullMethod
from plugtune.plugins.methods.int8 import Int8Method
from plugtune.plugins.methods.lora import LoraHandler, LoraMethod
from plugtune.plugins.methods.prefix import PrefixHandler, PrefixMethod


class TwoArguments:
    def prepare(self, model: Any, task: Any) -> Any:
        return ("two", model, task)


class ThreeArguments:
    def prepare(self, model: Any, task: Any, context: PrepareContext) -> Any:
        return ("three", model, task, context)


def test_call_prepare_passes_the_context_only_to_methods_that_take_it():
    context = PrepareContext(new_parameters=frozenset({"score.weight"}), seed=3)
    assert call_prepare(TwoArguments(), "m", "t", context) == ("two", "m", "t")
    assert call_prepare(ThreeArguments(), "m", "t", context) == ("three", "m", "t", context)


class OldSingleClass:
    """A method written before the split: host members on the method class itself."""

    Options = NoOptions

    def attach(self, model, name, state, config): return model
    def activate(self, model, name): pass
    def detach(self, model, name): pass


class OldHostedElsewhere:
    hosted_by = OldSingleClass


class OldHostedByLora:
    hosted_by = LoraMethod


def test_a_method_names_its_handler_or_is_its_own():
    assert handler_class(LoraMethod) is LoraHandler
    assert handler_class(Int8Method) is LoraHandler  # int8 training makes LoRA adapters
    assert handler_class(FullMethod) is FullHandler
    assert handler_class(PrefixMethod) is PrefixHandler
    assert handler_class(OldSingleClass) is OldSingleClass
    assert handler_class(OldHostedElsewhere) is OldSingleClass  # hosted_by: the deprecated alias
    assert handler_class(OldHostedByLora) is LoraHandler  # ... followed to the named method's handler


def test_the_built_in_handlers_declare_their_capabilities():
    capabilities = (MixesRows, Folds, Merges, StartsDecoding, ReportsResidentBytes, Combines)
    declared = {cls.__name__: {c.__name__ for c in capabilities if issubclass(cls, c)}
                for cls in (LoraHandler, FullHandler, PrefixHandler)}
    assert declared == {"LoraHandler": {"MixesRows", "Folds", "Merges", "ReportsResidentBytes", "Combines"},
                        "FullHandler": {"Folds", "Merges"}, "PromptLearningHandler": {"StartsDecoding", "ReportsResidentBytes"}}
    assert mixes_rows(LoraHandler(LoraHandler.Options())) and not mixes_rows(FullHandler(FullHandler.Options()))


def test_the_loader_reports_new_parameters_without_touching_the_model(tiny_llama):
    base = load_base(str(tiny_llama), build_task(dict(type="sequence-classification", text="{t}", label="y", labels=["a", "b"])))
    assert base.new_parameters == frozenset({"score.weight"})
    assert not hasattr(base.model, "plugtune_new_parameters")
    assert load_base(str(tiny_llama), build_task(dict(type="causal-lm", prompt="{q}", response="{a}"))).new_parameters == frozenset()


def _manifest(**method: Any) -> Manifest:
    return Manifest.model_validate({"name": "a", "method": method, "base_model": {"id": "x", "fingerprint": "sha256:0"},
                                    "task": {"type": "causal-lm"}})


def test_resolve_handler_validates_the_recorded_options_against_the_handler():
    plugins = build_plugin_system()
    spec = resolve_handler(_manifest(name="int8", options={"r": 4, "optimizer_8bit": True}), plugins, subject="adapter 'a'")
    assert spec.cls is LoraHandler and spec.options.r == 4 and spec.method.name == "int8"
    with pytest.raises(AdapterError, match=r"^adapter 'a': its lora options are invalid \("):
        resolve_handler(_manifest(name="lora", options={"r": -1}), plugins, subject="adapter 'a'")


def test_a_method_whose_plugin_failed_to_import_is_named_as_such():
    plugins = build_plugin_system()
    plugins.failed.append(FailedPlugin("dora", "plugtune-dora", "9.9", "ModuleNotFoundError: No module named 'dora_kernels'"))
    manifest = _manifest(name="dora-x", plugin="dora", distribution="plugtune-dora", version="9.9")
    with pytest.raises(AdapterError) as err:
        resolve_handler(manifest, plugins, subject="adapter 'a'")
    assert str(err.value) == (
        "adapter 'a': tuning method 'dora-x' comes from plugin 'dora' (distribution plugtune-dora 9.9), which failed "
        "to import: ModuleNotFoundError: No module named 'dora_kernels'; fix or reinstall that distribution")


class LegacyStepLora(LoraMethod):
    """A third-party method written against the two-argument ``prepare``, with a per-step hook."""

    steps: list[int] = []

    def prepare(self, model: Any, task: Any) -> Any:
        return super().prepare(model, task, PrepareContext())

    def on_step(self, model: Any, step: int) -> None:
        assert any(p.requires_grad for p in model.parameters())
        type(self).steps.append(step)


class LegacyPlugin:
    from plugtune import hookimpl

    @hookimpl
    def register_tuning_methods(self, register):
        register("legacy-lora", LegacyStepLora)


def test_a_two_argument_method_trains_and_its_step_hook_runs_after_every_optimizer_step(make_recipe):
    import plugtune
    from plugtune.kernel.registry import set_plugin_system
    from plugtune.serving.host import AdapterHost

    LegacyStepLora.steps = []
    plugins = build_plugin_system(extra_plugins=[("legacy", LegacyPlugin())])
    set_plugin_system(plugins)
    try:
        path = make_recipe(name="legacy", method={"name": "legacy-lora", "options": {"r": 2}},
                           training={"max_steps": 3, "batch_size": 4, "grad_accum": 2, "device": "cpu", "learning_rate": 1e-2})
        result = plugtune.run(path, show_progress=False)
        assert LegacyStepLora.steps == [1, 2, 3]  # once per optimizer step, not per micro-batch
        host = AdapterHost.from_adapters(result.adapter_dir, plugins=plugins)
        assert type(next(iter(host.handlers.values()))) is LoraHandler
    finally:
        set_plugin_system(None)
