"""``preference``: how a preference-tuned model (or a reward model) ranks pairs of answers.

For tasks that report preference values (``preference``, ``reward``), per row of the split:

``preference/accuracy``
    how often the chosen answer's implicit reward beats the rejected one's (a tie, rewards
    within 1e-5, counts a half: with a reference, the base scored against itself ties every
    pair, so its accuracy is 0.5; ORPO's and SimPO's rewards need no reference, so a base
    starts at its own preference there);
``preference/margin``
    the mean reward margin, chosen minus rejected;
``preference/chosen_logp``, ``preference/rejected_logp``
    the answers' mean summed log-probabilities under the model (language-model tasks).
    Read them before and after: DPO can raise the margin while both fall (the model
    unlearns the chosen answers too), which these two show and the margin hides;
``preference/logp_accuracy``
    how often the model itself gives the chosen answer the higher log-probability, no
    reference involved (what a base already prefers).

Unpaired rows (KTO) count in the log-probability means only.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from plugtune import hookimpl
from plugtune.sdk import EvalBatch, NoOptions


class PreferenceMetrics:
    """Accuracy and margin of the implicit rewards, and the answers' log-probabilities."""

    Options = NoOptions
    directions: ClassVar[dict[str, str]] = {
        "preference/accuracy": "max", "preference/margin": "max", "preference/chosen_logp": "max",
        "preference/rejected_logp": "min", "preference/logp_accuracy": "max"}

    def __init__(self, options: Any = None, task: Any = None) -> None:
        self.reset()

    @classmethod
    def check_task(cls, task: Any) -> str | None:
        if getattr(task, "reports_preferences", False):
            return None
        return f"preference metrics need a task that ranks answers (preference, reward), not {task.type}"

    def reset(self) -> None:
        self.values: dict[str, list[float]] = {}

    def update(self, batch: EvalBatch) -> None:
        for key, values in batch.values.items():
            self.values.setdefault(key, []).extend(values)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        rewards = _paired(self.values.get("chosen_reward", []), self.values.get("rejected_reward", []))
        if rewards:
            out["preference/accuracy"] = _wins(rewards)
            out["preference/margin"] = sum(c - r for c, r in rewards) / len(rewards)
        for side in ("chosen", "rejected"):
            present = [v for v in self.values.get(f"{side}_logp", []) if not math.isnan(v)]
            if present:
                out[f"preference/{side}_logp"] = sum(present) / len(present)
        logps = _paired(self.values.get("chosen_logp", []), self.values.get("rejected_logp", []))
        if logps:
            out["preference/logp_accuracy"] = _wins(logps)
        return out


def _paired(chosen: list[float], rejected: list[float]) -> list[tuple[float, float]]:
    return [(c, r) for c, r in zip(chosen, rejected) if not (math.isnan(c) or math.isnan(r))]


TIE = 1e-5  # rewards this close are a tie: float summation noise, e.g. the base against itself in other padding


def _wins(pairs: list[tuple[float, float]]) -> float:
    return sum(0.5 if abs(c - r) <= TIE else 1.0 if c > r else 0.0 for c, r in pairs) / len(pairs)


@hookimpl
def register_evaluators(register: Any) -> None:
    register("preference", PreferenceMetrics)
