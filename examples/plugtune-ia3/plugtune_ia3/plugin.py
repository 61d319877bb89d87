"""``example_ia3``: (IA)^3 (Liu et al., 2022), learned vectors that rescale activations.

    method:
      name: example_ia3
      options:
        target_modules: [k_proj, v_proj, down_proj]   # dotted-suffix match
        feedforward_modules: [down_proj]              # scaled on the input, not the output

Two sides, as plugtune's protocols split a tuning method: :class:`IA3Method` trains through
peft's ``IA3Config`` and saves the adapter in peft's format (plain
``peft.PeftModel.from_pretrained`` loads it); :class:`IA3Handler` hosts saved adapters on an
``AdapterHost`` (:mod:`plugtune_ia3.hosting`): many resident at once, rows of one batch on
different adapters, merge/unmerge exact. Causal-lm tasks only.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from plugtune.sdk import AdapterError, ComponentOptions, PrepareContext, RecipeError, Task, hookimpl
from plugtune_ia3.hosting import HostedIA3, matches


class IA3Options(ComponentOptions):
    target_modules: list[str] = Field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"], min_length=1)
    feedforward_modules: list[str] = Field(default_factory=lambda: ["down_proj"])

    @model_validator(mode="after")
    def _feedforward_is_targeted(self) -> IA3Options:
        stray = [m for m in self.feedforward_modules if m not in self.target_modules]
        if stray:
            raise ValueError(f"feedforward_modules {stray} are not in target_modules")
        return self


class IA3Handler:
    """Host side: one :class:`HostedIA3` per base. Capabilities (plugtune's protocols, by
    having the members): ``MixesRows``, ``Folds``, ``Merges``, ``ReportsResidentBytes``."""

    Options = IA3Options
    attach_reads_base_weights: ClassVar[bool] = False  # attach reads shapes and stores vectors only

    def __init__(self, options: IA3Options) -> None:
        self.options = options
        self._hosted: HostedIA3 | None = None

    def _host(self, model: torch.nn.Module) -> HostedIA3:
        if self._hosted is None or self._hosted.model is not model:
            self._hosted = HostedIA3(model)
        return self._hosted

    def attach(self, model: torch.nn.Module, name: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.nn.Module:
        """Check every tensor first (strict), then wrap the targeted layers."""
        host = self._host(model)
        if name in host.resident:
            raise AdapterError(f"an IA3 adapter named {name!r} is already attached")
        host.add(name, host.check(name, state, config))
        return model

    def activate(self, model: torch.nn.Module, name: str | None) -> None:
        if self._hosted is not None:
            folded = self._hosted.folded is not None and self._hosted.folded[0] == name
            self._hosted.routing.active = None if folded or name not in self._hosted.resident else name

    def detach(self, model: torch.nn.Module, name: str) -> None:
        if self._hosted is not None and name in self._hosted.resident:
            self._hosted.remove(name)

    def mixed_rows(self, model: torch.nn.Module, names: list[str | None]) -> contextlib.AbstractContextManager[None]:
        """Scale each row of the next forwards by its own adapter's vectors (``None``: the
        bare base as far as IA3 is concerned)."""
        return self._host(model).mixed_rows(names)

    def fold(self, model: torch.nn.Module, name: str) -> None:
        self._host(model).fold(name)

    def unfold(self, model: torch.nn.Module) -> None:
        self._host(model).unfold()

    def merge(self, model: torch.nn.Module, name: str) -> torch.nn.Module:
        """Fold ``name`` into the base for good and take every wrapper out."""
        host = self._host(model)
        host.fold(name)
        host.folded = None
        for other in list(host.resident):
            host.remove(other)
        self._hosted = None
        return model

    def resident_bytes(self, model: torch.nn.Module, name: str) -> int:
        return self._host(model).resident_bytes(name)


class IA3Method:
    """Training side: peft's ``IA3Config`` on a causal LM."""

    Options = IA3Options
    handler: ClassVar[type] = IA3Handler

    def __init__(self, options: IA3Options) -> None:
        self.options = options

    @classmethod
    def check_task(cls, task: Task) -> str | None:
        """At validation: (IA)^3 here trains language-model heads only."""
        if task.head != "lm":
            return f"example_ia3 trains language-model heads only; task {task.type!r} has a {task.head} head (use lora for classification)"
        return None

    def prepare(self, model: torch.nn.Module, task: Task, context: PrepareContext) -> torch.nn.Module:
        from peft import IA3Config, get_peft_model

        reason = self.check_task(task)
        if reason:  # a recipe validated elsewhere, or a task built in code
            raise RecipeError([f"method.name: {reason}"])
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        if not any(matches(n, self.options.target_modules) for n in linear):
            ends = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise RecipeError([f"method.options.target_modules: {self.options.target_modules} matches no linear layer "
                               f"(its linear layers end in: {', '.join(ends)})"])
        config = IA3Config(target_modules=list(self.options.target_modules),
                           feedforward_modules=list(self.options.feedforward_modules), task_type="CAUSAL_LM")
        return get_peft_model(model, config)

    def adapter_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}

    def adapter_config(self, model: torch.nn.Module) -> dict[str, Any]:
        data = model.peft_config[model.active_adapter].to_dict()
        data["inference_mode"] = True
        return data


@hookimpl
def register_tuning_methods(register):
    register("example_ia3", IA3Method)
