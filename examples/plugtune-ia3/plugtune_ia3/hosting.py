"""Host side of (IA)^3: every resident adapter's scaling vectors beside one base, no peft.

Each targeted layer gets one :class:`ScaledLayer` wrapped around *whatever module sits at
that path* (a plain ``nn.Linear``, or another method's wrapper, such as LoRA's hosted
layer); it keeps that module as ``base_layer``, so the SDK's ``original_module``,
``replace_module`` and ``remove_wrapper`` see through it and other wrappers compose with it
in either load order. All wrappers of a base read one :class:`Routing`: switching adapters
is one attribute write, and a batch whose rows name different adapters runs in one forward
(each row scaled by its own vector, ones for a row without one).

The arithmetic is peft's ``IA3Layer`` (``base(x) * l`` on the output, or ``base(x * l)`` for
feed-forward layers), so logits match ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from plugtune.sdk import AdapterError, original_module, remove_wrapper, replace_module

PEFT_PREFIX = "base_model.model."
SUFFIX = ".ia3_l"


@dataclass
class Routing:
    """Which adapter the wrappers apply: ``rows`` (one name or None per row) overrides
    ``active`` while a mixed batch runs."""

    active: str | None = None
    rows: tuple[str | None, ...] | None = None


class ScaledLayer(nn.Module):
    """``base_layer`` with the routed adapter's (IA)^3 vector on its output (or its input,
    for a feed-forward layer)."""

    def __init__(self, base_layer: nn.Module, feedforward: bool, routing: Routing) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.feedforward = feedforward
        self.routing = routing
        self.vectors: dict[str, torch.Tensor] = {}  # name -> (features,)
        self._per_row: tuple[tuple[str | None, ...], torch.Tensor] | None = None

    def _row_scales(self, rows: tuple[str | None, ...], like: torch.Tensor) -> torch.Tensor:
        """(batch, 1, features): each row's vector, ones for a row this layer has none for;
        kept while the same rows come again (every step of one decode)."""
        if self._per_row is None or self._per_row[0] != rows:
            ones = like.new_ones(next(iter(self.vectors.values())).shape[0])
            self._per_row = (rows, torch.stack([self.vectors.get(n, ones) if n else ones for n in rows])[:, None, :])
        return self._per_row[1]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        routing = self.routing
        if routing.rows is not None:
            scale = self._row_scales(routing.rows, x)  # (B, 1, F)
            if x.dim() == 2:
                scale = scale[:, 0]
        else:
            scale = self.vectors.get(routing.active) if routing.active is not None else None
            if scale is None:
                return self.base_layer(x, *args, **kwargs)
        if self.feedforward:
            return self.base_layer((x * scale).to(x.dtype), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        return (out * scale).to(out.dtype)


def matches(path: str, targets: Any) -> bool:
    """peft's rule: a string is a full-match regex, a list is a dotted-suffix match."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets or ())


def layer_paths(model: nn.Module) -> dict[str, nn.Linear]:
    """Each path of ``model`` whose module is, or wraps, a linear layer -> that linear
    (paths inside a wrapper, such as ``....base_layer``, are not layers of the model)."""
    found: dict[str, nn.Linear] = {}
    for path, module in model.named_modules():
        parts = path.split(".")
        if any(".".join(parts[:i]) in found for i in range(1, len(parts))):
            continue  # inside a wrapper (or a linear) found above
        base = original_module(module)
        if isinstance(base, nn.Linear):
            found[path] = base
    return found


