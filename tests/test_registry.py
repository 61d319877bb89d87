"""The plugin manager and component registry, in process.

Plugins are built here as modules (``types.ModuleType``) or plain objects with ``@hookimpl``
functions and handed to ``build_plugin_system(extra_plugins=...)``, which registers them after
the entry points, exactly as installed plugins would be.
"""

from __future__ import annotations

import types
from typing import Any

import pytest

from plugtune import PluginError, hookimpl
from plugtune import registry as reg
from plugtune.kernel.components import NoOptions
from plugtune.kernel.registry import build_plugin_system, did_you_mean, unknown_name_message

# Distributions that tests/test_third_party_plugins.py installs for the length of its module.
# They are disabled here so that these tests see the same plugins however the suite is run.
TEST_DISTRIBUTIONS = ("plugtune-example-plugin", "plugtune-broken-plugin", "plugtune-dup-plugin")

BUILTINS = {
    "method": ["lora"],
    "loader": ["table"],
    "evaluator": ["accuracy", "f1", "loss", "perplexity"],
    "regularizer": ["weight_decay"],
    "model": ["smollm2-135m", "minilm-l6"],
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLUGTUNE_STRICT_PLUGINS", raising=False)
    monkeypatch.setenv("PLUGTUNE_DISABLE_PLUGINS", ",".join(TEST_DISTRIBUTIONS))


def disable(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    monkeypatch.setenv("PLUGTUNE_DISABLE_PLUGINS", ",".join((*TEST_DISTRIBUTIONS, *names)))


class Metric:
    """A do-nothing evaluator class to register."""

    Options = NoOptions

    def __init__(self, options: Any = None, task: Any = None) -> None:
        pass

    def reset(self) -> None:
        pass

    def update(self, batch: Any) -> None:
        pass

    def compute(self) -> dict[str, float]:
        return {}


def module_plugin(name: str, **hooks: Any) -> types.ModuleType:
    """A plugin module whose attributes are ``hooks`` marked with ``@hookimpl``."""
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        function.__name__ = hook_name
        setattr(module, hook_name, hookimpl(function))
    return module


def evaluators_plugin(name: str, *metric_names: str) -> types.ModuleType:
    def register_evaluators(register):
        for metric in metric_names:
            register(metric, Metric)

    return module_plugin(name, register_evaluators=register_evaluators)


def problems_mentioning(system: reg.PluginSystem, *words: str) -> list[str]:
    return [p for p in system.problems if all(w in p for w in words)]


# -- built-ins --------------------------------------------------------------------------------


def test_builtins_present_and_attributed_to_plugtune() -> None:
    system = build_plugin_system()
    assert system.problems == []
    for kind, names in BUILTINS.items():
        for name in names:
            component = system.get(kind, name)
            assert component.plugin.distribution == "plugtune", (kind, name)
            assert component.plugin.builtin
            assert component.kind == kind and component.name == name
    for info in system.plugins.values():
        assert info.builtin and info.distribution == "plugtune"
        assert info.module.startswith("plugtune.plugins."), info
    assert system.get("evaluator", "accuracy").plugin.name == "classification_metrics"
    assert system.get("method", "lora").options_model is not None


def test_extra_plugin_components_are_attributed_to_it() -> None:
    system = build_plugin_system(extra_plugins=[("mine", evaluators_plugin("my_pkg.plugin", "my_metric"))])
    component = system.get("evaluator", "my_metric")
    assert component.obj is Metric
    assert component.plugin.name == "mine"
    assert component.plugin.module == "my_pkg.plugin"
    assert not component.plugin.builtin
    assert "mine" in system.plugins


def test_plugin_may_be_an_object_with_hookimpl_methods() -> None:
    class Plugin:
        @hookimpl
        def register_evaluators(self, register):
            register("from_object", Metric)

    system = build_plugin_system(extra_plugins=[("objplugin", Plugin())])
    assert system.get("evaluator", "from_object").plugin.name == "objplugin"
    assert system.plugins["objplugin"].module == "Plugin"


# -- duplicates -------------------------------------------------------------------------------


def test_duplicate_of_a_builtin_is_refused_and_the_builtin_kept() -> None:
    from plugtune.plugins.evaluators.classification import Accuracy

    system = build_plugin_system(extra_plugins=[("dupe", evaluators_plugin("dupe", "accuracy", "dupe_only"))])
    component = system.get("evaluator", "accuracy")
    assert component.obj is Accuracy
    assert component.plugin.distribution == "plugtune"
    (problem,) = system.problems
    assert "'dupe'" in problem and "'classification_metrics'" in problem
    assert "evaluator 'accuracy'" in problem and "kept the first" in problem
    # the rest of the duplicating plugin still counts
    assert system.get("evaluator", "dupe_only").plugin.name == "dupe"


def test_duplicate_between_two_plugins_keeps_the_first_registered() -> None:
    system = build_plugin_system(extra_plugins=[
        ("first", evaluators_plugin("first", "shared")),
        ("second", evaluators_plugin("second", "shared")),
    ])
    assert system.get("evaluator", "shared").plugin.name == "first"
    (problem,) = system.problems
    assert problem.startswith("plugin 'second'") and "plugin 'first'" in problem


def test_duplicate_within_one_plugin_is_refused() -> None:
    system = build_plugin_system(extra_plugins=[("twice", evaluators_plugin("twice", "same", "same"))])
    assert system.get("evaluator", "same").plugin.name == "twice"
    assert len(problems_mentioning(system, "'twice'", "'same'")) == 1


def test_same_plugin_name_twice_is_skipped() -> None:
    system = build_plugin_system(extra_plugins=[
        ("twin", evaluators_plugin("a", "twin_a")),
        ("twin", evaluators_plugin("b", "twin_b")),
    ])
    assert "twin_a" in system.names("evaluator")
    assert "twin_b" not in system.names("evaluator")
    assert problems_mentioning(system, "'twin'", "same name")


# -- failures inside plugins ------------------------------------------------------------------


def _raising_plugin() -> types.ModuleType:
    def register_evaluators(register):
        register("never_seen", Metric)  # registered before the failure: dropped with it
        raise ValueError("cannot register today")

    def register_regularizers(register):
        register("still_fine", Metric)

    return module_plugin("raiser", register_evaluators=register_evaluators, register_regularizers=register_regularizers)


def test_plugin_raising_in_register_hook_is_skipped_others_keep_theirs() -> None:
    system = build_plugin_system(extra_plugins=[
        ("raiser", _raising_plugin()),
        ("bystander", evaluators_plugin("bystander", "bystander_metric")),
    ])
    assert "never_seen" not in system.names("evaluator")
    assert system.get("evaluator", "bystander_metric").plugin.name == "bystander"
    for kind, names in BUILTINS.items():
        assert set(names) <= set(system.names(kind))
    # only the hook that failed is lost, not the plugin's other hooks
    assert system.get("regularizer", "still_fine").plugin.name == "raiser"
    (problem,) = system.problems
    assert "'raiser'" in problem and "register_evaluators" in problem
    assert "ValueError: cannot register today" in problem
    assert "\n" not in problem


def test_bad_component_name_is_a_failure_of_that_hook() -> None:
    def register_evaluators(register):
        register("", Metric)

    system = build_plugin_system(extra_plugins=[("emptyname", module_plugin("e", register_evaluators=register_evaluators))])
    assert problems_mentioning(system, "'emptyname'", "register_evaluators", "non-empty")


def test_hookimpl_with_wrong_signature_is_not_registered() -> None:
    def register_evaluators(register, colour):
        register("wrong_signature", Metric)

    system = build_plugin_system(extra_plugins=[
        ("wrongsig", module_plugin("w", register_evaluators=register_evaluators)),
        ("bystander", evaluators_plugin("bystander", "bystander_metric")),
    ])
    assert "wrongsig" not in system.plugins
    assert "wrong_signature" not in system.names("evaluator")
    assert "bystander_metric" in system.names("evaluator")
    assert problems_mentioning(system, "'wrongsig'", "could not be registered")


def test_plugin_failing_to_import_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    original = reg._entry_points

    def boom() -> Any:
        raise RuntimeError("boom at import")

    def entry_points() -> Any:
        yield from original()
        yield "exploding", boom, "exploding-dist", "1.2.3"

    monkeypatch.setattr(reg, "_entry_points", entry_points)
    system = build_plugin_system()
    assert "exploding" not in system.plugins
    (problem,) = system.problems
    assert problem == ("plugin 'exploding' (distribution exploding-dist 1.2.3) failed to import: "
                       "RuntimeError: boom at import")
    assert set(BUILTINS["evaluator"]) <= set(system.names("evaluator"))

    disable(monkeypatch, "exploding-dist")  # by distribution name
    assert build_plugin_system().problems == []


# -- strict mode ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["raises", "duplicate", "misspelt", "import"])
def test_strict_mode_turns_problems_into_errors(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    monkeypatch.setenv("PLUGTUNE_STRICT_PLUGINS", "1")
    extra: list[tuple[str, Any]] = []
    if case == "raises":
        extra = [("raiser", _raising_plugin())]
    elif case == "duplicate":
        extra = [("dupe", evaluators_plugin("dupe", "accuracy"))]
    elif case == "misspelt":
        extra = [("typo", module_plugin("typo", register_evaluator=lambda register: None))]
    else:
        original = reg._entry_points

        def entry_points() -> Any:
            yield from original()
            yield "exploding", (lambda: 1 / 0), "exploding-dist", "1.2.3"

        monkeypatch.setattr(reg, "_entry_points", entry_points)
    expected = {"raises": "'raiser'", "duplicate": "'dupe'", "misspelt": "'typo'", "import": "'exploding'"}[case]
    with pytest.raises(PluginError, match="PLUGTUNE_STRICT_PLUGINS=1") as info:
        build_plugin_system(extra_plugins=extra)
    assert expected in str(info.value)
    assert info.value.exit_code == PluginError.exit_code


def test_strict_mode_is_quiet_when_nothing_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUGTUNE_STRICT_PLUGINS", "1")
    system = build_plugin_system(extra_plugins=[("mine", evaluators_plugin("mine", "my_metric"))])
    assert system.strict and system.problems == []


# -- disabling --------------------------------------------------------------------------------


def test_disable_plugins_removes_the_table_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    disable(monkeypatch, "table")
    system = build_plugin_system()
    assert "table" not in system.plugins
    assert "table" not in system.names("loader")
    assert "lora" in system.names("method")
    with pytest.raises(PluginError, match="unknown data loader 'table'"):
        system.get("loader", "table")
    assert system.problems == []


def test_disable_plugins_accepts_spaces_and_several_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUGTUNE_DISABLE_PLUGINS", " table , weight_decay ,," + ",".join(TEST_DISTRIBUTIONS))
    system = build_plugin_system()
    assert "table" not in system.names("loader") and "weight_decay" not in system.names("regularizer")
    assert "text" in system.names("loader")  # the rest stay
    assert "accuracy" in system.names("evaluator")


# -- misspelt hooks ---------------------------------------------------------------------------


def test_misspelt_hookimpl_is_reported_and_its_plugin_dropped() -> None:
    def register_evaluator(register):  # missing "s": matches no hookspec
        register("typo_metric", Metric)

    def register_regularizers(register):
        register("typo_regularizer", Metric)

    typo = module_plugin("typo", register_evaluator=register_evaluator, register_regularizers=register_regularizers)
    system = build_plugin_system(extra_plugins=[
        ("typo", typo),
        ("bystander", evaluators_plugin("bystander", "bystander_metric")),
    ])
    (problem,) = system.problems
    assert "'typo'" in problem and "register_evaluator" in problem
    assert "typo" not in system.plugins
    assert "typo_metric" not in system.names("evaluator")
    assert "typo_regularizer" not in system.names("regularizer")  # the whole plugin is dropped
    assert system.get("evaluator", "bystander_metric").plugin.name == "bystander"
    assert set(BUILTINS["evaluator"]) <= set(system.names("evaluator"))


def test_every_plugin_with_a_misspelt_hookimpl_is_reported() -> None:
    system = build_plugin_system(extra_plugins=[
        ("typo1", module_plugin("typo1", register_evaluator=lambda register: None)),
        ("typo2", module_plugin("typo2", register_evalutors=lambda register: None)),
    ])
    assert "typo1" not in system.plugins and "typo2" not in system.plugins
    assert len(system.problems) == 2


# -- lifecycle hooks --------------------------------------------------------------------------


def test_call_lifecycle_passes_the_arguments_each_hook_names() -> None:
    seen: list[Any] = []

    def on_step_end(step, metrics):
        seen.append((step, metrics["loss"]))

    def on_train_end(adapter_dir):
        seen.append(adapter_dir)

    system = build_plugin_system(extra_plugins=[("listener", module_plugin("l", on_step_end=on_step_end, on_train_end=on_train_end))])
    system.call_lifecycle("on_step_end", run=object(), step=3, metrics={"loss": 0.5})
    system.call_lifecycle("on_train_end", run=object(), adapter_dir="out", metrics={})
    assert seen == [(3, 0.5), "out"]


def test_call_lifecycle_failure_names_plugin_and_hook() -> None:
    calls: list[str] = []

    def quiet_step_end(step):
        calls.append("quiet")

    def noisy_step_end(run, step, metrics):
        raise KeyError("no such metric")

    system = build_plugin_system(extra_plugins=[
        ("quiet", module_plugin("q", on_step_end=quiet_step_end)),
        ("noisy", module_plugin("n", on_step_end=noisy_step_end)),
    ])
    system.call_lifecycle("on_train_start", run=object())  # nobody implements it: fine
    with pytest.raises(PluginError) as info:
        system.call_lifecycle("on_step_end", run=object(), step=1, metrics={"loss": 1.0})
    message = str(info.value)
    assert "'noisy'" in message and "on_step_end" in message and "KeyError" in message
    assert "'quiet'" not in message
    assert isinstance(info.value.__cause__, KeyError)
    # last registered runs first (pluggy's order), so the quiet one was not reached
    assert calls == []


# -- did you mean -----------------------------------------------------------------------------


def test_unknown_name_message_suggests_a_close_name() -> None:
    message = unknown_name_message("evaluator", "acuracy", ["accuracy", "f1", "loss"])
    assert message.startswith("unknown evaluator 'acuracy'")
    assert "did you mean 'accuracy'?" in message
    assert "installed: accuracy, f1, loss" in message


def test_unknown_name_message_without_a_close_name() -> None:
    message = unknown_name_message("loader", "parquet", ["table"])
    assert "did you mean" not in message
    assert message == "unknown data loader 'parquet' (installed: table)"
    assert unknown_name_message("regularizer", "dropout", []).endswith("(installed: none)")
    assert did_you_mean("lroa", ["lora"]) == "; did you mean 'lora'?"


def test_registry_get_raises_with_did_you_mean() -> None:
    system = build_plugin_system()
    with pytest.raises(PluginError, match=r"unknown evaluator 'perplexty'; did you mean 'perplexity'\?"):
        system.get("evaluator", "perplexty")
    assert system.find("evaluator", "perplexty") is None


# -- names that ignore case, plugins that failed to import, no second list of built-ins --------


def test_did_you_mean_ignores_case() -> None:
    assert did_you_mean("IA3", ["ia3", "lora"]) == "; did you mean 'ia3'?"
    assert did_you_mean("LoRA", ["full", "lora"]) == "; did you mean 'lora'?"
    assert build_plugin_system().unknown_message("method", "LoRA").startswith("unknown tuning method 'LoRA'; did you mean 'lora'?")


def _with_broken(monkeypatch: pytest.MonkeyPatch, name: str, dist: str) -> None:
    original = reg._entry_points

    def boom() -> Any:
        raise ImportError("No module named 'torch_rdrop'")

    def entry_points() -> Any:
        yield from original()
        yield name, boom, dist, "0.3"

    monkeypatch.setattr(reg, "_entry_points", entry_points)


def test_a_component_of_a_plugin_that_failed_to_import_is_reported_as_such(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from plugtune.kernel.errors import RecipeError
    from plugtune.training.recipe import load_recipe

    _with_broken(monkeypatch, "rdrop", "plugtune-rdrop")
    system = build_plugin_system()
    assert [(f.name, f.distribution) for f in system.failed] == [("rdrop", "plugtune-rdrop")]
    (tmp_path / "d.csv").write_text("text,label\na,x\nb,y\n")
    raw = {"name": "r", "base_model": "org/m", "task": {"type": "sequence-classification", "text": "{text}"},
           "data": {"loader": "table", "options": {"path": "d.csv"}}, "method": "lora", "regularizers": ["rdrop"]}
    with pytest.raises(RecipeError) as info:
        load_recipe(raw=raw, base_dir=tmp_path, plugins=system)
    assert info.value.problems == [
        "regularizers[0].name: regularizer 'rdrop' comes from plugin 'rdrop' (distribution plugtune-rdrop 0.3), "
        "which failed to import: ImportError: No module named 'torch_rdrop'; fix or reinstall that distribution"]
    # an unknown name while some plugin is broken: no misleading did-you-mean alone, the broken plugin is named
    message = system.unknown_message("regularizer", "dropot")
    assert "did you mean 'dropout'" in message and "plugin 'rdrop' (distribution plugtune-rdrop 0.3)" in message
    # what the host calls for an adapter whose manifest names the plugin and its distribution
    assert system.failed_plugin_message("method", "rd", plugin="other", distribution="plugtune-rdrop").startswith(
        "tuning method 'rd' comes from plugin 'rdrop' (distribution plugtune-rdrop 0.3), which failed to import")
    assert system.failed_plugin_message("method", "lora", plugin="lora", distribution="plugtune") is None


def test_without_an_installed_plugtune_distribution_it_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """The built-ins come only from the installed distribution's entry points: no fallback list."""
    assert not hasattr(reg, "_BUILTIN_FALLBACK")
    monkeypatch.setattr(reg, "_entry_points", lambda: iter(()))
    system = build_plugin_system()
    assert system.names("method") == [] and system.problems == [reg.NOT_INSTALLED]
    assert "pip install -e ." in reg.NOT_INSTALLED
