"""``lora``: low-rank adapters on peft.

Target-module matching rule (explicit, because peft's own depends on the type):

* ``target_modules: [q_proj, v_proj]`` matches a module whose dotted name *ends with* one of
  the entries at a dot boundary (``model.layers.0.self_attn.q_proj`` matches ``q_proj``;
  ``self_attn.q_proj`` also works). ``all-linear`` selects every linear layer except the
  output head.
* ``target_regex: '.*\\.(q|v)_proj'`` instead matches the *whole* dotted name as a regular
  expression (``re.fullmatch``).

A pattern that matches nothing is an error that lists the linear layers the model has.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from plugtune import hookimpl
from plugtune.sdk import AdapterError, Combined, ComponentOptions, PrepareContext, RecipeError, Task

if TYPE_CHECKING:
    import torch

    from peft import LoraConfig

    from plugtune.sdk import Adapter
    from plugtune.artifacts.models import LoadedBase
    from plugtune.sdk import ModelOutline
    from plugtune.plugins.methods.lora_hosting import HostedLoras

# peft (and torch) are imported inside the methods: `plugtune validate` and `plugtune
# plugins` stay fast because registering this plugin does not import them.


class LoraOptions(ComponentOptions):
    r: int = Field(8, gt=0, description="rank of the update")
    alpha: float = Field(16, gt=0, description="scaling numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="dotted-suffix match (see module docs), or all-linear",
    )
    target_regex: str | None = Field(None, description="full-match regex over dotted module names; replaces target_modules")
    use_rslora: bool = False
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = Field(
        "default", description="peft's init_lora_weights; loftq needs a CUDA GPU and bitsandbytes (see loftq_bits)")
    loftq_bits: Literal[4, 8] = Field(4, description="init: loftq: the bits of the quantization LoftQ initialises against")
    loftq_iter: int = Field(1, gt=0, le=100, description="init: loftq: alternating quantize/SVD steps")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, le=10_000, allow_inf_nan=False,
        description="LoRA+: the B matrices learn at training.learning_rate times this (its paper suggests 16); null: one rate")

    @model_validator(mode="after")
    def _regex_compiles(self) -> LoraOptions:
        if self.target_regex is not None:
            try:
                re.compile(self.target_regex)
            except re.error as exc:
                raise ValueError(f"target_regex is not a valid regular expression: {exc}") from None
        return self


def peft_targets(options: LoraOptions) -> str | list[str]:
    """What peft's ``LoraConfig`` gets: the regex (peft full-matches a string), ``all-linear``,
    or the list of suffixes."""
    if options.target_regex is not None:
        return options.target_regex
    return "all-linear" if options.target_modules == "all-linear" else list(options.target_modules)


def targeted(options: LoraOptions, linear: Sequence[str]) -> list[str]:
    """The names in ``linear`` (dotted linear-layer names) the options target, by the rule in
    the module docs: full-match ``target_regex``, ``all-linear``, or dotted-suffix match.
    Used on the loaded model (``prepare``) and on its outline (``check_model``) alike."""
    if options.target_regex is not None:
        return [n for n in linear if re.fullmatch(options.target_regex, n)]
    if options.target_modules == "all-linear":
        return list(linear)
    return [n for n in linear if any(n == t or n.endswith("." + t) for t in options.target_modules)]


def unmatched_targets(options: LoraOptions, linear: Sequence[str]) -> str | None:
    """``"<field>: ... matches no linear layer ..."`` (the field inside ``options``) when the
    options target none of ``linear``, naming the suffixes the model's linear layers have;
    None when they target at least one."""
    if targeted(options, linear):
        return None
    field = "target_regex" if options.target_regex is not None else "target_modules"
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
    return (f"{field}: {peft_targets(options)!r} matches no linear layer of this model "
            f"(its linear layers end in: {', '.join(suffixes) or 'none'})")


def _linear_names(model: torch.nn.Module) -> list[str]:
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _peft_task_type(task: Task) -> str:
    return "SEQ_CLS" if task.is_classification else "CAUSAL_LM"


class LoraHandler:
    """LoRA's host side: every LoRA adapter on a base lives in shared, routed layers (see
    :mod:`plugtune.plugins.methods.lora_hosting`): a switch is one attribute write, a load a
    dictionary insert per targeted layer, and rows of one batch may name different adapters.

    Capabilities: mixes rows, folds/unfolds, merges, reports resident bytes, combines (peft's
    ``add_weighted_adapter``), exports as plain LoRA."""

    Options = LoraOptions
    attach_reads_base_weights = False  # attach stores tensors only, whatever is active

    def __init__(self, options: LoraOptions) -> None:
        self.options = options
        self._host_state: HostedLoras | None = None

    def _host(self, model: torch.nn.Module) -> HostedLoras:
        from plugtune.plugins.methods.lora_hosting import HostedLoras

        state = self._host_state
        if state is None or state.model is not model:
            state = self._host_state = HostedLoras(model)
        return state

    def attach(
        self, model: torch.nn.Module, name: str, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> torch.nn.Module:
        """Put adapter ``name``'s tensors into the hosted layers (wrapping a layer the first
        time any adapter targets it). Everything is checked before the model is touched."""
        from plugtune.plugins.methods.lora_hosting import check_config, parse_state

        host = self._host(model)
        check_config(name, config)
        parsed = parse_state(name, state, host.modules)
        pairs = {path: host.check_pair(name, path, pair["A"], pair["B"], config) for path, pair in parsed.pairs.items()}
        whole = {path: host.check_whole(name, path, params) for path, params in parsed.whole.items()}
        for path, weights in pairs.items():
            layer = host.layer(path)
            layer.weights[name] = weights
            layer.forget_stack()
        for path, params in whole.items():
            host.switched(path).values[name] = params
        host.resident[name] = (list(pairs), list(whole))
        return model

    def activate(self, model: torch.nn.Module, name: str | None) -> None:
        state = self._host_state
        if state is not None:
            merged = state.merged is not None and state.merged[0] == name
            state.routing.active = None if merged else name  # a merged adapter is in the weights

    def mixed_rows(self, model: torch.nn.Module, names: list[str | None]) -> contextlib.AbstractContextManager[None]:
        """Route each row of the next forwards to its own adapter (``None``: the bare base)."""
        return self._host(model).mixed_rows(names)

    def fold(self, model: torch.nn.Module, name: str) -> None:
        """Add adapter ``name`` into the base weights (keeping the originals of the touched
        tensors for :meth:`unfold`); the hosted layers then add nothing."""
        self._host(model).fold(name)

    def unfold(self, model: torch.nn.Module) -> None:
        """Undo :meth:`fold` by copying the kept original tensors back (bit for bit)."""
        self._host(model).unfold()

    def merge(self, model: torch.nn.Module, name: str) -> torch.nn.Module:
        """Fold adapter ``name`` into the base weights and take every hosted layer out;
        returns the bare model (used when a recipe's base_model is an adapter folder)."""
        host = self._host(model)
        host.fold(name)
        host.merged = None  # for good: the originals are dropped with the layers
        for other in list(host.resident):
            host.remove(other)
        self._host_state = None
        return model

    def detach(self, model: torch.nn.Module, name: str) -> None:
        state = self._host_state
        if state is not None and name in state.resident:
            state.remove(name)

    def resident_bytes(self, model: torch.nn.Module, name: str) -> int:
        """Memory the adapter's tensors take on this host."""
        return self._host(model).resident_bytes(name)

    def combine(self, model: torch.nn.Module, parents: Sequence[Adapter], weights: Sequence[float],
                options: Mapping[str, Any]) -> Combined:
        """peft's ``add_weighted_adapter`` over the parents (see :func:`combine_loras`)."""
        return combine_loras(model, parents, weights, **dict(options))

    def plain_lora(self, adapter: Adapter) -> Any:
        """The adapter's factors and scalings as they are (``plugtune export``); refuses the
        LoRA variants without an exact plain form (see :func:`~plugtune.plugins.methods.lora_hosting.plain_lora_of`)."""
        from plugtune.plugins.methods.lora_hosting import plain_lora_of

        return plain_lora_of(f"adapter {str(adapter.path)!r}", adapter.state, adapter.config)


def peft_adapter_off(self: Any, model: Any) -> contextlib.AbstractContextManager[None]:
    """``adapter_disabled`` of every method whose ``prepare`` returns a ``PeftModel``: peft's
    ``disable_adapter``, which runs the base as loaded (tuner layers bypassed, saved modules'
    originals used, prompt-learning's virtual tokens left out) and restores the adapter on
    exit. The reference of preference tasks (core/training/reference.py) comes from here."""
    return model.disable_adapter()


class LoraMethod:
    """LoRA through peft. Adapters are peft-native: ``PeftModel.from_pretrained`` loads them."""

    Options = LoraOptions
    handler: ClassVar[type] = LoraHandler

    adapter_disabled = peft_adapter_off

    def __init__(self, options: LoraOptions) -> None:
        self.options = options

    # -- training -----------------------------------------------------------------------

    def reference_learning_rate(self) -> float:
        """AdamW's rate at a 512-wide model with 16 rows per step (bench/methods.py's search chose 3e-3
        at MiniLM's width 384; the SmolLM2 recipes train at 1e-3 with 8 rows); ``learning_rate:
        auto`` scales it to the model and batch (core/training/rates.py)."""
        return 2e-3

    def _config(self, model: torch.nn.Module, task: Task) -> LoraConfig:
        from peft import LoftQConfig, LoraConfig

        o = self.options
        targets = peft_targets(o)
        problem = unmatched_targets(o, _linear_names(model))
        if problem:
            raise RecipeError([f"method.options.{problem}"])
        return LoraConfig(
            r=o.r,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            target_modules=targets,
            use_rslora=o.use_rslora,
            init_lora_weights=True if o.init == "default" else o.init,
            loftq_config=LoftQConfig(loftq_bits=o.loftq_bits, loftq_iter=o.loftq_iter) if o.init == "loftq" else {},
            task_type=_peft_task_type(task),
            bias="none",
        )

    def preflight(self) -> str | None:
        """``init: loftq`` runs peft's LoftQ, which quantizes with bitsandbytes on a CUDA
        device (peft 0.21 hard-codes it): refused at validation where either is missing."""
        if self.options.init != "loftq":
            return None
        import importlib.util

        import torch

        if importlib.util.find_spec("bitsandbytes") is None:
            return "options.init: loftq needs bitsandbytes (pip install 'plugtune[int8]')"
        if not torch.cuda.is_available():
            return "options.init: loftq needs a CUDA GPU (peft runs LoftQ's quantization on cuda); use pissa or olora on a CPU"
        return None

    def check_model(self, outline: ModelOutline, task: Task) -> list[str]:
        """At validation: the targets must select at least one linear layer of the base."""
        problem = unmatched_targets(self.options, outline.linear_names())
        return [f"options.{problem}"] if problem else []

    def prepare(self, model: torch.nn.Module, task: Task, context: PrepareContext) -> torch.nn.Module:
        from peft import get_peft_model

        peft_model = get_peft_model(model, self._config(model, task))
        self._b_parameters = {id(p) for n, p in peft_model.named_parameters() if ".lora_B." in n or ".lora_embedding_B." in n}
        return peft_model

    def optimizer(self, param_groups: list[dict[str, Any]], lr: float) -> Any:
        """AdamW over :meth:`loraplus_groups` (the core's default optimizer when LoRA+ is off)."""
        import torch

        return torch.optim.AdamW(self.loraplus_groups(param_groups, lr), lr=lr)

    def loraplus_groups(self, param_groups: list[dict[str, Any]], lr: float) -> list[dict[str, Any]]:
        """With ``loraplus_lr_ratio`` (LoRA+, Hayou et al. 2024), each group split in two: the
        ``B`` matrices at the group's rate times the ratio, the rest at the group's rate; the
        groups' other settings (a regularizer's weight decay) kept. The same rule as peft's
        ``create_loraplus_optimizer``, written over the core's groups because peft's builds its
        own groups from the model and would drop those settings."""
        ratio = self.options.loraplus_lr_ratio
        if ratio is None:
            return param_groups
        b_parameters = getattr(self, "_b_parameters", set())
        out = []
        for group in param_groups:
            rest = [p for p in group["params"] if id(p) not in b_parameters]
            b = [p for p in group["params"] if id(p) in b_parameters]
            out += [{**group, "params": rest}] if rest else []
            out += [{**group, "params": b, "lr": group.get("lr", lr) * ratio}] if b else []
        return out

    def adapter_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}

    def adapter_config(self, model: torch.nn.Module) -> dict[str, Any]:
        config = model.peft_config[model.active_adapter]
        data = config.to_dict()
        data["inference_mode"] = True
        return data