@dataclass
class HostedIA3:
    """The wrapped layers of one base and which adapter lives where."""

    model: nn.Module
    routing: Routing = field(default_factory=Routing)
    layers: dict[str, ScaledLayer] = field(default_factory=dict)
    resident: dict[str, list[str]] = field(default_factory=dict)
    folded: tuple[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def check(self, name: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, tuple[torch.Tensor, bool]]:
        """Every tensor placed and shaped, every targeted layer covered; touches nothing."""
        if str(config.get("peft_type", "")).upper() != "IA3":
            raise AdapterError(f"adapter {name!r}: adapter_config.json is not an IA3 config (peft_type {config.get('peft_type')!r})")
        targets, feedforward = config.get("target_modules"), config.get("feedforward_modules") or ()
        linears = layer_paths(self.model)
        checked: dict[str, tuple[torch.Tensor, bool]] = {}
        for key, tensor in state.items():
            if not (key.startswith(PEFT_PREFIX) and key.endswith(SUFFIX)):
                raise AdapterError(f"adapter {name!r}: unexpected tensor {key!r} (IA3 adapters hold only *.ia3_l vectors)")
            path = key[len(PEFT_PREFIX): -len(SUFFIX)]
            base = linears.get(path)
            if base is None:
                raise AdapterError(f"adapter {name!r} does not fit this base: tensor {key!r} names no linear layer of it")
            ff = matches(path, feedforward)
            expected = (1, base.in_features) if ff else (base.out_features, 1)
            if tuple(tensor.shape) != expected or not tensor.is_floating_point():
                raise AdapterError(f"adapter {name!r} does not fit this base: {key} has shape {tuple(tensor.shape)}, expected {expected}")
            checked[path] = (tensor.reshape(-1).to(device=base.weight.device, dtype=base.weight.dtype), ff)
        missing = [p for p in linears if matches(p, targets) and p not in checked]
        if missing or not checked:
            raise AdapterError(f"adapter {name!r} is incomplete: no ia3_l tensor for {missing[:3] or 'any layer'}")
        return checked

    def add(self, name: str, checked: dict[str, tuple[torch.Tensor, bool]]) -> None:
        for path, (vector, ff) in checked.items():
            layer = self.layers.get(path)
            if layer is None:  # wrap whatever sits there now (another method's wrapper too)
                layer = self.layers[path] = ScaledLayer(self.model.get_submodule(path), ff, self.routing)
                replace_module(self.model, path, layer)
            layer.vectors[name] = vector
            layer._per_row = None
        self.resident[name] = list(checked)

    def remove(self, name: str) -> None:
        if self.folded is not None and self.folded[0] == name:
            self.unfold()
        if self.routing.active == name:
            self.routing.active = None
        for path in self.resident.pop(name):
            layer = self.layers[path]
            del layer.vectors[name]
            layer._per_row = None
            if not layer.vectors:  # the last adapter here: splice out, wherever in the stack
                remove_wrapper(self.model, path, layer)
                del self.layers[path]

    @contextlib.contextmanager
    def mixed_rows(self, names: list[str | None]) -> Iterator[None]:
        previous = self.routing.rows
        self.routing.rows = tuple(n if n in self.resident else None for n in names)
        try:
            yield
        finally:
            self.routing.rows = previous

    def fold(self, name: str) -> None:
        """Scale the base weights by the adapter's vectors, keeping the originals."""
        if self.folded is not None:
            raise AdapterError(f"adapter {self.folded[0]!r} is already merged into the base; unmerge it first")
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for path in self.resident[name]:
                layer = self.layers[path]
                base, v = original_module(layer), layer.vectors[name]
                kept.append((base.weight, base.weight.detach().clone()))
                if layer.feedforward:
                    base.weight.mul_(v[None, :])  # (out, in) * (1, in)
                else:
                    base.weight.mul_(v[:, None])  # (out, in) * (out, 1)
                    if base.bias is not None:
                        kept.append((base.bias, base.bias.detach().clone()))
                        base.bias.mul_(v)
        self.folded = (name, kept)
        self.routing.active = None

    def unfold(self) -> None:
        """Copy the kept originals back: the base is bit-exact again."""
        if self.folded is None:
            return
        with torch.no_grad():
            for tensor, original in self.folded[1]:
                tensor.copy_(original)
        self.folded = None

    def resident_bytes(self, name: str) -> int:
        return sum(self.layers[p].vectors[name].nbytes for p in self.resident[name])
