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
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from plugtune import hookimpl
from plugtune.kernel.components import ComponentOptions
from plugtune.kernel.errors import RecipeError
from plugtune.data.tasks import Task

if TYPE_CHECKING:
    import torch

    from plugtune.plugins.methods.lora_hosting import HostedLoras
    from peft import LoraConfig

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
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"

    @model_validator(mode="after")
    def _regex_compiles(self) -> LoraOptions:
        if self.target_regex is not None:
            try:
                re.compile(self.target_regex)
            except re.error as exc:
                raise ValueError(f"target_regex is not a valid regular expression: {exc}") from None
        return self


def _linear_names(model: torch.nn.Module) -> list[str]:
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _peft_task_type(task: Task) -> str:
    return "SEQ_CLS" if task.is_classification else "CAUSAL_LM"


class LoraMethod:
    """LoRA through peft. Adapters are peft-native: ``PeftModel.from_pretrained`` loads them."""

    Options = LoraOptions

    def __init__(self, options: LoraOptions) -> None:
        self.options = options

    # -- training -----------------------------------------------------------------------

    def _config(self, model: torch.nn.Module, task: Task) -> LoraConfig:
        from peft import LoraConfig

        o = self.options
        linear = _linear_names(model)
        if o.target_regex is not None:
            targets: Any = o.target_regex
            matched = [n for n in linear if re.fullmatch(o.target_regex, n)]
        elif o.target_modules == "all-linear":
            targets, matched = "all-linear", linear
        else:
            targets = list(o.target_modules)
            matched = [n for n in linear if any(n == t or n.endswith("." + t) for t in targets)]
        if not matched:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise RecipeError(
                [f"method.options.target_modules: {targets!r} matches no linear layer of this model "
                 f"(its linear layers end in: {', '.join(suffixes)})"]
            )
        return LoraConfig(
            r=o.r,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            target_modules=targets,
            use_rslora=o.use_rslora,
            init_lora_weights=True if o.init == "default" else o.init,
            task_type=_peft_task_type(task),
            bias="none",
        )

    def prepare(self, model: torch.nn.Module, task: Task) -> torch.nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, self._config(model, task))

    def adapter_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}

    def adapter_config(self, model: torch.nn.Module) -> dict[str, Any]:
        config = model.peft_config[model.active_adapter]
        data = config.to_dict()
        data["inference_mode"] = True
        return data

    # -- host: one handler per host keeps every LoRA adapter in shared, routed layers -------
    # (see plugtune.plugins.methods.lora_hosting: a switch is one attribute write, a load a
    # dictionary insert per targeted layer, and rows of one batch may name different adapters)

    supports_mixed_batches = True  # rows of one forward may name different LoRA adapters
    attach_reads_base_weights = False  # attach stores tensors only, whatever is active

    def _host(self, model: torch.nn.Module) -> HostedLoras:
        from plugtune.plugins.methods.lora_hosting import HostedLoras

        state = getattr(self, "_host_state", None)
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
        state = getattr(self, "_host_state", None)
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
        state = getattr(self, "_host_state", None)
        if state is not None and name in state.resident:
            state.remove(name)

    def resident_bytes(self, model: torch.nn.Module, name: str) -> int:
        """Memory the adapter's tensors take on this host."""
        return self._host(model).resident_bytes(name)


@hookimpl
def register_tuning_methods(register):
    register("lora", LoraMethod)
