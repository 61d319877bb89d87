"""The example plugin: one evaluator and one lifecycle hook.

``mean_length`` (evaluator)
    the mean number of reference target tokens per held-out example. For a causal LM a
    reference is the tuple of token ids of the response, so this is the mean response
    length; for sequence classification a reference is one class index, counted as 1.
``on_step_end`` (lifecycle hook)
    when ``PLUGTUNE_EXAMPLE_LOG`` names a file, appends ``{"step": ..., "loss": ...}`` to it
    as one JSON line per optimizer step: a minimal metric logger.

plugtune loads this module through the entry point ``example`` in the group ``plugtune``
(see this distribution's ``pyproject.toml``).
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

from plugtune.sdk import EvalBatch, NoOptions, hookimpl

LOG_ENV = "PLUGTUNE_EXAMPLE_LOG"


class MeanLength:
    """Mean number of reference target tokens per example."""

    # A description of the data, not a score: it improves in neither direction, so it is
    # declared in none (the before/after table shows it uncoloured; early stopping refuses it).
    directions: ClassVar[dict[str, str]] = {}

    class Options(NoOptions):
        """``mean_length`` takes no options."""

    def __init__(self, options: Any = None, task: Any = None) -> None:
        self.options = options
        self.task = task
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.examples = 0

    def update(self, batch: EvalBatch) -> None:
        for reference in batch.references:
            self.tokens += len(reference) if isinstance(reference, (tuple, list)) else 1
            self.examples += 1

    def compute(self) -> dict[str, float]:
        return {"mean_length": self.tokens / self.examples if self.examples else float("nan")}


@hookimpl
def register_evaluators(register):
    register("mean_length", MeanLength)


@hookimpl
def on_step_end(run, step, metrics):
    """Append this step's loss to the file named by ``PLUGTUNE_EXAMPLE_LOG``, if set."""
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": step, "loss": float(metrics["loss"])}) + "\n")
