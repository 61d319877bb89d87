"""Causal-LM loss computed only where there are labels.

For supervised fine-tuning and label-word classification the response is a few tokens of a
longer row, yet a plain forward pass applies the LM head (hidden x a 49k vocabulary, for
SmolLM2) at every position and takes a log-softmax over all of them. Here the backbone runs
as usual, and a forward pre-hook on the model's output-embedding layer (its LM head) gathers
the hidden states at the positions that predict a label before the head runs, so logits
exist for those positions only: ``(N, V)`` for the ``N`` label tokens of the batch.

The hook sits on the head module itself, so it works through every wrapper that ends in that
head: peft LoRA (including a LoRA on the head), prefix tuning (whose extra key/values do not
change the hidden sequence) and prompt tuning (virtual tokens are prepended; the offset is
taken from the hidden width), full fine-tuning and int8 bases. Models without an output
embedding (classifiers) keep the plain path: :func:`supports_label_positions` says which.

The loss is the mean cross-entropy over the batch's label tokens, exactly what the model's
own loss computes from full logits (position ``t`` predicts token ``t + 1``; ``-100`` is
ignored); :func:`per_example_loss` splits it per example for the equivalence tests and the
benchmark.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .components import EvalBatch
from .tasks import IGNORE_INDEX


@dataclass
class LabelPositions:
    """Where the labels of a right-padded ``(B, T)`` batch are predicted from."""

    rows: torch.Tensor  # (N,) batch row of each label token
    columns: torch.Tensor  # (N,) position whose logits predict it (label position - 1)
    targets: torch.Tensor  # (N,) the label token ids
    batch_size: int
    width: int  # T, the labels' width

    @classmethod
    def of(cls, labels: torch.Tensor) -> LabelPositions:
        """Label positions of ``labels`` (B, T), -100 where no loss is taken."""
        shifted = labels[:, 1:]  # (B, T-1): the token position t predicts
        rows, columns = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
        return cls(rows, columns, shifted[rows, columns], labels.size(0), labels.size(1))


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that turns hidden states into vocabulary logits, or None."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if getter is not None else None
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, torch.nn.Module) else None


def supports_label_positions(model: torch.nn.Module, regularizers: Sequence[Any] = ()) -> bool:
    """Whether the label-position path applies to a causal LM: the model has an LM head and
    no regularizer reads full logits (see ``needs_logits`` in core/components.py)."""
    if output_head(model) is None:
        return False
    return all(getattr(reg, "needs_logits", True) is False for reg in regularizers if hasattr(reg, "loss_term"))


@contextmanager
def head_at(head: torch.nn.Module, positions: LabelPositions) -> Iterator[None]:
    """While active, ``head`` sees only the hidden states at ``positions``: its input
    ``(B, T', H)`` becomes ``(N, H)``. ``T' - T`` leading virtual tokens (prompt tuning) are
    skipped."""

    def gather(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]  # (B, T', H)
        if hidden.dim() != 3 or hidden.size(0) != positions.batch_size or hidden.size(1) < positions.width:
            raise RuntimeError(f"label-position head: unexpected hidden states {tuple(hidden.shape)} "
                               f"for a batch of {positions.batch_size} x {positions.width}; "
                               "set training.logits_on_labels_only: false")
        offset = hidden.size(1) - positions.width
        return (hidden[positions.rows, positions.columns + offset], *args[1:])  # (N, H)

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def label_position_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                          head: torch.nn.Module | None = None) -> tuple[torch.Tensor, LabelPositions]:
    """The one label-position forward: run ``model`` on ``batch`` (input_ids,
    attention_mask, labels) with its head applied at the label positions only; returns the
    logits ``(N, V)`` and the positions. Training (:func:`label_token_losses`) and evaluation
    (:func:`eval_batch_at_labels`) both go through here. ``head`` defaults to ``model``'s
    output embedding; pass it when ``model`` is a wrapper (DDP) that does not expose it."""
    positions = LabelPositions.of(batch["labels"])
    head = head if head is not None else output_head(model)
    if head is None:
        raise ValueError("the model has no output embedding (LM head); use the plain loss")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with head_at(head, positions):
        logits = model(**inputs).logits  # (N, V)
    return logits.reshape(-1, logits.size(-1)), positions


def label_token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                       head: torch.nn.Module | None = None) -> tuple[torch.Tensor, LabelPositions]:
    """The per-label-token losses ``(N,)`` of ``batch`` and their positions, with logits at
    the label positions only (see :func:`label_position_logits`)."""
    logits, positions = label_position_logits(model, batch, head)
    return torch.nn.functional.cross_entropy(logits.float(), positions.targets, reduction="none"), positions


def full_logits_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token losses ``(B, T-1)`` from full logits ``(B, T', V)`` (zero where ignored):
    the plain path, for comparison."""
    logits = logits[:, -labels.size(1):]  # drop virtual tokens, if any
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")


def per_example_loss(token_losses: torch.Tensor, positions: LabelPositions) -> torch.Tensor:
    """Mean loss of each example ``(B,)`` from label-token losses ``(N,)``."""
    sums = torch.zeros(positions.batch_size, dtype=token_losses.dtype, device=token_losses.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, positions.rows, token_losses)
    counts.index_add_(0, positions.rows, torch.ones_like(token_losses))
    return sums / counts.clamp(min=1)


def eval_batch_from_label_logits(logits: torch.Tensor, positions: LabelPositions) -> EvalBatch:
    """The causal-LM :class:`EvalBatch` from the logits ``(N, V)`` at ``positions``: per
    example, the greedy tokens where the reference is (predictions), the reference tokens,
    the mean log-prob of the greedy tokens (scores) and the mean reference cross-entropy
    (losses). The one place these rows are built: :meth:`plugtune.tasks.Task.eval_batch`
    gathers its full logits at the label positions and comes here, and so does
    :func:`eval_batch_at_labels`, so both paths give the same batches."""
    logits = logits.float()
    token_losses = torch.nn.functional.cross_entropy(logits, positions.targets, reduction="none")  # (N,)
    greedy_logprob, greedy = logits.log_softmax(-1).max(-1)  # (N,)
    # positions are row-major (nonzero's order): each example's tokens are one run, in order
    counts = torch.bincount(positions.rows, minlength=positions.batch_size).tolist()
    predictions = [tuple(part.tolist()) for part in greedy.split(counts)]
    references = [tuple(part.tolist()) for part in positions.targets.split(counts)]
    scores = [float(part.mean()) if part.numel() else 0.0 for part in greedy_logprob.split(counts)]
    return EvalBatch(predictions, references, float(token_losses.sum()), int(token_losses.numel()),
                     scores=scores, losses=per_example_loss(token_losses, positions).tolist())


@torch.no_grad()
def eval_batch_at_labels(model: torch.nn.Module, head: torch.nn.Module, batch: dict[str, torch.Tensor]) -> EvalBatch:
    """:meth:`plugtune.tasks.Task.eval_batch` for a causal LM with logits at the label
    positions only: the same per-example predictions, references, scores and losses,
    without the LM head over the positions no metric reads."""
    return eval_batch_from_label_logits(*label_position_logits(model, batch, head))
