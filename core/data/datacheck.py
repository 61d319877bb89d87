"""Checks on loaded data before any training: empty fields and rows that do not fit.

* :func:`check_empty_fields`: a row whose field used by the task's templates (or its label)
  is missing, ``None`` or blank is refused with one line naming the split, the field, the
  count and the first such row: training on an empty input teaches nothing, and an empty
  label becomes a class of its own.
* :func:`fit_to_context`: ``training.max_length`` is capped at the base model's context
  (``max_position_embeddings``); beyond it, encoders with learned positions fail with an
  index error in the middle of training.
* :func:`prepare_split` and :func:`report_overlong`: ``training.overlong`` decides what
  happens to rows longer than the (capped) ``max_length``: ``truncate`` (the default; the
  count is printed by the loop), ``drop`` (left out, the count is printed) or ``refuse`` (a
  one-line error). Each row is tokenized once, at full length: its length decides, and a
  row that fits encodes the same at ``max_length``. The outcome (rows, counts, the error) is
  data, a :class:`PreparedSplit`, so the tokenized cache keeps it and a cache hit reports
  exactly what the first run did without tokenizing anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from plugtune.kernel.errors import DataError
from plugtune.data.encoding import encode_split
from plugtune.data.tasks import Task

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


def normalize_splits(splits: dict[str, list[dict[str, Any]]], task: Task) -> dict[str, list[dict[str, Any]]]:
    """Every row in the task's canonical form, when the task has ``normalize`` (the chat task
    maps every conversation format to one shape); a row it refuses is one line naming the
    split and the row."""
    normalize = getattr(task, "normalize", None)
    if normalize is None:
        return splits
    return {split: normalize_rows(rows, normalize, split) for split, rows in splits.items()}


def normalize_rows(rows: list[dict[str, Any]], normalize: Any, split: str) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(normalize(row))
        except (DataError, KeyError, TypeError) as exc:
            reason = f"missing field {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
            raise DataError(f"{split} row {i + 1}: {reason}") from None
    return out


def task_notes(task: Task) -> list[str]:
    """The task's lines about the data it normalized (``notes``), if it has any."""
    notes = getattr(task, "notes", None)
    return list(notes() or []) if notes is not None else []


def bind_tokenizer(task: Task, tokenizer: Any) -> None:
    """Tell a task that wants it (``bind_tokenizer``) which tokenizer encodes its rows."""
    bind = getattr(task, "bind_tokenizer", None)
    if bind is not None:
        bind(tokenizer)


def turns_cut_line(rows: list[dict[str, Any]], split: str, max_length: int) -> str | None:
    """What a conversation task left out to fit ``max_length`` (rows carrying ``turns_cut``)."""
    cut = [r["turns_cut"][0] for r in rows if r.get("turns_cut") and r["turns_cut"][0] > 0]
    if not cut:
        return None
    return (f"{split}: {len(cut)} conversation(s) longer than {max_length} tokens kept their first whole turns; "
            f"{sum(cut)} later turn(s) left out")


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


@dataclass
class PreparedSplit:
    """A split encoded under ``training.overlong``: what core/tokenized_cache.py keeps.

    ``rows`` are :func:`~plugtune.training.evaluation.encode_split`'s rows and ``cut`` its count of
    truncated rows; ``dropped`` is how many rows ``drop`` left out for length; ``error`` is
    the one-line refusal (``refuse``, or ``drop`` with nothing left), raised by
    :func:`report_overlong` after any count is printed."""

    rows: list[dict[str, Any]]
    cut: int
    dropped: int = 0
    error: str | None = None


def _encode_full(row: dict[str, Any], task: Task, tokenizer: Any) -> dict[str, list[int]] | Exception:
    """``row``'s ids before any truncation, or the exception encoding it raised (the encoder
    reports that with its own message, in :func:`~plugtune.training.evaluation.encode_split`)."""
    try:
        return task.encode(row, tokenizer, UNLIMITED)
    except (KeyError, ValueError, TypeError) as exc:
        return exc


def prepare_split(rows: list[dict[str, Any]], task: Task, tokenizer: Any, max_length: int, policy: str,
                  split: str) -> PreparedSplit:
    """Encode ``rows`` and apply ``training.overlong``, tokenizing each row once. ``truncate``
    encodes at ``max_length`` (the encoder cuts); ``drop`` and ``refuse`` encode at full
    length, measure, and keep the encodings of the rows that fit: within ``max_length`` the
    full encoding is the truncated one."""
    if policy == "truncate":
        return PreparedSplit(*encode_split(rows, task, tokenizer, max_length, split))
    full = [_encode_full(row, task, tokenizer) for row in rows]
    lengths = [None if isinstance(item, Exception) else len(item["input_ids"]) for item in full]
    over = [n for n in lengths if n is not None and n > max_length]
    if not over:
        return PreparedSplit(*encode_split(rows, task, tokenizer, max_length, split, encoded=full))
    if policy == "refuse":
        return PreparedSplit([], 0, error=f"{split} split: {len(over)} row(s) are longer than {max_length} tokens "
                                          f"(the longest: {max(over)}); raise training.max_length, "
                                          "or set training.overlong to truncate or drop")
    kept = [i for i, n in enumerate(lengths) if n is None or n <= max_length]
    if not kept:
        return PreparedSplit([], 0, dropped=len(over),
                             error=f"{split} split: every row is longer than {max_length} tokens; raise training.max_length")
    encoded, cut = encode_split([rows[i] for i in kept], task, tokenizer, max_length, split, encoded=[full[i] for i in kept])
    return PreparedSplit(encoded, cut, dropped=len(over))


def report_overlong(prepared: PreparedSplit, max_length: int, split: str, console: Any) -> tuple[list[dict[str, Any]], int]:
    """Say what ``training.overlong`` did to a prepared split, fresh or from the cache alike:
    print the dropped count, raise the refusal; returns the encoded rows and the truncated
    count."""
    if prepared.dropped:
        console.print(f"dropped {prepared.dropped} {split} row(s) longer than {max_length} tokens (training.overlong: drop)")
    if prepared.error:
        raise DataError(prepared.error)
    return prepared.rows, prepared.cut
