"""The reference model of a task that has one, without a second model where possible.

Preference objectives (DPO and its relatives) score each answer against a *reference*: the
model before this training started. Other libraries load a second copy of the model for it.
Here the reference is the resident base, reached in one of three ways (the task's
``reference``, a :data:`~plugtune.kernel.components.ReferenceMode`):

``adapter_off``
    every step, the trained model with its adapter switched off (the method's
    ``adapter_disabled``: peft's ``disable_adapter`` for LoRA, prefix and the other peft
    tuners, int8 and 4-bit bases included). No second model; one no-grad forward per step.
``precomputed``
    once, before the method touches the base: one no-grad pass over the training rows, the
    scores kept on the rows (a few floats each). No second model and no reference forward
    while training; refused for a streamed split (it is never all in memory) and with a
    regularizer that rewrites batches (``transform_batch``: the precomputed scores would be
    of other inputs).
``copy``
    a frozen copy of the base beside the trained one: a second model's memory, for full
    fine-tuning on a streamed split (the one case neither of the others covers).

``auto`` picks ``adapter_off`` when the method can switch its adapter off, else
``precomputed``, else ``copy``. Evaluation rows always get their scores from the base before
training, so the "before" evaluation already compares the base with itself.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from plugtune.data.encoding import REFERENCE, Row, batches


def has_reference(task: Any) -> bool:
    """Whether ``task`` computes its own loss against a reference model."""
    return hasattr(task, "training_loss") and getattr(task, "reference", "none") != "none"


def choose_mode(requested: str, method: Any, *, streamed: bool, rewrites_batches: bool) -> str:
    """The reference mode ``auto`` resolves to for ``method`` (an instance or class)."""
    if requested != "auto":
        return requested
    if hasattr(method, "adapter_disabled"):
        return "adapter_off"
    return "copy" if streamed or rewrites_batches else "precomputed"


def mode_problems(requested: str, method: Any, method_name: str, *, streamed: bool,
                  rewrites_batches: list[str]) -> list[str]:
    """Why ``requested`` cannot work with this method and data (field path ``task.reference``)."""
    if requested == "adapter_off" and not hasattr(method, "adapter_disabled"):
        return [f"task.reference: adapter_off needs a method that can switch its adapter off; {method_name} changes "
                f"the base's own weights; use precomputed (no second model) or copy (a second model in memory)"]
    if requested == "precomputed" and streamed:
        return ["task.reference: precomputed scores every training row before training, and a streamed split is "
                "never all in memory; use adapter_off, copy, or stop streaming"]
    if requested == "precomputed" and rewrites_batches:
        return [f"task.reference: precomputed scores are of the rows as loaded, and {rewrites_batches[0]} rewrites "
                f"training batches; use adapter_off or copy, or drop the regularizer"]
    return []


@torch.no_grad()
def precompute(model: torch.nn.Module, rows: list[Row], task: Any, *, batch_size: int, pad_id: int,
               device: torch.device, autocast: Any = nullcontext) -> None:
    """Store ``task.reference_scores`` of ``model`` on every row (``row["reference"]``), in
    order, batch by batch; rows that have scores already keep them."""
    todo = [row for row in rows if REFERENCE not in row]
    was_training = model.training
    model.eval()
    try:
        for chunk, batch in batches(todo, batch_size, pad_id, task):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                scores = task.reference_scores(model, batch)
            for row, values in zip(chunk, scores.float().cpu().tolist()):
                row[REFERENCE] = values
    finally:
        model.train(was_training)


@dataclass
class LiveReference:
    """The reference computed in every step: ``scores(batch)`` under ``no_grad`` from the
    trained model with its adapter off, or from a kept copy of the base."""

    task: Any
    model: torch.nn.Module  # the trained model (unwrapped) for adapter_off, the copy for copy
    switch_off: Any = None  # the method's adapter_disabled, or None (the copy is the reference)

    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), self._reference():
            return self.task.reference_scores(self.model, batch)

    @contextmanager
    def _reference(self) -> Iterator[None]:
        if self.switch_off is None:
            yield
            return
        was_training = self.model.training
        self.model.eval()  # no dropout: the reference is the base as it scores, deterministic
        try:
            with self.switch_off(self.model):
                yield
        finally:
            self.model.train(was_training)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` for ``copy`` mode: no gradients, eval mode."""
    twin = copy.deepcopy(model)
    twin.requires_grad_(False)
    return twin.eval()
