"""The order of training batches.

The order is a pure function of ``(seed, epoch)``: a run resumed from a checkpoint that
recorded ``(epoch, batch index)`` sees exactly the batches an uninterrupted run would, and
every process of a data-parallel run agrees on it without talking to the others.
"""

from __future__ import annotations

import torch


def epoch_batches(n_rows: int, batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """Row indices of each batch of ``epoch``: a seeded shuffle cut into ``batch_size`` pieces
    (the last one may be shorter)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_rows, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]
