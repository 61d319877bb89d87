"""The adapter host's side of every peft tuner (LoHa, LoKr, VeRA, OFT, BOFT, IA3, AdaLoRA,
DoRA, LN tuning, ...): many adapters of any of them resident on one base, next to LoRA,
prefix and full-delta adapters, switched and mixed row by row.

The arithmetic is peft's own, never re-written: each adapter gets peft's tuner layers, built by
peft's injection (``BaseTuner``) over a *skeleton* -- a module tree that holds the base's own
leaf modules (its linear layers, norms, embeddings; found under any wrapper other handlers put
on them) at their real paths, so peft's target matching, rank patterns and shared state (VeRA's
projections) work as on the full model, while the base itself is never touched. The adapter's
tensors go in through peft's ``set_peft_model_state_dict`` on a :class:`_Shadow` that looks like
a ``PeftModel`` to it. Each adapter keeps its own tuner (its layers hold that adapter alone,
under peft's name ``default``), so adapters of one peft type never share peft's per-layer state.

On the base, every path an adapter adapts gets one :class:`RoutedModule` wrapper (around
whatever stack sits there, by the SDK's wrapper rules). For each resident adapter it keeps a
function that runs that adapter's peft layer on the *bare* module. Why the bare module: the
host activates at most one adapter, and in a mixed batch it tells every handler only its own
rows, so for a row routed to one of these adapters every other wrapper at the path adds
nothing; running the bare module with the adapter is then exactly what the adapter alone
gives, whatever the other wrappers are.

* one adapter active: the wrapper returns ``layer(x)`` for it, or passes ``x`` down the stack;
* a mixed batch: ``out = stack(x)`` once, then each of this handler's adapters writes its own
  rows (``out.index_copy(0, rows, layer(x[rows]))``): every row is computed once, by its own
  adapter's peft code, so a batch of DoRA, LoHa, LoRA and bare-base rows equals each row alone;
* fold/unfold: peft's ``merge`` into the bare module (originals kept, copied back bit for bit).

Modules an adapter saves whole (a classification head, peft's ``modules_to_save``) are run
the same way with the adapter's parameters (``torch.func.functional_call``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from plugtune.plugins.methods.lora_hosting import fit_whole
from plugtune.sdk import AdapterError, original_module, remove_wrapper, replace_module

PEFT_PREFIX = "base_model.model."
SLOT = "default"  # peft's adapter name inside each adapter's own tuner


@dataclass
class Routing:
    """Which of this handler's adapters each forward runs; shared by all its wrappers.
    ``groups`` (a mixed batch) overrides ``active``: ``(adapter, row indices)`` per adapter."""

    active: str | None = None
    groups: list[tuple[str, torch.Tensor]] | None = None


class RoutedModule(nn.Module):
    """One path of the base: ``base_layer`` (the stack below) plus, per resident adapter, a
    function running that adapter on the bare module (see the module docs)."""

    def __init__(self, base_layer: nn.Module, routing: Routing) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.runs: dict[str, Callable[..., torch.Tensor]] = {}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        routing = self.routing
        if routing.groups is None:
            run = self.runs.get(routing.active) if routing.active is not None else None
            return run(x, *args, **kwargs) if run is not None else self.base_layer(x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        for name, rows in routing.groups:
            run = self.runs.get(name)
            if run is not None:
                out = out.index_copy(0, rows, run(x.index_select(0, rows), *args, **kwargs).to(out.dtype))
        return out


class _Shadow(nn.Module):
    """Looks like a ``PeftModel`` to peft's state-dict functions: ``base_model`` is the
    adapter's tuner, whose ``model`` is the skeleton."""

    def __init__(self, tuner: nn.Module) -> None:
        super().__init__()
        self.base_model = tuner

    @property
    def peft_config(self) -> dict[str, Any]:
        return self.base_model.peft_config

    def __getattr__(self, name: str) -> Any:  # peft calls tuner methods on "the model" (AdaLoRA's resize)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)


@dataclass
class Resident:
    """One attached adapter: its shadow (tuner and skeleton), the paths it runs at (tuner
    layers and modules saved whole) and how many bytes its tensors take."""

    shadow: _Shadow
    layers: dict[str, nn.Module] = field(default_factory=dict)  # path -> peft tuner layer
    whole: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # path -> {param: value}
    nbytes: int = 0


