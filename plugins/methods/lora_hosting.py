"""The adapter host's LoRA layers: many LoRA adapters on one resident base, without peft's
per-adapter module injection.

Each targeted linear layer of the base is wrapped once in a :class:`HostedLoraLinear` that
keeps every resident adapter's ``(A, B, scaling)`` as plain tensors; every wrapped layer
reads the *same* :class:`Routing` object, so

* switching adapters is one attribute write (``routing.active = name``), not a walk over
  the model (peft's ``set_adapter`` visits every module);
* loading an adapter is a dictionary insert per targeted layer: the tensors come straight
  from the safetensors file, no module is built or initialised;
* a batch whose rows name different adapters runs in one forward: each layer stacks the
  batch's adapters once (ranks zero-padded to the largest, the scaling folded into ``B``,
  a zero slot for rows without one; cached while the same adapters keep coming), gathers one
  ``(A, B)`` per row and adds every row's update with two batched matmuls, so the cost does
  not grow with the number of adapters in the batch.

Wrappers compose with other methods' layer wrappers in either order: a targeted layer may
already be wrapped (``base_layer`` chains, see :func:`plugtune.kernel.components.original_module`);
shapes are checked on the linear at the bottom of the stack, the hosted layer runs whatever it
wraps and adds its update, and when it leaves it splices itself out of the stack wherever it
sits (:func:`~plugtune.kernel.components.remove_wrapper`).

The arithmetic is peft's (``base(x) + B(A(x)) * scaling``), so logits match plain peft.
Modules a LoRA adapter saves whole (the classification head of a sequence-classification
adapter, peft's ``modules_to_save``) are wrapped in a :class:`SwitchedModule` that runs the
base module with the active adapter's parameters (``torch.func.functional_call``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plugtune.sdk import AdapterError, original_module, remove_wrapper, replace_module

PEFT_PREFIX = "base_model.model."
UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases",
    "fan_in_fan_out": "fan_in_fan_out",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "target_parameters",
    "use_qalora": "QA-LoRA",
}


@dataclass
class Routing:
    """Which adapter each forward applies; shared by every hosted layer of one base.

    ``groups`` (when set) overrides ``active``: one ``(adapter, row indices)`` entry per
    adapter in a mixed batch; rows in no group run the bare base. ``slots`` and
    ``row_slot`` say the same for the batched path: the batch's adapters in order, and per
    row its index in ``slots`` (``len(slots)`` for a row without adapter)."""

    active: str | None = None
    groups: list[tuple[str, torch.Tensor]] | None = None
    slots: tuple[str, ...] = ()
    row_slot: torch.Tensor | None = None


@dataclass
class LoraWeights:
    A: torch.Tensor  # (r, in_features)
    B: torch.Tensor  # (out_features, r)
    scaling: float


class HostedLoraLinear(nn.Module):
    """``base_layer(x)`` plus the routed adapter's ``B(A(x)) * scaling``. ``base_layer`` is
    the linear layer, or another method's wrapper of it."""

    def __init__(self, base_layer: nn.Module, routing: Routing) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.weights: dict[str, LoraWeights] = {}
        self._stack: tuple[tuple[str, ...], torch.Tensor, torch.Tensor] | None = None
        self._per_row: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def linear(self) -> nn.Linear:
        """The linear layer at the bottom of the wrapper stack (its weight is what folds)."""
        return original_module(self.base_layer)  # type: ignore[return-value]

    def forget_stack(self) -> None:
        """Call when ``weights`` changes: the next mixed batch restacks."""
        self._stack = self._per_row = None

    def _rows(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row ``A^T`` (batch, in, r) and ``(B * scaling)^T`` (batch, r, out); kept while the
        routing hands out the same ``row_slot`` tensor (every step of one decode)."""
        if self._per_row is None or self._per_row[0] is not routing.row_slot:
            a, b = self._stacked(routing.slots)
            self._per_row = (routing.row_slot, a[routing.row_slot].transpose(1, 2), b[routing.row_slot].transpose(1, 2))
        return self._per_row[1], self._per_row[2]

    def _stacked(self, slots: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` (slots+1, r, in) and ``B * scaling`` (slots+1, out, r) for the batch's adapters;
        the last slot, and the slot of an adapter that does not target this layer, are zero."""
        if self._stack is None or self._stack[0] != slots:
            base = self.linear.weight
            present = [self.weights[n] for n in slots if n in self.weights]
            rank = max((w.A.shape[0] for w in present), default=0)
            a = base.new_zeros(len(slots) + 1, rank, base.shape[1])
            b = base.new_zeros(len(slots) + 1, base.shape[0], rank)
            for k, name in enumerate(slots):
                w = self.weights.get(name)
                if w is not None:
                    a[k, : w.A.shape[0]] = w.A
                    b[k, :, : w.A.shape[0]] = w.B * w.scaling
            self._stack = (slots, a, b)
        return self._stack[1], self._stack[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        routing = self.routing
        if routing.groups is None:
            if routing.active is None:
                return out
            w = self.weights.get(routing.active)
            if w is None:
                return out
            return out + F.linear(F.linear(x, w.A), w.B) * w.scaling
        a_rows, b_rows = self._rows(routing)
        if a_rows.shape[2] == 0:  # no adapter of this batch targets this layer
            return out
        flat = x.dim() == 2
        h = torch.bmm(torch.bmm(x.unsqueeze(1) if flat else x, a_rows), b_rows)  # (batch, tokens, out)
        return out + (h.squeeze(1) if flat else h)

    def delta(self, name: str) -> torch.Tensor:
        """The adapter's full-rank weight update ``B @ A * scaling`` (out, in)."""
        w = self.weights[name]
        return (w.B @ w.A) * w.scaling


class SwitchedModule(nn.Module):
    """A module that LoRA adapters replace whole (peft's ``modules_to_save``): runs the
    original module with the routed adapter's parameters, or its own for the bare base."""

    def __init__(self, original: nn.Module, routing: Routing) -> None:
        super().__init__()
        self.original_module = original
        self.routing = routing
        self.values: dict[str, dict[str, torch.Tensor]] = {}

    def _run(self, name: str | None, *args: Any, **kwargs: Any) -> Any:
        params = self.values.get(name) if name is not None else None
        if params is None:
            return self.original_module(*args, **kwargs)
        # the bare module at the bottom of the stack: for a row routed here every other
        # handler's wrapper adds nothing, so this is the adapter alone whatever wraps the head
        return torch.func.functional_call(original_module(self.original_module), params, args, kwargs, strict=False)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        routing = self.routing
        if routing.groups is None:
            return self._run(routing.active, x, *args, **kwargs)
        out = self.original_module(x, *args, **kwargs)
        for name, rows in routing.groups:
            if name in self.values:
                out = out.index_copy(0, rows, self._run(name, x.index_select(0, rows), *args, **kwargs))
        return out


@dataclass
class ParsedLora:
    """An adapter's tensors sorted by the base module they belong to."""

    pairs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> {"A": .., "B": ..}
    whole: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> {param: value}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _config_type_problem(config: dict[str, Any]) -> str | None:
    """What is wrong with the types of the keys of ``adapter_config.json`` the hosted layers
    read (``r``, ``lora_alpha``, ``target_modules``, ``alpha_pattern``, ``rank_pattern``,
    ``use_rslora``), or None: a hand-edited or foreign config fails here, at load, with one
    line, not as a TypeError deep in a forward pass."""
    if "r" in config and not _is_rank(config["r"]):
        return f"r is {config['r']!r}; a LoRA rank is a whole number of at least 1"
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        return f"lora_alpha is {config['lora_alpha']!r}; it is a finite number"
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        return f"target_modules is {targets!r}; it is a module name pattern or a list of module names"
    for key, ok, what in (("alpha_pattern", _is_number, "finite numbers"), ("rank_pattern", _is_rank, "ranks of at least 1")):
        pattern = config.get(key)
        if pattern is not None and not (isinstance(pattern, dict) and all(ok(v) for v in pattern.values())):
            return f"{key} is {pattern!r}; it maps module names to {what}"
    if config.get("use_rslora") is not None and not isinstance(config["use_rslora"], bool):
        return f"use_rslora is {config['use_rslora']!r}; it is true or false"
    return None


def check_config(name: str, config: dict[str, Any]) -> None:
    """Refuse a config with wrong types, and LoRA variants the hosted layers do not implement."""
    problem = _config_type_problem(config)
    if problem:
        raise AdapterError(f"adapter {name!r}: adapter_config.json: {problem[:300]}")
    for key, label in UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"adapter {name!r} uses {label}, which the adapter host's LoRA layers do not support")


def fit_whole(name: str, path: str, params: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """The values of a module an adapter saves whole (``path``'s parameters by name), checked
    against the base's ``module`` and moved to its device and dtype; :class:`AdapterError`
    naming the first that does not fit. Shared by every handler that hosts whole modules."""
    own = dict(module.named_parameters())
    checked = {}
    for pname, value in params.items():
        target = own.get(pname)
        if target is None or tuple(target.shape) != tuple(value.shape):
            expected = tuple(target.shape) if target is not None else "no such parameter"
            raise AdapterError(f"adapter {name!r} does not fit this base: {path}.{pname} has shape "
                               f"{tuple(value.shape)}, the base's is {expected}")
        checked[pname] = value.to(device=target.device, dtype=target.dtype)
    return checked


def scaling_for(config: dict[str, Any], module: str, rank: int) -> float:
    """peft's scaling: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), per-module alpha from
    ``alpha_pattern``."""
    from peft.utils.other import get_pattern_key

    alpha = config.get("lora_alpha", 8)
    pattern = config.get("alpha_pattern") or {}
    if pattern:
        key = get_pattern_key(pattern.keys(), module)
        alpha = pattern.get(key, alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def parse_state(name: str, state: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> ParsedLora:
    """Sort peft-named tensors (``base_model.model.<module>.lora_A.weight``) by module."""
    parsed = ParsedLora()
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise AdapterError(f"adapter {name!r}: tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; LoRA weights must be floating point")
        path = key.removeprefix(PEFT_PREFIX)
        for part in ("A", "B"):
            marker = f".lora_{part}.weight"
            if path.endswith(marker):
                parsed.pairs.setdefault(path[: -len(marker)], {})[part] = tensor
                break
        else:
            if ".lora_" in path:
                raise AdapterError(f"adapter {name!r}: tensor {key!r} is a LoRA variant the adapter host does not support")
            module, _, param = path.rpartition(".")
            if module not in modules:
                raise AdapterError(f"adapter {name!r} does not fit this base: tensor {key!r} names no module of it")
            parsed.whole.setdefault(module, {})[param] = tensor
    for module, pair in parsed.pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: {module} has lora_{next(iter(pair))} without its partner")
    return parsed


class HostedLoras:
    """The hosted layers of one base, the routing they share, and which adapter lives where
    (``LoraMethod``'s host-side state: attach checks everything before touching the model,
    the last adapter off a layer puts the plain layer back, merging keeps the originals)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.routing = Routing()
        self.modules = dict(model.named_modules())  # built once: lookups stay O(1) per tensor
        self.layers: dict[str, HostedLoraLinear] = {}
        self.heads: dict[str, SwitchedModule] = {}
        self.resident: dict[str, tuple[list[str], list[str]]] = {}
        self.merged: tuple[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.last_mixed: tuple[tuple[str | None, ...], Any, tuple[str, ...], torch.Tensor] | None = None

    # -- checks -----------------------------------------------------------------------------

    def _current(self, path: str) -> nn.Module | None:
        """The module at ``path`` now: the top of its wrapper stack."""
        if path not in self.modules:
            return None
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None

    def _base_module(self, path: str) -> Any:
        current = self._current(path)
        return None if current is None else original_module(current)

    def check_pair(self, name: str, path: str, a: torch.Tensor, b: torch.Tensor, config: dict[str, Any]) -> LoraWeights:
        base = self._base_module(path)
        if base is None:
            raise AdapterError(f"adapter {name!r} does not fit this base: it targets {path}, which this base does not have")
        if not isinstance(base, torch.nn.Linear):
            raise AdapterError(f"adapter {name!r} targets {path}, a {type(base).__name__}; the adapter host hosts LoRA on linear layers only")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != base.in_features or tuple(b.shape) != (base.out_features, a.shape[0]):
            raise AdapterError(
                f"adapter {name!r} does not fit this base: {path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"the base layer maps {base.in_features} to {base.out_features} features"
            )
        weight = base.weight
        return LoraWeights(a.to(device=weight.device, dtype=weight.dtype), b.to(device=weight.device, dtype=weight.dtype),
                           scaling_for(config, path, a.shape[0]))

    def check_whole(self, name: str, path: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return fit_whole(name, path, params, original_module(self._current(path)))

    # -- wrapping -----------------------------------------------------------------------

    def _wrap(self, path: str, wrapper: HostedLoraLinear | SwitchedModule) -> None:
        """Put ``wrapper`` on top of whatever stack is at ``path`` (it wraps that)."""
        current = self.model.get_submodule(path)
        if isinstance(wrapper, HostedLoraLinear):
            wrapper.base_layer = current
        else:
            wrapper.original_module = current
        replace_module(self.model, path, wrapper)

    def layer(self, path: str) -> HostedLoraLinear:
        if path not in self.layers:
            self.layers[path] = HostedLoraLinear(self.model.get_submodule(path), self.routing)
            replace_module(self.model, path, self.layers[path])
        return self.layers[path]

    def switched(self, path: str) -> SwitchedModule:
        if path not in self.heads:
            self.heads[path] = SwitchedModule(self.model.get_submodule(path), self.routing)
            replace_module(self.model, path, self.heads[path])
        return self.heads[path]

    def remove(self, name: str) -> None:
        if self.merged is not None and self.merged[0] == name:
            self.unfold()
        if self.routing.active == name:
            self.routing.active = None
        pairs, whole = self.resident.pop(name)
        for path in pairs:
            layer = self.layers[path]
            del layer.weights[name]
            layer.forget_stack()
            if not layer.weights:  # the last adapter on this layer: its wrapper leaves the stack
                remove_wrapper(self.model, path, layer)
                del self.layers[path]
        for path in whole:
            head = self.heads[path]
            del head.values[name]
            if not head.values:
                remove_wrapper(self.model, path, head)
                del self.heads[path]

    def resident_bytes(self, name: str) -> int:
        pairs, whole = self.resident[name]
        total = sum(w.A.nbytes + w.B.nbytes for w in (self.layers[p].weights[name] for p in pairs))
        return total + sum(v.nbytes for p in whole for v in self.heads[p].values[name].values())

    # -- routing and merging ------------------------------------------------------------

    @contextlib.contextmanager
    def mixed_rows(self, names: list[str | None]) -> Iterator[None]:
        device = next(self.model.parameters()).device
        routing = self.routing
        previous = routing.active, routing.groups, routing.slots, routing.row_slot
        if len(set(names)) == 1:  # one adapter for the whole batch: the plain path
            routing.active, routing.groups = names[0], None
        else:
            key = tuple(names)
            if self.last_mixed is None or self.last_mixed[0] != key:  # the same rows again (the next decode step): same tensors
                slots = tuple(dict.fromkeys(n for n in names if n is not None))
                groups = [(adapter, torch.tensor([i for i, n in enumerate(names) if n == adapter], device=device))
                          for adapter in slots]
                row_slot = torch.tensor([slots.index(n) if n is not None else len(slots) for n in names], device=device)
                self.last_mixed = (key, groups, slots, row_slot)
            _, routing.groups, routing.slots, routing.row_slot = self.last_mixed
        try:
            yield
        finally:
            routing.active, routing.groups, routing.slots, routing.row_slot = previous

    def fold(self, name: str) -> None:
        if self.merged is not None:
            raise AdapterError(f"adapter {self.merged[0]!r} is already merged into the base; unmerge it first")
        pairs, whole = self.resident[name]
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for path in pairs:
                layer = self.layers[path]
                weight = layer.linear.weight
                kept.append((weight, weight.detach().clone()))
                weight += layer.delta(name).to(weight.dtype)
            for path in whole:
                head = self.heads[path]
                own = dict(original_module(head.original_module).named_parameters())
                for pname, value in head.values[name].items():
                    kept.append((own[pname], own[pname].detach().clone()))
                    own[pname].copy_(value)
        self.merged = (name, kept)
        self.routing.active = None
        for path, wrapper in [*self.layers.items(), *self.heads.items()]:  # merged: no wrapper of ours, no overhead at all
            remove_wrapper(self.model, path, wrapper)

    def unfold(self) -> None:
        if self.merged is None:
            return
        with torch.no_grad():
            for tensor, original in self.merged[1]:
                tensor.copy_(original)
        self.merged = None
        for path, wrapper in [*self.layers.items(), *self.heads.items()]:
            self._wrap(path, wrapper)


# -- plain LoRA for export (LoraHandler.plain_lora, PeftHandler.plain_lora) ---------------------

# Why each LoRA variant has no exact plain-LoRA form (llama.cpp, Ollama, vLLM and LoRAX apply
# W x + scaling * B (A x) and nothing else); keys as in adapter_config.json.
NOT_PLAIN = {
    "use_dora": "DoRA rescales each output column of W + scaling*BA by a learned magnitude over that column's "
                "norm, so its update is not a low-rank matrix added to W and no LoRA reproduces it exactly",
    "lora_bias": "its LoRA biases add a vector the LoRA file formats have no place for",
    "fan_in_fan_out": "its factors are stored transposed for Conv1D layers (GPT-2 style), which llama.cpp and vLLM do not map",
    "layer_replication": "it replicates base layers, which a LoRA file cannot express",
    "trainable_token_indices": "it trains single embedding rows, which a LoRA file cannot express",
    "target_parameters": "it adapts raw parameters (MoE experts), not linear modules",
    "use_qalora": "QA-LoRA's factors are relative to a quantization grouping the LoRA formats do not record",
    "alora_invocation_tokens": "activated LoRA switches on after invocation tokens, which only some servers support",
    "use_bdlora": "block-diagonal LoRA is not a dense low-rank product",
}
# peft initialisations that change the base weights when the adapter is made (the saved
# factors are then relative to that changed base); vLLM refuses them for the same reason
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")
MERGE_HINT = "`plugtune merge` writes the base with the adapter folded in, as a plain model folder to convert or serve instead"


def plain_lora_of(subject: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> Any:
    """A LoRA adapter's tensors and config as a :class:`~plugtune.sdk.PlainLora`: each adapted
    module's ``(A, B, scaling)`` with peft's scaling rule applied (``alpha / r``,
    ``alpha / sqrt(r)`` for rsLoRA, ``alpha_pattern`` per module), and the modules it saves
    whole. A variant without an exact plain form is an :class:`AdapterError` with the reason."""
    from plugtune.sdk import PlainLora

    problem = _config_type_problem(config)
    if problem:
        raise AdapterError(f"{subject}: adapter_config.json: {problem[:300]}")
    for key, reason in NOT_PLAIN.items():
        if config.get(key):
            raise AdapterError(f"{subject} uses {UNSUPPORTED.get(key, key.removeprefix('use_'))} ({key}: true): {reason}; "
                               f"it cannot be exported as a LoRA file; {MERGE_HINT}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterError(f"{subject} was initialised with {init} (init_lora_weights), which changes the base weights "
                           f"when the adapter is made: its factors are relative to that changed base, not the one a "
                           f"server loads; {MERGE_HINT}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        path = key.removeprefix(PEFT_PREFIX)
        part = next((p for p in ("A", "B") if path.endswith(f".lora_{p}.weight")), None)
        if part is not None:
            pairs.setdefault(path[: -len(f".lora_{part}.weight")], {})[part] = tensor
        elif ".lora_" in path:
            raise AdapterError(f"{subject}: tensor {key!r} is LoRA on an embedding or a LoRA variant, not a linear "
                               f"layer's lora_A/lora_B; it cannot be exported as a LoRA file")
        else:
            module, _, param = path.rpartition(".")
            whole.setdefault(module, {})[param] = tensor
    factors = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{subject}: {module} has lora_{next(iter(pair))} without its partner")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{subject}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                               f"are not (r, in) and (out, r) of one rank")
        factors[module] = (a, b, scaling_for(config, module, a.shape[0]))
    if not factors:
        raise AdapterError(f"{subject} holds no lora_A/lora_B pairs; there is nothing to export as LoRA")
    return PlainLora(pairs=factors, whole=whole, task_type=config.get("task_type"))