# -- combining (LoraHandler.combine) ------------------------------------------------------

COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
NEEDS_DENSITY = {m for m in COMBINATIONS if m.startswith(("ties", "dare", "magnitude"))}


def combine_loras(model: torch.nn.Module, parents: Sequence[Adapter], weights: Sequence[float], *,
                  method: str = "linear", density: float | None = None, svd_rank: int | None = None,
                  majority_sign_method: str = "total") -> Combined:
    """Combine LoRA adapters with peft's ``add_weighted_adapter`` on ``model`` (the bare base).

    ``method`` is peft's: ``linear`` (A and B weighted separately; the parents must share a
    rank; weights [1, 0] give the first parent exactly), ``cat`` (ranks concatenated: the
    exact weighted sum of the parents' updates), ``svd`` (the weighted sum re-factored at
    ``svd_rank``), ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (with
    ``density``: the fraction of each update kept) and their ``_svd`` forms."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    if method not in COMBINATIONS:
        raise AdapterError(f"unknown combination method {method!r}; choose one of {', '.join(COMBINATIONS)}")
    if method in NEEDS_DENSITY and density is None:
        raise AdapterError(f"combination method {method!r} needs a density (the fraction of each update kept), e.g. --density 0.5")
    if density is not None and not 0 < density <= 1:
        raise AdapterError(f"density must be in (0, 1], got {density}")
    slots = [f"parent{i}" for i in range(len(parents))]
    peft_model = PeftModel.from_pretrained(model, str(parents[0].path), adapter_name=slots[0])
    for slot, adapter in zip(slots[1:], parents[1:]):
        peft_model.load_adapter(str(adapter.path), adapter_name=slot)
    try:
        peft_model.add_weighted_adapter(slots, list(weights), adapter_name="combined", combination_type=method,
                                        density=density, svd_rank=svd_rank, majority_sign_method=majority_sign_method)
    except (ValueError, TypeError) as exc:
        raise AdapterError(f"peft cannot combine these adapters with {method!r}: {str(exc).splitlines()[0]}") from None
    state = get_peft_model_state_dict(peft_model, adapter_name="combined")
    config = peft_model.peft_config["combined"].to_dict()
    config["inference_mode"] = True
    targets = config["target_modules"]
    return Combined(
        state={k: v.detach().cpu() for k, v in state.items()},
        config=config,
        options={"r": config["r"], "alpha": config["lora_alpha"],
                 "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets},
        record={"method": method, "weights": list(weights), "density": density, "svd_rank": svd_rank,
                "majority_sign_method": majority_sign_method, "peft": "add_weighted_adapter"},
        method=LoraMethod,  # int8-trained parents combine into an ordinary LoRA adapter
    )


# -- synthetic adapters ----------------------------------------------------------------------


def random_lora_adapter(directory: str | Path, base: LoadedBase, task: Task, *, name: str | None = None, r: int = 8,
                        alpha: float = 16, targets: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 0,
                        scale: float = 0.05) -> Path:
    """Write a random rank-``r`` LoRA adapter (an ordinary plugtune adapter) on every linear
    layer of ``base`` whose name ends in one of ``targets``; ``A`` ~ N(0, 1/in_features),
    ``B`` ~ N(0, scale^2) (not peft's zero init, so each adapter really changes the output).
    For benchmarks and tests that need many adapters without training any; the tensors
    carry peft's names and the config is peft's ``LoraConfig``, so plain peft loads them."""
    import torch
    from peft import LoraConfig

    from plugtune.artifacts.adapters import save_adapter

    directory = Path(directory)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), task_type=_peft_task_type(task)).to_dict()
    config["inference_mode"] = True
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module_name, module in base.model.named_modules():
        if isinstance(module, torch.nn.Linear) and module_name.rsplit(".", 1)[-1] in targets:
            state[f"base_model.model.{module_name}.lora_A.weight"] = (
                torch.randn(r, module.in_features, generator=gen) / module.in_features ** 0.5)
            state[f"base_model.model.{module_name}.lora_B.weight"] = torch.randn(module.out_features, r, generator=gen) * scale
    manifest = {"name": name or directory.name,
                "method": {"name": "lora", "options": {"r": r, "alpha": alpha, "target_modules": list(targets)},
                           "plugin": "lora", "distribution": "plugtune"},
                "base_model": base.info.to_dict(), "task": task.to_dict(), "training": {"synthetic": True, "seed": seed}}
    return save_adapter(directory, state=state, config=config, manifest=manifest)


@hookimpl
def register_tuning_methods(register):
    register("lora", LoraMethod)
