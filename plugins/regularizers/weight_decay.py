"""``weight_decay``: shrink trainable weights toward zero.

``mode: decoupled`` (default) is AdamW's decoupled decay on weight matrices, with biases and
norm scales exempt (the usual practice; decaying a LayerNorm's gain toward zero hurts).
``mode: l2`` instead adds ``strength/2 * sum ||w||^2`` to the loss, which interacts with
Adam's scaling and is offered for comparison. Either way the norm of the decayed weights is
logged every step as ``weight_decay/norm``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from plugtune import hookimpl
from plugtune.sdk import ComponentOptions

if TYPE_CHECKING:
    import torch


class WeightDecayOptions(ComponentOptions):
    strength: float = Field(0.01, ge=0)
    mode: Literal["decoupled", "l2"] = "decoupled"


def _decays(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim >= 2 and "norm" not in name.lower()


class WeightDecay:
    Options = WeightDecayOptions
    needs_logits = False  # its loss term reads the weights only

    def __init__(self, options: WeightDecayOptions) -> None:
        self.options = options
        self._decayed: list[torch.nn.Parameter] = []

    def param_groups(self, named_params: list[tuple[str, torch.nn.Parameter]]) -> list[dict[str, Any]]:
        decay = [p for n, p in named_params if _decays(n, p)]
        rest = [p for n, p in named_params if not _decays(n, p)]
        self._decayed = decay
        strength = self.options.strength if self.options.mode == "decoupled" else 0.0
        return [{"params": decay, "weight_decay": strength}, {"params": rest, "weight_decay": 0.0}]

    def loss_term(self, model: torch.nn.Module, batch: Any, outputs: Any, step: int) -> torch.Tensor | None:
        if self.options.mode != "l2" or not self._decayed:
            return None
        return 0.5 * self.options.strength * sum(p.pow(2).sum() for p in self._decayed)

    def report(self, model: torch.nn.Module) -> dict[str, float]:
        import torch

        with torch.no_grad():
            norm = torch.sqrt(sum(p.detach().float().pow(2).sum() for p in self._decayed)) if self._decayed else torch.tensor(0.0)
        return {"norm": float(norm)}


@hookimpl
def register_regularizers(register):
    register("weight_decay", WeightDecay)
