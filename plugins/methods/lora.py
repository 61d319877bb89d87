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

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from plugtune import hookimpl
from plugtune.components import ComponentOptions
from plugtune.errors import AdapterError, RecipeError
from plugtune.tasks import Task

if TYPE_CHECKING:
    import torch
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

    # -- inference: one handler per host keeps one peft wrapper for all LoRA adapters ------

    _wrapper: Any = None

    def attach(
        self, model: torch.nn.Module, name: str, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> torch.nn.Module:
        from peft import PeftConfig, get_peft_model
        from peft.utils import set_peft_model_state_dict

        try:
            peft_config = PeftConfig.from_peft_type(**config)
        except Exception as exc:  # noqa: BLE001
            raise AdapterError(f"adapter {name!r}: unreadable LoRA config ({exc})") from None
        peft_config.inference_mode = True
        if self._wrapper is None:
            self._wrapper = get_peft_model(model, peft_config, adapter_name=name)
        else:
            self._wrapper.add_adapter(name, peft_config)
        result = set_peft_model_state_dict(self._wrapper, state, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k or k.endswith(f".{name}")]
        unexpected = list(result.unexpected_keys)
        if missing or unexpected:
            self.detach(model, name)
            detail = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {unexpected[:3]}" if unexpected else "")
            raise AdapterError(f"adapter {name!r} does not fit this base: {detail.strip()}")
        return self._wrapper

    def activate(self, model: torch.nn.Module, name: str | None) -> None:
        if self._wrapper is None:
            return
        if name is None:
            self._wrapper.base_model.disable_adapter_layers()
            return
        self._wrapper.base_model.enable_adapter_layers()
        self._wrapper.set_adapter(name, inference_mode=True)

    def merge(self, model: torch.nn.Module, name: str) -> torch.nn.Module:
        """Fold adapter ``name`` into the base weights and take every LoRA layer out; returns
        the bare model (used when a recipe's base_model is an adapter folder)."""
        wrapper = self._wrapper
        wrapper.set_adapter(name, inference_mode=True)
        merged = wrapper.merge_and_unload(adapter_names=[name])
        self._wrapper = None
        return merged

    def detach(self, model: torch.nn.Module, name: str) -> None:
        wrapper = self._wrapper
        if wrapper is None or name not in wrapper.peft_config:
            return
        if len(wrapper.peft_config) == 1:
            wrapper.unload()  # takes the LoRA layers out of the base, in place
            self._wrapper = None
            return
        if wrapper.active_adapter == name:
            wrapper.set_adapter(next(n for n in wrapper.peft_config if n != name))
        wrapper.delete_adapter(name)


@hookimpl
def register_tuning_methods(register):
    register("lora", LoraMethod)
