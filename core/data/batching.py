"""The order of training batches.

The order is a pure function of ``(seed, epoch)`` (and, when batches are grouped by length,
of the rows' lengths, which are fixed by the data): a run resumed from a checkpoint that
recorded ``(epoch, batch index)`` sees exactly the batches an uninterrupted run would, and
every process of a data-parallel run agrees on it without talking to the others.

Grouping by length is how plugtune avoids computing on padding: rows of similar length share
a batch, so the batch's width is close to every row's length. Each example's loss is the
same whichever batch it lands in (right padding under an attention mask changes nothing for
the real tokens), so grouping changes which examples meet, not what any example costs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GROUP_BATCHES = 50  # batches per mega-batch: sorted within, so groups stay random across the epoch


def epoch_batches(n_rows: int, batch_size: int, *, seed: int, epoch: int,
                  lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Row indices of each batch of ``epoch``.

    Without ``lengths``: a seeded shuffle cut into ``batch_size`` pieces (the last one may be
    shorter). With ``lengths`` (one per row): the same shuffle cut into mega-batches of
    ``GROUP_BATCHES * batch_size`` rows, each sorted longest-first and cut into batches, and
    then the order of all batches shuffled, so long and short batches alternate at random
    through the epoch. Everything comes from one generator seeded by ``(seed, epoch)``.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_rows, generator=generator).tolist()
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, n_rows, batch_size)]
    if len(lengths) != n_rows:
        raise ValueError(f"{len(lengths)} lengths for {n_rows} rows")
    mega = batch_size * GROUP_BATCHES
    grouped: list[list[int]] = []
    for start in range(0, n_rows, mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])  # stable: ties keep the shuffle
        grouped += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    batch_order = torch.randperm(len(grouped), generator=generator).tolist()
    return [grouped[i] for i in batch_order]


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This process's part of a global batch in a data-parallel run: every ``world_size``-th
    row from ``rank``. Interleaving (rather than contiguous slices) gives every process rows
    of similar length when the batch is sorted by length."""
    return indices[rank::world_size]
