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
ignored); :func:`plugtune.data.labels.per_example_loss` splits it per example for the equivalence tests and the
benchmark.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from plugtune.data.labels import LabelPositions, eval_batch_from_label_logits
from plugtune.data.tasks import IGNORE_INDEX
from plugtune.kernel.components import EvalBatch


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that turns hidden states into vocabulary logits, or None (looked up through
    a distributed wrapper's ``module``)."""
    getter = getattr(model, "get_output_embeddings", None)
    if getter is None and isinstance(getattr(model, "module", None), torch.nn.Module):
        return output_head(model.module)
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


@torch.no_grad()
def eval_batch_at_labels(model: torch.nn.Module, head: torch.nn.Module, batch: dict[str, torch.Tensor]) -> EvalBatch:
    """:meth:`plugtune.data.tasks.Task.eval_batch` for a causal LM with logits at the label
    positions only: the same per-example predictions, references, scores and losses,
    without the LM head over the positions no metric reads."""
    return eval_batch_from_label_logits(*label_position_logits(model, batch, head))


def answer_log_probs(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                     head: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``batch``: the summed log-probability of its label tokens ``(B,)`` (with the
    graph, for a loss) and how many label tokens it has ``(B,)``, from logits at the label
    positions only (:func:`label_position_logits`). For objectives over whole answers
    (preference pairs): the head never runs over the prompt's positions."""
    token_losses, positions = label_token_losses(model, batch, head)  # (N,)
    sums = token_losses.new_zeros(positions.batch_size).index_add(0, positions.rows, -token_losses)
    counts = torch.bincount(positions.rows, minlength=positions.batch_size).to(sums.dtype)
    return sums, counts