def bare_leaves(model: nn.Module) -> dict[str, nn.Module]:
    """Every leaf module of the base at its path, seen through any wrapper stack: a wrapped
    path maps to the module at the bottom of its stack (the base's own)."""
    leaves: dict[str, nn.Module] = {}

    def walk(prefix: str, module: nn.Module) -> None:
        bare = original_module(module)
        if bare is not module or not any(True for _ in module.children()):
            leaves[prefix] = bare
            return
        for child_name, child in module.named_children():
            walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    for name, child in model.named_children():
        walk(name, child)
    return leaves


def skeleton(leaves: dict[str, nn.Module]) -> nn.Module:
    """A module tree holding ``leaves`` at their paths (containers are empty modules)."""
    root = nn.Module()
    for path, module in leaves.items():
        parent = root
        *parents, last = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(last, module)
    return root


def read_config(name: str, config: dict[str, Any]) -> Any:
    """The adapter's peft config object, or a one-line :class:`AdapterError`."""
    from peft import PeftConfig

    if not isinstance(config.get("peft_type"), str):
        raise AdapterError(f"adapter {name!r}: adapter_config.json has no peft_type; this handler hosts peft tuner adapters")
    try:
        peft_config = PeftConfig.from_peft_type(**config)
    except Exception as exc:  # noqa: BLE001 - peft raises TypeError/ValueError/KeyError for bad configs
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AdapterError(f"adapter {name!r}: adapter_config.json is not a valid {config['peft_type']} config ({first[:200]})") from None
    if peft_config.is_prompt_learning or peft_config.is_adaption_prompt:
        raise AdapterError(f"adapter {name!r} is {config['peft_type']}, a prompt-learning method; it is hosted by its own method's handler")
    peft_config.inference_mode = True
    return peft_config


