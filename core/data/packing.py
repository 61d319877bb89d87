"""Packing: several causal-LM examples laid side by side in one row of a training batch.

Packing changes a batch's *layout*, not its contents. A training step still takes the same
``training.batch_size`` rows from :func:`plugtune.data.batching.epoch_batches` (so which
examples meet, and the loss as the mean over the step's label tokens, are what an unpacked
run computes); :func:`pack_rows` lays those rows side by side in rows of at most ``width``
positions (first-fit-decreasing, at the width that leaves the least padding) instead of
right-padding each to the longest.

Examples stay apart inside a row without a mask of our own: the packed batch carries
``position_ids`` that restart at 0 for every example and *no* ``attention_mask``, which is
the layout transformers (5.x, ``masking_utils.find_packed_sequence_indices``) recognises as
packed: SDPA and eager attention get a block-diagonal causal mask, and flash-attention
kernels take the same position ids as variable-length sequences. Each example is laid out by
transformers' own :class:`~transformers.DataCollatorWithFlattening` (position ids restarting
per example, ``-100`` at each example's first label so that no example's last token learns to
predict the next example's first). A row's unused tail is one more segment of pad tokens
with its own restarting positions and no labels, so it attends only to itself.

Because the batch has no ``attention_mask``, its real tokens are not ``attention_mask.sum()``:
:class:`Packed` carries the count (the loop passes it on to the loss and the logs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plugtune.data.labels import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


def first_fit_decreasing(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Bins of indices into ``lengths``, each bin's lengths summing to at most ``width``:
    longest first, each into the first bin with room (ties keep their order, so the layout
    is a pure function of the lengths). Every index appears exactly once; a length above
    ``width`` is an error (the caller chooses a width no row exceeds)."""
    if any(n > width for n in lengths):
        raise ValueError(f"a row of {max(lengths)} tokens does not fit a packed width of {width}")
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(width - lengths[index])
    return bins


LAYOUT_WIDTHS = 64


def candidate_widths(longest: int, width: int) -> list[int]:
    """The row widths :func:`least_padding_layout` tries: every one from ``longest`` to
    ``width`` where that is at most :data:`LAYOUT_WIDTHS`, else that many spread evenly."""
    span = width - longest
    if span < LAYOUT_WIDTHS:
        return list(range(longest, width + 1))
    return sorted({longest + round(k * span / (LAYOUT_WIDTHS - 1)) for k in range(LAYOUT_WIDTHS)})


def least_padding_layout(lengths: Sequence[int], width: int) -> list[list[int]]:
    """The bins that leave the least padding: first-fit-decreasing at every width from the
    longest row up to ``width``, keeping the layout with the fewest positions (rows times its
    fullest row), the narrowest of those on a tie. Why not simply ``width``: the batch is
    as wide as its fullest row, so filling rows up to ``width`` and leaving the last one half
    empty pads more than length grouping does; and attention over a row costs its width
    squared, so of two layouts with as many positions the narrower is cheaper. Pure in the
    lengths, so a resumed run lays its batches out the same. At most :data:`LAYOUT_WIDTHS`
    widths are tried, spread evenly from the longest row to ``width`` (both ends included):
    trying every width cost 0.3 s a step for 64 rows up to a width of 4096."""
    best: tuple[int, int] | None = None
    chosen: list[list[int]] = []
    for limit in candidate_widths(max(lengths), width):
        bins = first_fit_decreasing(lengths, limit)
        fullest = max(sum(lengths[i] for i in b) for b in bins)
        key = (len(bins) * fullest, fullest)
        if best is None or key < best:
            best, chosen = key, bins
        if len(bins) == 1:
            break  # wider limits lay out the same single row
    return chosen


@dataclass
class Packed:
    """A packed training batch and what the loop needs beside it.

    ``batch``: ``input_ids``, ``labels`` and ``position_ids`` ``(R, W)`` long, no
    ``attention_mask`` (see the module docs), and ``use_cache: False``: transformers looks for
    packed sequences only when the forward has no cache, and a model in eval mode (or one
    whose config says ``use_cache``) makes one otherwise, silently attending across examples;
    ``example_of`` ``(R, W)``: the index (into the rows given to :func:`pack_rows`) of the
    example at each position, ``-1`` on padding; ``real_tokens``: the examples' tokens,
    padding excluded."""

    batch: dict[str, torch.Tensor]
    example_of: torch.Tensor
    real_tokens: int


def packed_width(rows: Sequence[dict[str, Any]], max_length: int) -> int:
    """The width the loop packs a batch into: ``max_length`` (``training.max_length``, which
    no encoded row exceeds) or the batch's longest row if longer (a row that was never cut)."""
    return max(max_length, max(len(r["input_ids"]) for r in rows))


