"""``loss`` and ``perplexity``: mean cross-entropy over target tokens (response tokens for
causal LMs, one per example for classification), and its exponential."""

from __future__ import annotations

import math
from typing import Any

from plugtune import hookimpl
from plugtune.sdk import EvalBatch, NoOptions


class _MeanLoss:
    Options = NoOptions

    def __init__(self, options: Any = None, task: Any = None) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum = 0.0
        self.count = 0

    def update(self, batch: EvalBatch) -> None:
        self.loss_sum += batch.loss_sum
        self.count += batch.n_targets

    def mean(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")


class Loss(_MeanLoss):
    """Mean cross-entropy over the split's target tokens (or examples). The evaluator a
    recipe without ``evaluators`` gets (``default``)."""

    directions = {"loss": "min"}
    default = True

    def compute(self) -> dict[str, float]:
        return {"loss": self.mean()}


class Perplexity(_MeanLoss):
    """``exp`` of the mean cross-entropy."""

    directions = {"perplexity": "min"}

    def compute(self) -> dict[str, float]:
        mean = self.mean()
        return {"perplexity": math.exp(min(mean, 700.0)) if mean == mean else float("nan")}


@hookimpl
def register_evaluators(register):
    register("loss", Loss)
    register("perplexity", Perplexity)