def _split_state(name: str, state: dict[str, torch.Tensor], leaves: dict[str, nn.Module],
                 prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The tuner's tensors (for peft: those under a module's ``prefix`` attribute, such as
    ``hada_``, and the tuner's shared ones, such as VeRA's ``base_model.vera_A``) and the
    modules saved whole (path -> {param: value})."""
    tuner: dict[str, torch.Tensor] = {}
    whole: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise AdapterError(f"adapter {name!r}: tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                               f"adapter weights are floating point")
        if not key.startswith(PEFT_PREFIX):
            if not key.startswith("base_model."):
                raise AdapterError(f"adapter {name!r}: tensor {key!r} is not named like a peft adapter's (base_model.model.<module>...)")
            tuner[key] = tensor  # the tuner's own state, shared by its layers
            continue
        path = key.removeprefix(PEFT_PREFIX)
        owner = path.rpartition(".")[0]
        while owner and owner not in leaves:
            owner = owner.rpartition(".")[0]
        if not owner:
            raise AdapterError(f"adapter {name!r} does not fit this base: tensor {key!r} names no module of it")
        rest = path[len(owner) + 1:]
        if rest.startswith(prefix):
            tuner[key] = tensor
        else:
            whole.setdefault(owner, {})[rest] = tensor  # a module saved whole (a classification head)
    return tuner, whole


class PeftLayers:
    """The state of one handler on one base: the routing its wrappers share, the wrappers,
    and every resident adapter (see the module docs)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.routing = Routing()
        self.wrappers: dict[str, RoutedModule] = {}
        self.resident: dict[str, Resident] = {}
        self.merged: tuple[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.last_mixed: tuple[tuple[str | None, ...], list[tuple[str, torch.Tensor]]] | None = None

    # -- attaching ---------------------------------------------------------------------------

    def attach(self, name: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        from peft.utils import PeftType
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

        peft_config = read_config(name, config)
        leaves = bare_leaves(self.model)
        prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(PeftType(peft_config.peft_type), "")
        tuner_state, whole = _split_state(name, state, leaves, prefix)
        if not tuner_state:
            raise AdapterError(f"adapter {name!r} has no {peft_config.peft_type} tensors")
        resident = Resident(self._inject(name, peft_config, tuner_state, leaves))
        resident.layers = {path: module for path, module in _tuner_layers(resident.shadow.base_model.model)}
        resident.whole = {path: fit_whole(name, path, params, leaves[path]) for path, params in whole.items()}
        for layer in resident.layers.values():
            layer.eval()  # the host never trains: no dropout
        resident.nbytes = sum(t.nbytes for t in _adapter_tensors(resident, leaves))
        self.resident[name] = resident
        for path, layer in resident.layers.items():
            self._wrapper(path).runs[name] = layer
        for path, params in resident.whole.items():
            bare = leaves[path]
            self._wrapper(path).runs[name] = _functional(bare, params)

    def _inject(self, name: str, peft_config: Any, state: dict[str, torch.Tensor], leaves: dict[str, nn.Module]) -> _Shadow:
        """peft's tuner for this adapter over a skeleton of the base, its tensors loaded."""
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        config = copy.deepcopy(peft_config)
        config.modules_to_save = None  # modules saved whole are run by the wrappers, not by peft
        if getattr(config, "target_modules", None) == "all-linear":  # peft resolves it on a transformers model only
            config.target_modules = sorted({k.removeprefix(PEFT_PREFIX).rsplit(".", 1)[0].split(".lora_")[0] for k in state})
        tree = skeleton(leaves)
        tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
        try:
            with _quiet():
                tuner = tuner_cls(tree, config, adapter_name=SLOT)
        except (ValueError, TypeError, KeyError, RuntimeError) as exc:
            raise AdapterError(f"adapter {name!r} does not fit this base: peft cannot build its layers "
                               f"({(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]})") from None
        shadow = _Shadow(tuner)
        try:
            result = set_peft_model_state_dict(shadow, state, adapter_name=SLOT)
        except RuntimeError as exc:  # a shape mismatch
            raise AdapterError(f"adapter {name!r} does not fit this base: {_first_line(exc)}") from None
        if result.unexpected_keys:
            raise AdapterError(f"adapter {name!r} does not fit this base: tensor(s) {sorted(result.unexpected_keys)[:3]} "
                               f"name nothing its config adapts")
        missing = set(get_peft_model_state_dict(shadow, adapter_name=SLOT)) - set(state)  # what a save would hold
        if missing:
            raise AdapterError(f"adapter {name!r} lacks tensor(s) its config needs: {sorted(missing)[:3]}")
        return shadow

    def _wrapper(self, path: str) -> RoutedModule:
        if path not in self.wrappers:
            self.wrappers[path] = RoutedModule(self.model.get_submodule(path), self.routing)
            replace_module(self.model, path, self.wrappers[path])
        return self.wrappers[path]

    # -- detaching -----------------------------------------------------------------------------

    def detach(self, name: str) -> None:
        if self.merged is not None and self.merged[0] == name:
            self.unfold()
        if self.routing.active == name:
            self.routing.active = None
        resident = self.resident.pop(name)
        self.last_mixed = None
        for path in [*resident.layers, *resident.whole]:
            wrapper = self.wrappers[path]
            wrapper.runs.pop(name, None)
            if not wrapper.runs:  # the last adapter at this path: the wrapper leaves the stack
                remove_wrapper(self.model, path, wrapper)
                del self.wrappers[path]

    # -- routing ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def mixed_rows(self, names: list[str | None]) -> Iterator[None]:
        routing = self.routing
        previous = routing.active, routing.groups
        if len(set(names)) == 1:
            routing.active, routing.groups = names[0], None
        else:
            key = tuple(names)
            if self.last_mixed is None or self.last_mixed[0] != key:  # the next decode step reuses the index tensors
                device = next(self.model.parameters()).device
                groups = [(adapter, torch.tensor([i for i, n in enumerate(names) if n == adapter], device=device))
                          for adapter in dict.fromkeys(n for n in names if n is not None)]
                self.last_mixed = (key, groups)
            routing.groups = self.last_mixed[1]
        try:
            yield
        finally:
            routing.active, routing.groups = previous

    # -- folding ----------------------------------------------------------------------------------

    def fold(self, name: str) -> None:
        """peft's ``merge`` of adapter ``name`` into the bare modules, the touched tensors'
        originals kept; every wrapper leaves the stack while it is folded."""
        if self.merged is not None:
            raise AdapterError(f"adapter {self.merged[0]!r} is already merged into the base; unmerge it first")
        resident = self.resident[name]
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for layer in resident.layers.values():
                bare = layer.get_base_layer()
                kept += [(t, t.detach().clone()) for t in bare.parameters()]
                layer.merge(adapter_names=[SLOT])
                merged = layer.get_base_layer()
                if merged is not bare:  # LN tuning merges by swapping in its own copy of the module
                    for target, value in zip(bare.parameters(), merged.parameters()):
                        target.copy_(value)
                    layer.unmerge()
                else:
                    layer.merged_adapters = []  # the kept originals undo it, not peft's unmerge
            for path, params in resident.whole.items():
                own = dict(original_module(self.wrappers[path]).named_parameters())
                for pname, value in params.items():
                    kept.append((own[pname], own[pname].detach().clone()))
                    own[pname].copy_(value)
        self.merged = (name, kept)
        self.routing.active = None
        for path, wrapper in self.wrappers.items():
            remove_wrapper(self.model, path, wrapper)

    def unfold(self) -> None:
        if self.merged is None:
            return
        with torch.no_grad():
            for tensor, original in self.merged[1]:
                tensor.copy_(original)
        self.merged = None
        for path, wrapper in self.wrappers.items():
            wrapper.base_layer = self.model.get_submodule(path)
            replace_module(self.model, path, wrapper)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """peft warns about things that do not apply to a skeleton (no model config, unused
    target entries of a pattern); the host's own checks say what matters."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _tuner_layers(tree: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for path, module in tree.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield path, module


def _adapter_tensors(resident: Resident, leaves: dict[str, nn.Module]) -> list[torch.Tensor]:
    """The adapter's own tensors on the host: everything its tuner holds (layers, shared
    state such as VeRA's projections) except the base's modules the skeleton borrowed, and
    the whole modules' values; each once."""
    seen: dict[int, torch.Tensor] = {}
    base = {id(t) for module in leaves.values() for t in [*module.parameters(), *module.buffers()]}
    tuner = resident.shadow.base_model
    for tensor in [*tuner.parameters(), *tuner.buffers(), *(v for p in resident.whole.values() for v in p.values())]:
        if id(tensor) not in base:
            seen[id(tensor)] = tensor
    return list(seen.values())


def _functional(module: nn.Module, params: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.func.functional_call(module, params, (x, *args), kwargs, strict=False)

    return run


# -- conversion to LoRA (PeftHandler.combine) ------------------------------------------------------


def as_lora(model: nn.Module, subject: str, state: dict[str, torch.Tensor], config: dict[str, Any],
            folder: Any) -> tuple[Any, dict[str, int]]:
    """Write adapter (``state``, ``config``) as an equivalent LoRA adapter (peft's format)
    into ``folder``; returns the folder and the rank of each converted layer.

    Exact by construction: a layer converts only when its output is the base's plus ``x`` times
    peft's ``get_delta_weight`` (checked on a random input), and the factors are that matrix's
    SVD at its numerical rank (singular values below 1e-6 of the largest left out). peft's
    ``convert_to_lora`` is not used because it takes one rank (or energy threshold) for every
    layer and trusts each tuner's ``supports_lora_conversion`` flag, which LoHa does not set
    although its update is an added matrix."""
    import json
    from pathlib import Path

    from peft import LoraConfig
    from safetensors.torch import save_file

    layers = PeftLayers(model)
    layers.attach("convert", state, config)
    try:
        resident = layers.resident["convert"]
        if resident.whole:
            raise AdapterError(f"{subject} replaces module(s) {sorted(resident.whole)[:2]} whole; only adapters whose "
                               f"every update is an added matrix can be combined")
        lora_state, ranks = {}, {}
        for path, layer in resident.layers.items():
            a, b = _lora_factors(subject, config.get("peft_type"), path, layer)
            lora_state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.contiguous()
            lora_state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.contiguous()
            ranks[path] = a.shape[0]
    finally:
        layers.detach("convert")
    top = max(ranks.values())
    lora = LoraConfig(r=top, lora_alpha=top, rank_pattern=dict(ranks), alpha_pattern=dict(ranks),  # scaling 1 everywhere
                      target_modules=sorted(ranks), task_type=config.get("task_type")).to_dict()
    lora["inference_mode"] = True
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(lora_state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(lora, default=list))
    return folder, ranks


def _lora_factors(subject: str, peft_type: Any, path: str, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    bare = layer.get_base_layer()
    delta_of = getattr(layer, "get_delta_weight", None)
    refusal = (f"{subject}: its {peft_type} update at {path} is not an added matrix, so it cannot become LoRA "
               f"exactly and cannot be combined; serve it beside the others instead")
    if not isinstance(bare, nn.Linear) or delta_of is None:
        raise AdapterError(refusal)
    with torch.no_grad():
        delta = delta_of(SLOT).float()
        x = torch.randn(8, bare.in_features, generator=torch.Generator().manual_seed(0)).to(bare.weight)
        update = (layer(x) - bare(x)).float()
        if tuple(delta.shape) != (bare.out_features, bare.in_features) or not torch.allclose(
                update, x.float() @ delta.T, rtol=1e-4, atol=1e-5 * max(1.0, float(update.abs().max()))):
            raise AdapterError(refusal)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        keep = max(1, int((s > s[0] * 1e-6).sum())) if float(s[0]) > 0 else 1
        return vh[:keep].to(bare.weight.dtype), (u[:, :keep] * s[:keep]).to(bare.weight.dtype)
