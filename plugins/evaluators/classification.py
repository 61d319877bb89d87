"""``accuracy`` and ``f1`` (macro), over the per-example predictions the task produces.

For sequence classification a prediction is the argmax class. For a causal LM it is the
greedy continuation over the response tokens, so ``accuracy`` is exact match under greedy
decoding (computed in one teacher-forced forward pass) and ``f1`` treats each distinct
reference response as a class.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from plugtune import hookimpl
from plugtune.components import EvalBatch, NoOptions


class Accuracy:
    """Fraction of examples whose prediction equals the reference."""

    Options = NoOptions

    def __init__(self, options: Any = None, task: Any = None) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, batch: EvalBatch) -> None:
        self.correct += sum(p == r for p, r in zip(batch.predictions, batch.references))
        self.total += len(batch.references)

    def compute(self) -> dict[str, float]:
        return {"accuracy": self.correct / self.total if self.total else float("nan")}


class MacroF1:
    """Unweighted mean over classes of F1 = 2PR/(P+R); the classes are every value seen as
    a reference or a prediction (as scikit-learn's ``f1_score(average="macro")``)."""

    Options = NoOptions

    def __init__(self, options: Any = None, task: Any = None) -> None:
        self.reset()

    def reset(self) -> None:
        self.tp: Counter[Any] = Counter()
        self.fp: Counter[Any] = Counter()
        self.fn: Counter[Any] = Counter()

    def update(self, batch: EvalBatch) -> None:
        for p, r in zip(batch.predictions, batch.references):
            if p == r:
                self.tp[r] += 1
            else:
                self.fp[p] += 1
                self.fn[r] += 1

    def compute(self) -> dict[str, float]:
        classes = set(self.tp) | set(self.fp) | set(self.fn)
        if not classes:
            return {"f1": float("nan")}
        scores = []
        for c in classes:
            denom = 2 * self.tp[c] + self.fp[c] + self.fn[c]
            scores.append(2 * self.tp[c] / denom if denom else 0.0)
        return {"f1": sum(scores) / len(scores)}


@hookimpl
def register_evaluators(register):
    register("accuracy", Accuracy)
    register("f1", MacroF1)
