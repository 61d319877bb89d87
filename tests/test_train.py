"""The training loop on tiny models: it learns, it is deterministic, it logs, it calls the
lifecycle hooks, regularizers act, and a diverging loss stops the run with a clear error."""

from __future__ import annotations

import json

import pytest
import torch

import plugtune
from plugtune import hookimpl
from plugtune.artifacts.adapters import WEIGHTS_FILE
from plugtune.kernel.components import ComponentOptions
from plugtune.kernel.errors import TrainingError
from plugtune.kernel.registry import build_plugin_system, set_plugin_system


def _train_losses(adapter_dir):
    records = [json.loads(l) for l in (adapter_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"]


def test_causal_lm_learns(make_recipe):
    result = plugtune.run(make_recipe(), show_progress=False)
    assert result.after["loss"] < result.before["loss"] - 0.3
    assert result.after["accuracy"] > result.before["accuracy"]
    assert result.after["perplexity"] < result.before["perplexity"]
    losses = _train_losses(result.adapter_dir)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert result.steps == 8
    assert 0 < result.trainable_parameters < result.total_parameters / 5


def test_classification_learns(make_recipe):
    result = plugtune.run(make_recipe(classification=True), show_progress=False)
    assert result.after["loss"] < result.before["loss"]
    assert result.after["accuracy"] > result.before["accuracy"]


def test_same_seed_same_adapter_bytes(make_recipe, tmp_path):
    first = plugtune.run(make_recipe(), show_progress=False)
    one = (first.adapter_dir / WEIGHTS_FILE).read_bytes()
    second = plugtune.run(make_recipe(), show_progress=False, overwrite=True)
    assert (second.adapter_dir / WEIGHTS_FILE).read_bytes() == one
    assert first.after == second.after


def test_eval_cadence_and_metrics_log(make_recipe):
    result = plugtune.run(make_recipe(training={"max_steps": 6, "batch_size": 4, "eval_every": 2, "learning_rate": 2e-2, "device": "cpu"}), show_progress=False)
    records = [json.loads(l) for l in (result.adapter_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["when"]) for r in records if r["event"] == "eval"]
    assert evals == [(0, "before"), (2, "during"), (4, "during"), (6, "after")]
    train = [r for r in records if r["event"] == "train"]
    assert all({"loss", "lr", "tokens_per_s"} <= set(r) for r in train)
    assert train[0]["lr"] > train[-1]["lr"]  # linear decay


def test_weight_decay_shrinks_lora_weights(make_recipe):
    def norm(strength):
        recipe = make_recipe(regularizers=[{"name": "weight_decay", "options": {"strength": strength}}])
        result = plugtune.run(recipe, show_progress=False, overwrite=True)
        records = [json.loads(l) for l in (result.adapter_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["weight_decay/norm"] for r in records if r["event"] == "train"][-1]

    assert norm(50.0) < 0.9 * norm(0.0)


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def on_train_start(self, run):
        self.calls.append(("start", run.total_steps))

    @hookimpl
    def on_step_end(self, step, metrics):
        self.calls.append(("step", step, round(metrics["loss"], 6)))

    @hookimpl
    def on_evaluate(self, split, step):
        self.calls.append(("eval", split, step))

    @hookimpl
    def on_train_end(self, adapter_dir, metrics):
        self.calls.append(("end", adapter_dir, "loss" in metrics))


def test_lifecycle_hooks_are_called_in_order(make_recipe):
    recorder = Recorder()
    set_plugin_system(build_plugin_system(extra_plugins=[("recorder", recorder)]))
    try:
        result = plugtune.run(make_recipe(training={"max_steps": 3, "batch_size": 4, "device": "cpu"}), show_progress=False)
    finally:
        set_plugin_system(None)
    kinds = [c[0] for c in recorder.calls]
    assert kinds == ["start", "eval", "step", "step", "step", "eval", "end"]
    assert recorder.calls[0] == ("start", 3)
    assert recorder.calls[-1] == ("end", str(result.adapter_dir), True)


class ExplodingOptions(ComponentOptions):
    at_step: int = 2


class Exploding:
    """A regularizer whose loss term becomes NaN: the run must stop with a clear error."""

    Options = ExplodingOptions

    def __init__(self, options):
        self.options = options

    def loss_term(self, model, batch, outputs, step):
        return torch.tensor(float("nan")) if step + 1 >= self.options.at_step else None


class ExplodingPlugin:
    @hookimpl
    def register_regularizers(self, register):
        register("exploding", Exploding)


def test_nan_loss_stops_with_step_and_leaves_no_adapter(make_recipe, tmp_path):
    set_plugin_system(build_plugin_system(extra_plugins=[("exploding", ExplodingPlugin())]))
    try:
        recipe = make_recipe(regularizers=[{"name": "exploding", "options": {"at_step": 3}}])
        with pytest.raises(TrainingError, match="loss became nan at step 3"):
            plugtune.run(recipe, show_progress=False)
    finally:
        set_plugin_system(None)
    assert not (tmp_path / "adapters" / "tiny" / WEIGHTS_FILE).exists()


# -- saving the adapter fails after training: the weights survive ----------------------------


class FragileLora:
    """The built-in LoRA method whose ``adapter_state`` raises while ``broken`` is set, as a
    plugin bug (or a full disk) at the very end of a run would."""

    broken = True

    @hookimpl
    def register_tuning_methods(self, register):
        from plugtune.plugins.methods.lora import LoraMethod

        outer = self

        class Fragile(LoraMethod):
            def adapter_state(self, model):
                if outer.broken:
                    raise KeyError("lora_A")
                return super().adapter_state(model)

        register("fragile", Fragile)


def test_a_failed_adapter_save_keeps_the_weights_and_resume_saves_them(make_recipe, tmp_path):
    from safetensors.torch import load_file

    fragile = FragileLora()
    set_plugin_system(build_plugin_system(extra_plugins=[("fragile_plugin", fragile)]))
    training = {"max_steps": 4, "batch_size": 4, "device": "cpu", "checkpoint_every": 0}
    try:
        recipe = make_recipe(method={"name": "fragile", "options": {"r": 4}}, training=training)
        with pytest.raises(TrainingError) as info:
            plugtune.run(recipe, show_progress=False)
        message = str(info.value)
        out = tmp_path / "adapters" / "tiny"
        assert "\n" not in message
        assert "plugin 'fragile_plugin' (distribution (registered in code)) failed in tuning method 'fragile' (adapter_state): KeyError" in message
        assert f"the trained weights are kept in {out / 'checkpoints' / 'step-4'}" in message
        assert message.endswith(f"save them with: plugtune run {recipe} --resume")
        assert not (out / WEIGHTS_FILE).exists()

        fragile.broken = False  # the plugin fixed: --resume evaluates and saves, without training again
        resumed = plugtune.run(recipe, show_progress=False, resume=True)
        again = plugtune.run(make_recipe(method={"name": "fragile", "options": {"r": 4}}, training=training,
                                         output={"dir": str(tmp_path / "uninterrupted")}), show_progress=False)
    finally:
        set_plugin_system(None)
    assert resumed.steps == 4 and resumed.after == again.after
    saved, expected = load_file(out / WEIGHTS_FILE), load_file(again.adapter_dir / WEIGHTS_FILE)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["when"] for r in records if r["event"] == "eval"] == ["before", "after"]  # the final evaluation once
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
