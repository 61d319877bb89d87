"""``full``: full fine-tuning, saved as the change it made.

Trains every weight, or the ones selected:

    method:
      name: full
      options:
        train: all          # all | biases (BitFit)
        top_layers: 4       # only the last 4 transformer blocks, the final norm and the head
        include: null       # a regex the parameter name must fully match, e.g. '.*mlp.*'
        freeze_embeddings: false
        delta_rank: null    # store each 2-D delta as a rank-k factorisation (SVD)

The adapter holds, for every parameter training changed, ``delta.<name>`` = trained minus
pretrained (fp32), or with ``delta_rank: k`` the factors ``delta_a.<name>`` (m x k) and
``delta_b.<name>`` (k x n) of its best rank-k approximation; the relative Frobenius error of
each approximation is recorded in ``adapter_config.json``. Parameters the base did not have
(a new classification head) are stored by value as ``value.<name>``. So the file is the size
of what changed, not a second copy of the model.

On a host, applying an adapter writes ``pretrained + delta`` into the base's parameters and
removing it copies the pretrained values back from a copy kept when the first full adapter
was attached: remove restores the base bit for bit.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from plugtune import hookimpl
from plugtune.sdk import AdapterError, ComponentOptions, MemoryHints, RecipeError

if TYPE_CHECKING:
    import torch

    from plugtune.sdk import Task
    from plugtune.sdk import BaseLoading, PrepareContext

LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")
EMBEDDING = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings)")


class FullOptions(ComponentOptions):
    train: Literal["all", "biases"] = "all"
    top_layers: int | None = Field(None, gt=0, description="train only the last N blocks (+ final norm and head)")
    include: str | None = Field(None, description="regex a parameter name must fully match to be trained")
    freeze_embeddings: bool = False
    delta_rank: int | None = Field(None, gt=0, description="store 2-D deltas as rank-k factors")


def canonical(name: str) -> str:
    """A parameter's name in the bare base, whatever peft wrapped around its module."""
    while ".base_layer." in name or ".original_module." in name:  # every level of a stack of wrappers
        name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def base_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The base's own parameters by canonical name (adapter weights that peft injected into
    the same modules are left out)."""
    params = {}
    for name, param in model.named_parameters():
        if ".lora_" in name or ".modules_to_save." in name or "prompt_encoder" in name:
            continue
        params[canonical(name)] = param
    return params


class FullHandler:
    """The host side of ``full``: applying an adapter writes ``pretrained + delta`` into the
    base's own parameters; switching away copies the pretrained values back from a copy kept
    when the first adapter touching them was attached (bit for bit).

    Capabilities: folds/unfolds (an applied adapter already is in the weights), merges.
    Rows of other adapters cannot share its forward (it changes the base's weights)."""

    Options = FullOptions

    def __init__(self, options: FullOptions) -> None:
        self.options = options
        self._stored: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
        self._pretrained: dict[str, torch.Tensor] = {}
        self._applied: str | None = None

    def attach(self, model: torch.nn.Module, name: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.nn.Module:
        params = base_parameters(model)
        _check_listed(name, state, config)
        targets: dict[str, tuple[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            kind, _, pname = key.partition(".")
            if kind == "delta_b":
                if f"delta_a.{pname}" not in state:
                    raise AdapterError(f"adapter {name!r}: {key!r} without its delta_a factor")
                continue
            if kind not in {"delta", "delta_a", "value"} or pname not in params:
                raise AdapterError(f"adapter {name!r}: tensor {key!r} has no matching parameter in this base")
            if kind == "delta_a":
                other = state.get(f"delta_b.{pname}")
                if other is None:
                    raise AdapterError(f"adapter {name!r}: {key!r} without its delta_b factor")
                tensor, kind = tensor @ other, "delta"  # (m, k) @ (k, n) -> (m, n)
            if tuple(tensor.shape) != tuple(params[pname].shape):
                raise AdapterError(
                    f"adapter {name!r}: {pname} has shape {tuple(tensor.shape)}, the base's is {tuple(params[pname].shape)}"
                )
            targets[pname] = (kind, tensor.to(params[pname].device))
        for pname in targets:
            if pname not in self._pretrained:
                self._pretrained[pname] = params[pname].detach().clone()
        self._stored[name] = targets
        return model

    def activate(self, model: torch.nn.Module, name: str | None) -> None:
        import torch

        if self._applied == name:
            return
        params = base_parameters(model)
        with torch.no_grad():
            if self._applied is not None:
                for pname in self._stored[self._applied]:
                    params[pname].copy_(self._pretrained[pname])
            self._applied = None
            if name is not None:
                for pname, (kind, tensor) in self._stored[name].items():
                    value = tensor if kind == "value" else self._pretrained[pname].float() + tensor
                    params[pname].copy_(value.to(params[pname].dtype))
                self._applied = name

    def fold(self, model: torch.nn.Module, name: str) -> None:
        """Host merge: the adapter is already written into the base's own weights when
        active, so merging is applying it (and unmerging copies the pretrained values back)."""
        self.activate(model, name)

    def unfold(self, model: torch.nn.Module) -> None:
        self.activate(model, None)

    def merge(self, model: torch.nn.Module, name: str) -> torch.nn.Module:
        """Write the adapter into the base for good (used when a recipe's base_model is an
        adapter folder); forgets the pretrained copy."""
        self.activate(model, name)
        self._stored.clear()
        self._pretrained.clear()
        self._applied = None
        return model

    def detach(self, model: torch.nn.Module, name: str) -> None:
        if self._applied == name:
            self.activate(model, None)
        self._stored.pop(name, None)
        still_needed = {p for targets in self._stored.values() for p in targets}
        for pname in list(self._pretrained):
            if pname not in still_needed:
                del self._pretrained[pname]

class FullMethod:
    """Full fine-tuning of the selected parameters; the adapter is their delta."""

    Options = FullOptions
    handler = FullHandler
    trains_base_weights = True  # keep fp32 master weights on GPUs too

    def __init__(self, options: FullOptions) -> None:
        self.options = options
        self._initial: dict[str, torch.Tensor] = {}
        self._new: frozenset[str] = frozenset()
        self._errors: dict[str, float] = {}
        self._tensors: list[str] | None = None  # the names adapter_state last produced

    # -- training -----------------------------------------------------------------------

    def reference_learning_rate(self) -> float:
        """AdamW's rate at a 512-wide model with 16 rows per step (bench/methods.py's search chose 3e-4
        for every weight of MiniLM-L6, width 384); ``learning_rate: auto`` scales it to the model
        and batch (core/training/rates.py)."""
        return 2e-4

    def _selected(self, name: str, last_layer: int) -> bool:
        o = self.options
        if name in self._new:
            return True  # a new head is always trained
        if o.train == "biases" and not name.endswith(".bias"):
            return False
        if o.freeze_embeddings and EMBEDDING.search(name):
            return False
        if o.include is not None and not re.fullmatch(o.include, name):
            return False
        if o.top_layers is not None:
            match = LAYER_INDEX.search(name)
            if match is None:
                return not EMBEDDING.search(name)  # final norm, pooler, head: yes; embeddings: no
            return int(match.group(1)) > last_layer - o.top_layers
        return True

    def prepare(self, model: torch.nn.Module, task: Task, context: PrepareContext) -> torch.nn.Module:
        self._new = context.new_parameters
        indices = [int(m.group(1)) for n, _ in model.named_parameters() if (m := LAYER_INDEX.search(n))]
        last_layer = max(indices, default=-1)
        chosen = 0
        for name, param in model.named_parameters():
            keep = self._selected(name, last_layer)
            param.requires_grad_(keep)
            if keep:
                chosen += 1
                if name not in self._new:  # on the meta device (plugtune estimate): the shape, no values
                    self._initial[name] = (param.detach().float() if param.is_meta
                                           else param.detach().to("cpu", copy=True).float())
        if not chosen:
            raise RecipeError(["method.options: the selection trains no parameter of this model"])
        return model

    def memory_hints(self, context: BaseLoading) -> MemoryHints:
        """For ``plugtune estimate``: the fp32 copy of each trained weight's initial value that
        ``prepare`` keeps in host memory (the adapter is the difference from it)."""
        return MemoryHints(host_bytes_per_trainable_param=4.0)

    def adapter_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        import torch

        state: dict[str, torch.Tensor] = {}
        self._errors = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            current = _whole(param).detach().to("cpu").float()
            if name in self._new:
                state[f"value.{name}"] = current.clone()
                continue
            delta = current - self._initial[name]
            if not torch.any(delta):
                continue  # untouched (e.g. tied weights counted once)
            if self.options.delta_rank is not None and delta.ndim == 2 and min(delta.shape) > self.options.delta_rank:
                a, b, error = low_rank(delta, self.options.delta_rank)
                state[f"delta_a.{name}"], state[f"delta_b.{name}"] = a, b
                self._errors[name] = error
            else:
                state[f"delta.{name}"] = delta
        self._tensors = sorted(state)
        return state

    def adapter_config(self, model: torch.nn.Module) -> dict[str, Any]:
        config: dict[str, Any] = {"method": "full", "delta_rank": self.options.delta_rank}
        if self._tensors is not None:
            config["tensors"] = self._tensors  # what the weights file must hold: a host refuses a file missing any
        if self._errors:
            config["lowrank_relative_error"] = self._errors
            config["lowrank_relative_error_max"] = max(self._errors.values())
        return config

def _whole(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter: under training.distributed: fsdp a parameter is a DTensor of
    which each process holds a shard, gathered here (a collective, so every process calls
    ``adapter_state``); any other tensor as it is."""
    gather = getattr(param, "full_tensor", None)
    return gather() if callable(gather) else param


def _check_listed(name: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """The weights file holds exactly the tensors the adapter's config lists (adapters saved
    before configs listed them are checked tensor by tensor only)."""
    listed = config.get("tensors")
    if listed is None:
        return
    missing, unexpected = sorted(set(listed) - set(state)), sorted(set(state) - set(listed))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise AdapterError(f"adapter {name!r}: the weights file does not match its config ({what}); the file is damaged or replaced")


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``delta`` (Eckart-Young, via SVD) and the relative
    Frobenius error of the approximation."""
    import torch

    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (m, r) (r,) (r, n)
    a = u[:, :rank] * s[:rank]  # (m, k)
    b = vh[:rank]  # (k, n)
    total = torch.linalg.vector_norm(s)
    error = float(torch.linalg.vector_norm(s[rank:]) / total) if total > 0 else 0.0
    return a.contiguous(), b.contiguous(), error


@hookimpl
def register_tuning_methods(register):
    register("full", FullMethod)
