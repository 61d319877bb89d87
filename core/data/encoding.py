"""Encoding a split: examples -> token rows the loop and the evaluators batch.

Used at the data phase of a run (core/data/datacheck.py), by evaluation, and by
``plugtune eval``; one place, so every path encodes a split the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from plugtune.data.labels import IGNORE_INDEX
from plugtune.data.tasks import Task
from plugtune.kernel.errors import DataError

if TYPE_CHECKING:
    import torch

Row = dict[str, Any]  # an encoded example: input_ids, labels, and the raw "example"
REFERENCE = "reference"  # a row's reference scores, when precomputed (core/training/reference.py)


def encode_split(rows: list[dict[str, Any]], task: Task, tokenizer: Any, max_length: int, split: str, *,
                 encoded: list[dict[str, list[int]] | Exception] | None = None) -> tuple[list[Row], int]:
    """Encode a split; returns the encoded rows (each keeps its raw ``example``) and how many
    were truncated (rows whose whole response was cut off are dropped).

    ``encoded``: the rows' token ids when the caller already has them, so nothing is
    tokenized twice (core/datacheck.py encodes every row at full length to check it fits, and
    a row that fits encodes the same at ``max_length``); an exception in it stands for a row
    that could not be encoded and is raised here, as encoding it would."""
    out, truncated = [], 0
    for i, row in enumerate(rows):
        try:
            ids = encoded[i] if encoded is not None else task.encode(row, tokenizer, max_length)
            if isinstance(ids, Exception):
                raise ids
            item: Row = dict(ids)
        except KeyError as exc:
            raise DataError(f"{split} row {i + 1}: missing field {exc.args[0]!r}") from None
        except DataError as exc:  # a bad value, as the task words it
            raise DataError(f"{split} row {i + 1}: {exc}") from None
        if task.head == "lm" and all(label == IGNORE_INDEX for label in item["labels"][1:]):
            truncated += 1  # the whole response was cut off: nothing to learn from this row
            continue
        if len(item["input_ids"]) >= max_length:
            truncated += 1
        item["example"] = row
        out.append(item)
    return out, truncated


def batches(rows: list[Row], batch_size: int, pad_id: int, task: Task) -> Iterator[tuple[list[Row], dict[str, torch.Tensor]]]:
    """Consecutive chunks of ``rows`` and each one collated by the task."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        yield chunk, collate_rows(task, chunk, pad_id)


def collate_rows(task: Task, rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """``task.collate(rows)``, plus the rows' precomputed reference scores as
    ``batch["reference"]`` ``(B, k)`` when every row has them."""
    batch = task.collate(rows, pad_id)
    if rows and all(REFERENCE in row for row in rows):
        import torch

        batch[REFERENCE] = torch.tensor([row[REFERENCE] for row in rows], dtype=torch.float32)
    return batch
