"""Label positions of a causal-LM batch, and the evaluation rows built from the logits there.

Position ``t`` predicts token ``t + 1``; ``-100`` (:data:`IGNORE_INDEX`) marks positions with
no loss. The training loss (core/training/loss.py) and every evaluation path build their
per-example rows here, so they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from plugtune.kernel.components import EvalBatch

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100


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


def per_example_loss(token_losses: torch.Tensor, positions: LabelPositions) -> torch.Tensor:
    """Mean loss of each example ``(B,)`` from label-token losses ``(N,)``."""
    import torch

    sums = torch.zeros(positions.batch_size, dtype=token_losses.dtype, device=token_losses.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, positions.rows, token_losses)
    counts.index_add_(0, positions.rows, torch.ones_like(token_losses))
    return sums / counts.clamp(min=1)


def eval_batch_from_label_logits(logits: torch.Tensor, positions: LabelPositions) -> EvalBatch:
    """The causal-LM :class:`EvalBatch` from the logits ``(N, V)`` at ``positions``: per
    example, the greedy tokens where the reference is (predictions), the reference tokens,
    the mean log-prob of the greedy tokens (scores) and the mean reference cross-entropy
    (losses). The one place these rows are built: :meth:`plugtune.data.tasks.Task.eval_batch`
    gathers its full logits at the label positions and comes here, and so does
    :func:`eval_batch_at_labels`, so both paths give the same batches."""
    import torch

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