def pack_rows(rows: Sequence[dict[str, Any]], pad_id: int, width: int) -> Packed:
    """Lay encoded causal-LM rows (``input_ids``, ``labels`` with ``-100`` where no loss is
    taken) into rows of at most ``width`` positions, as :func:`least_padding_layout` chooses;
    the batch is as wide as its fullest row. See :class:`Packed`."""
    import torch
    from transformers import DataCollatorWithFlattening

    flatten = DataCollatorWithFlattening(return_tensors="pt", separator_id=IGNORE_INDEX)
    bins = least_padding_layout([len(r["input_ids"]) for r in rows], width)
    laid = [flatten([{"input_ids": rows[i]["input_ids"], "labels": rows[i]["labels"]} for i in b]) for b in bins]
    wide = max(int(part["input_ids"].size(1)) for part in laid)
    input_ids = torch.full((len(bins), wide), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), wide), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(bins), wide), dtype=torch.long)
    example_of = torch.full((len(bins), wide), -1, dtype=torch.long)
    for r, (b, part) in enumerate(zip(bins, laid)):
        n = int(part["input_ids"].size(1))
        input_ids[r, :n], labels[r, :n], position_ids[r, :n] = part["input_ids"][0], part["labels"][0], part["position_ids"][0]
        position_ids[r, n:] = torch.arange(wide - n)  # the padding: a segment of its own, restarting at 0
        example_of[r, :n] = torch.repeat_interleave(torch.tensor(b), torch.tensor([len(rows[i]["input_ids"]) for i in b]))
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}
    return Packed(batch, example_of, sum(len(r["input_ids"]) for r in rows))


def per_example_packed(values: torch.Tensor, example_rows: torch.Tensor, n_examples: int) -> torch.Tensor:
    """Mean of ``values`` ``(N,)`` per example ``(n_examples,)``, where ``example_rows`` ``(N,)``
    names each value's example (``Packed.example_of`` at the label positions): the packed
    counterpart of :func:`plugtune.data.labels.per_example_loss`."""
    import torch

    sums = torch.zeros(n_examples, dtype=values.dtype, device=values.device).index_add_(0, example_rows, values)
    counts = torch.zeros_like(sums).index_add_(0, example_rows, torch.ones_like(values))
    return sums / counts.clamp(min=1)


def packing_problem(task: Any, method: Any = None, method_name: str = "",
                    regularizers: Sequence[tuple[str, Any]] = ()) -> str | None:
    """Why this task, method and regularizers cannot train on packed rows, or None: a
    classifier task has one label per row; a task with its own ``training_loss`` (preference
    pairs, reward models) scores whole rows; a method or regularizer (``(name, class or
    instance)`` pairs) declaring ``cannot_pack`` says why itself. Read at validation
    (``training.packing: true`` refused) and by ``auto`` (left off)."""
    if getattr(task, "is_classification", False) or getattr(task, "head", "lm") != "lm":
        return f"task {getattr(task, 'type', '?')} trains a classifier head, one label per row, so a row cannot hold several examples"
    if hasattr(task, "training_loss"):
        return f"task {getattr(task, 'type', '?')} computes its own loss over whole rows (pairs of answers or scores), not over packed examples"
    reason = getattr(method, "cannot_pack", None)
    if reason:
        return f"method {method_name or getattr(method, '__name__', '?')}: {reason}"
    for name, regularizer in regularizers:
        reason = getattr(regularizer, "cannot_pack", None)
        if reason:
            return f"regularizer {name}: {reason}"
    return None


PACKED_ATTENTION = frozenset({"eager", "sdpa", "plugtune_fp32_sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"})
"""Attention implementations whose masks transformers builds from restarting position ids
(``masking_utils``; the flash kernels take them as variable-length sequences)."""


def attention_problem(model: Any) -> str | None:
    """Why ``model``'s attention would not keep packed examples apart, or None: an attention
    implementation transformers builds no packed masks for, or a forward taking no
    ``position_ids``. Checked when the base has loaded (what it runs is known only then)."""
    import inspect

    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in PACKED_ATTENTION:
        return (f"the model runs attention implementation {implementation!r}, which keeps no packed examples apart "
                f"(these do: {', '.join(sorted(PACKED_ATTENTION))})")
    forward = getattr(getattr(model, "get_base_model", lambda: model)(), "forward", None)
    if forward is not None and "position_ids" not in inspect.signature(forward).parameters:
        return "the model's forward takes no position_ids, which packed rows need to restart per example"
    return None
