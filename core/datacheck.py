"""Checks on loaded data before any training: empty fields and rows that do not fit.

* :func:`check_empty_fields`: a row whose field used by the task's templates (or its label)
  is missing, ``None`` or blank is refused with one line naming the split, the field, the
  count and the first such row: training on an empty input teaches nothing, and an empty
  label becomes a class of its own.
* :func:`fit_to_context`: ``training.max_length`` is capped at the base model's context
  (``max_position_embeddings``); beyond it, encoders with learned positions fail with an
  index error in the middle of training.
* :func:`apply_overlong`: ``training.overlong`` decides what happens to rows longer than the
  (capped) ``max_length``: ``truncate`` (the default; the count is printed by the loop),
  ``drop`` (left out, the count is printed) or ``refuse`` (a one-line error).
"""

from __future__ import annotations

import json
from typing import Any

from .errors import DataError
from .tasks import Task

UNLIMITED = 10**9


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _show(row: dict[str, Any], limit: int = 80) -> str:
    text = json.dumps(row, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_empty_fields(splits: dict[str, list[dict[str, Any]]], task: Task) -> None:
    """Refuse rows whose task fields are empty (see the module docstring)."""
    fields = sorted(task.required_fields())
    for split, rows in splits.items():
        for field in fields:
            empty = [row for row in rows if _blank(row.get(field))]
            if empty:
                raise DataError(f"{split} split: {len(empty)} row(s) have an empty {field!r} "
                                f"(first: {_show(empty[0])}); fill them in or remove them")


def context_length(model: Any) -> int | None:
    """The longest input the base model's positions allow, if its config says."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def fit_to_context(max_length: int, model: Any, console: Any) -> int:
    """``max_length`` capped at the model's context, saying so when it is."""
    context = context_length(model)
    if context is not None and max_length > context:
        console.print(f"[yellow]training.max_length={max_length} is longer than the model's context ({context}); using {context}[/]")
        return context
    return max_length


def full_length(row: dict[str, Any], task: Task, tokenizer: Any) -> int | None:
    """Tokens in ``row`` before any truncation (None when the row cannot be encoded; the
    encoder reports that with its own message)."""
    try:
        return len(task.encode(row, tokenizer, UNLIMITED)["input_ids"])
    except (KeyError, ValueError, TypeError):
        return None


def apply_overlong(rows: list[dict[str, Any]], task: Task, tokenizer: Any, max_length: int, policy: str,
                   split: str, console: Any) -> list[dict[str, Any]]:
    """Rows filtered by ``training.overlong`` (``truncate`` returns them unchanged: the encoder
    cuts them)."""
    if policy == "truncate":
        return rows
    lengths = [full_length(row, task, tokenizer) for row in rows]
    over = [n for n in lengths if n is not None and n > max_length]
    if not over:
        return rows
    if policy == "refuse":
        raise DataError(f"{split} split: {len(over)} row(s) are longer than {max_length} tokens (the longest: {max(over)}); "
                        f"raise training.max_length, or set training.overlong to truncate or drop")
    kept = [row for row, n in zip(rows, lengths) if n is None or n <= max_length]
    console.print(f"dropped {len(over)} {split} row(s) longer than {max_length} tokens (training.overlong: drop)")
    if not kept:
        raise DataError(f"{split} split: every row is longer than {max_length} tokens; raise training.max_length")
    return kept
