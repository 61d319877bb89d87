"""A plugin written in the test supplies one component of every registrable kind — a base
model alias, a data loader and a (non-peft) tuning method — and a recipe that uses only those
trains, saves and hosts an adapter. Proves the core assumes nothing about peft or files."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

import plugtune
from plugtune import hookimpl
from plugtune.kernel.components import ComponentOptions, NoOptions
from plugtune.serving.host import AdapterHost
from plugtune.kernel.registry import build_plugin_system, set_plugin_system
from plugtune.testing import FILLER, WORDS_NEG, WORDS_POS


class InlineOptions(ComponentOptions):
    rows: int = Field(128, gt=1)
    seed: int = 0


class InlineLoader:
    """Generates sentiment rows in memory: no file at all."""

    Options = InlineOptions

    def __init__(self, options: InlineOptions) -> None:
        self.options = options

    def columns(self) -> list[str]:
        return ["text", "label"]

    def load(self, seed: int) -> dict[str, list[dict[str, Any]]]:
        rng = random.Random(self.options.seed)
        rows = []
        for i in range(self.options.rows):
            pos = i % 2 == 0
            words = rng.sample(FILLER, 3) + rng.sample(WORDS_POS if pos else WORDS_NEG, 3)
            rows.append({"text": " ".join(words), "label": "pos" if pos else "neg"})
        cut = self.options.rows * 3 // 4
        return {"train": rows[:cut], "test": rows[cut:]}


class BitFit:
    """Train only the biases (and the new head); the adapter is the trained tensors. Attach
    keeps each adapter's tensors aside; activate copies them in, None restores the base."""

    Options = NoOptions

    def __init__(self, options: Any) -> None:
        self.saved: dict[str, dict[str, torch.Tensor]] = {}
        self.original: dict[str, torch.Tensor] = {}

    @staticmethod
    def _trainable(name: str) -> bool:
        return name.endswith(".bias") or name.startswith("classifier.")

    def prepare(self, model, task):
        for name, p in model.named_parameters():
            p.requires_grad_(self._trainable(name))
        return model

    def adapter_state(self, model):
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if self._trainable(n)}

    def adapter_config(self, model):
        return {"kind": "bitfit"}

    def attach(self, model, name, state, config):
        params = dict(model.named_parameters())
        if set(state) - set(params):
            raise plugtune.AdapterError(f"unexpected tensors {sorted(set(state) - set(params))[:2]}")
        if not self.original:
            self.original = {n: params[n].detach().clone() for n in state}
        self.saved[name] = state
        return model

    @torch.no_grad()
    def activate(self, model, name):
        params = dict(model.named_parameters())
        for n, value in (self.saved[name] if name else self.original).items():
            params[n].copy_(value)

    def detach(self, model, name):
        self.saved.pop(name, None)


class Components:
    def __init__(self, tiny_bert: Path) -> None:
        self.tiny_bert = tiny_bert

    @hookimpl
    def register_base_models(self, register):
        tiny = self.tiny_bert

        class TinyBert:
            description = "the tiny test BERT"

            def locate(self) -> Path:
                return tiny

        register("tiny-bert", TinyBert())

    @hookimpl
    def register_data_loaders(self, register):
        register("inline", InlineLoader)

    @hookimpl
    def register_tuning_methods(self, register):
        register("bitfit", BitFit)


def test_recipe_made_only_of_plugin_components(tiny_bert, tmp_path):
    set_plugin_system(build_plugin_system(extra_plugins=[("components", Components(tiny_bert))]))
    try:
        recipe = plugtune.load_recipe(raw={
            "name": "bitfit-inline",
            "base_model": "tiny-bert",
            "task": {"type": "sequence-classification", "text": "{text}"},
            "data": {"loader": "inline", "options": {"rows": 128}},
            "method": "bitfit",
            "evaluators": ["accuracy", "loss"],
            "training": {"max_steps": 12, "batch_size": 16, "learning_rate": 1e-2, "device": "cpu"},
            "output": {"dir": str(tmp_path / "bitfit")},
        })
        result = plugtune.run(recipe, show_progress=False)
        assert result.after["loss"] < result.before["loss"]

        host = AdapterHost.from_adapters(result.adapter_dir)
        assert host.base.info.id == "tiny-bert"
        texts = ["the film was great lovely fun", "the plot was awful dull weak"]
        adapted = host.logits(texts)
        base = host.logits(texts, adapter=None)
        assert (adapted - base).abs().max() > 1e-4
        torch.testing.assert_close(host.logits(texts, adapter="bitfit-inline"), adapted, atol=0, rtol=0)
    finally:
        set_plugin_system(None)
