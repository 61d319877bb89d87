"""Two methods that wrap layers, resident on one base: LoRA's hosted layers and a small
IA3-like scaling method written here against the SDK (``AdapterHandler`` + ``MixesRows``,
``original_module``/``replace_module``/``remove_wrapper``).

A batch mixing rows of both gives every row exactly what its adapter gives alone (the old
host handed the whole batch to the first adapter's handler, and the other method's rows got
no adapter at all); the wrappers stack in either load order, unload from the middle of a
stack, and leave the base ``torch.equal`` to the base as loaded."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from plugtune import hookimpl
from plugtune.artifacts.adapters import save_adapter
from plugtune.data.tasks import build_task
from plugtune.kernel.components import NoOptions, original_module, remove_wrapper, replace_module
from plugtune.kernel.errors import AdapterError
from plugtune.kernel.registry import build_plugin_system
from plugtune.plugins.methods.lora import random_lora_adapter
from plugtune.serving.host import AdapterHost

TASK = build_task(dict(type="causal-lm", prompt="question : {q} answer :", response=" {a}"))
TEXTS = ["question : what is the colour of the sky ? answer : blue", "the film was great",
         "what is the capital of the sea", "a very fun story", "one more row of text here"]
KEY = ".ia3_scale"


class ScaledLinear(nn.Module):
    """``base_layer(x) * scale`` per output feature, the scale chosen per row."""

    def __init__(self, base_layer: nn.Module, handler: ScaleHandler) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.handler = [handler]  # in a list: not a submodule
        self.scales: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (B, T, out)
        names = self.handler[0].rows
        if names is None:
            active = self.handler[0].active
            return out * self.scales[active] if active in self.scales else out
        if all(n not in self.scales for n in names):
            return out
        ones = out.new_ones(out.shape[-1])
        per_row = torch.stack([self.scales.get(n, ones) if n is not None else ones for n in names])  # (B, out)
        return out * per_row[:, None, :]


class ScaleHandler:
    """Host side of the scaling method: one ScaledLinear per targeted layer, shared by
    every scaling adapter; mixes rows."""

    Options = NoOptions
    attach_reads_base_weights = False

    def __init__(self, options: Any) -> None:
        self.layers: dict[str, ScaledLinear] = {}
        self.active: str | None = None
        self.rows: list[str | None] | None = None

    def attach(self, model: nn.Module, name: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> nn.Module:
        checked = {}
        for key, scale in state.items():
            path = key.removesuffix(KEY)
            try:
                layer = original_module(model.get_submodule(path))
            except AttributeError:
                raise AdapterError(f"adapter {name!r}: {path} is not a module of this base") from None
            if not isinstance(layer, nn.Linear) or tuple(scale.shape) != (layer.out_features,):
                raise AdapterError(f"adapter {name!r}: {key} does not fit {path}")
            checked[path] = scale.to(layer.weight)
        for path, scale in checked.items():
            if path not in self.layers:
                self.layers[path] = ScaledLinear(model.get_submodule(path), self)
                replace_module(model, path, self.layers[path])
            self.layers[path].scales[name] = scale
        return model

    def activate(self, model: nn.Module, name: str | None) -> None:
        self.active = name

    def detach(self, model: nn.Module, name: str) -> None:
        for path, layer in list(self.layers.items()):
            layer.scales.pop(name, None)
            if not layer.scales:
                remove_wrapper(model, path, layer)
                del self.layers[path]

    @contextlib.contextmanager
    def mixed_rows(self, model: nn.Module, names: list[str | None]) -> Iterator[None]:
        previous, self.rows = self.rows, list(names)
        try:
            yield
        finally:
            self.rows = previous


class ScaleMethod:
    """The registered tuning method; only its host side matters here."""

    Options = NoOptions
    handler = ScaleHandler


class ScalePlugin:
    @hookimpl
    def register_tuning_methods(self, register):
        register("test-scale", ScaleMethod)


def scale_adapter(directory: Path, host: AdapterHost, targets: tuple[str, ...], seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    state = {f"{n}{KEY}": 1 + 0.5 * torch.randn(m.out_features, generator=gen)
             for n, m in host.base.model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets}
    manifest = {"name": directory.name, "method": {"name": "test-scale", "options": {}},
                "base_model": host.base.info.to_dict(), "task": TASK.to_dict()}
    return save_adapter(directory, state=state, config={}, manifest=manifest)


@pytest.fixture(scope="module")
def plugins():
    return build_plugin_system(extra_plugins=[("test-scale", ScalePlugin())])


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama, plugins) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("composition")
    host = AdapterHost.from_base(str(tiny_llama), TASK, plugins)
    return {
        "lora": random_lora_adapter(root / "lora", host.base, TASK, r=4, seed=1, scale=0.5),
        "lora2": random_lora_adapter(root / "lora2", host.base, TASK, r=2, seed=2, scale=0.5,
                                     targets=("q_proj", "k_proj", "v_proj", "o_proj")),
        "scale": scale_adapter(root / "scale", host, ("q_proj", "v_proj", "down_proj"), seed=3),
        "scale-other": scale_adapter(root / "scale-other", host, ("k_proj", "down_proj"), seed=4),
        "scale2": scale_adapter(root / "scale2", host, ("v_proj", "up_proj"), seed=5),
    }


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_each_row_alone(host: AdapterHost, rows: list[str | None]) -> None:
    mixed = host.logits(TEXTS, rows)
    alone = {name: host.logits(TEXTS, name) for name in set(rows)}
    assert (alone[rows[0]] - alone[None]).abs().max() > 1e-3  # the adapters really change the output
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone[name][i], atol=1e-5, rtol=0, msg=f"row {i} ({name})")


def test_rows_of_lora_and_another_mixing_method_each_get_their_own_adapter(adapters, tiny_llama, plugins):
    """The mixed-batch bug: the first row's handler got the whole batch; the LoRA rows after
    it ran the bare base. Layers here are disjoint, so no stacking is involved."""
    host = AdapterHost.from_base(str(tiny_llama), TASK, plugins)
    for name in ("lora", "scale-other"):
        host.load(adapters[name])
    _assert_each_row_alone(host, ["scale-other", "lora", None, "lora", "scale-other"])
    _assert_each_row_alone(host, ["lora", "scale-other", "lora", None, "scale-other"])


@pytest.mark.parametrize("order", [("lora", "lora2", "scale", "scale2"), ("scale", "scale2", "lora", "lora2"),
                                   ("lora", "scale", "lora2", "scale2")])
def test_wrappers_stack_in_any_load_order(adapters, tiny_llama, plugins, order):
    host = AdapterHost.from_base(str(tiny_llama), TASK, plugins)
    plain = type(host.base.model.model.layers[0].self_attn.q_proj)
    before = _state(host.base.model)
    for name in order:
        host.load(adapters[name])
    q_proj = host.base.model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is not plain and type(q_proj.base_layer) is not plain  # two wrappers, stacked
    assert original_module(q_proj) is original_module(q_proj.base_layer)
    _assert_each_row_alone(host, ["scale", "lora", None, "scale2", "lora2"])
    _assert_each_row_alone(host, ["lora2", "scale2", "scale", "lora", None])
    generated = host.generate(["what is the colour", "the film", "a story", "once"], ["lora", "scale", None, "scale2"],
                              max_new_tokens=4, raw=True)
    assert generated == [host.generate([p], n, max_new_tokens=4, raw=True)[0]
                         for p, n in zip(["what is the colour", "the film", "a story", "once"], ["lora", "scale", None, "scale2"])]
    for name in order:  # unload in load order: the first wrapper leaves from the bottom of its stack
        host.unload(name)
    assert type(host.base.model.model.layers[0].self_attn.q_proj) is plain
    after = host.base.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_unloading_the_middle_wrapper_keeps_the_others_exact(adapters, tiny_llama, plugins):
    host = AdapterHost.from_base(str(tiny_llama), TASK, plugins)
    bare = host.logits(TEXTS, None)
    for name in ("lora", "scale", "scale2"):
        host.load(adapters[name])
    expected = {name: host.logits(TEXTS, name) for name in ("scale", "scale2")}
    v_proj = host.base.model.model.layers[0].self_attn.v_proj  # the scaling wrapper -> LoRA's -> Linear
    assert type(v_proj).__name__ == "ScaledLinear" and type(v_proj.base_layer).__name__ == "HostedLoraLinear"
    host.unload("lora")  # its wrapper sat in the middle of the v_proj stacks
    v_proj = host.base.model.model.layers[0].self_attn.v_proj
    assert type(v_proj).__name__ == "ScaledLinear" and isinstance(v_proj.base_layer, nn.Linear)
    for name, logits in expected.items():
        torch.testing.assert_close(host.logits(TEXTS, name), logits, atol=1e-6, rtol=0)
    host.unload("scale")  # scale2 still scales v_proj: the wrapper stays
    torch.testing.assert_close(host.logits(TEXTS, "scale2"), expected["scale2"], atol=1e-6, rtol=0)
    host.unload("scale2")
    assert torch.equal(host.logits(TEXTS, None), bare)


def test_merge_next_to_another_methods_wrapper_is_exact(adapters, tiny_llama, plugins):
    """Folding LoRA while another method's wrapper sits above it, and unfolding again."""
    host = AdapterHost.from_base(str(tiny_llama), TASK, plugins)
    before = _state(host.base.model)
    for name in ("lora", "scale"):
        host.load(adapters[name])
    expected = host.logits(TEXTS, "lora")
    host.merge("lora")
    torch.testing.assert_close(host.logits(TEXTS, "lora"), expected, atol=1e-5, rtol=0)
    host.unmerge()
    _assert_each_row_alone(host, ["scale", "lora", None, "lora", "scale"])
    torch.testing.assert_close(host.logits(TEXTS, "lora"), expected, atol=0, rtol=0)
    host.unload("scale")
    host.unload("lora")
    after = host.base.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_combine_asks_the_handler_for_the_capability(adapters, tmp_path, plugins):
    from plugtune.artifacts.combine import combine_adapters

    with pytest.raises(AdapterError, match=r"its method's handler \(ScaleHandler\) cannot combine adapters"):
        combine_adapters(tmp_path / "blend", [adapters["scale"], adapters["scale2"]], [0.5, 0.5], plugins=plugins)
    with pytest.raises(AdapterError, match="cannot combine adapters"):
        combine_adapters(tmp_path / "blend", [adapters["lora"], adapters["scale"]], [0.5, 0.5], plugins=plugins)
    assert not (tmp_path / "blend").exists()
