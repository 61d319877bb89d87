"""Streamed training splits: the lazy pipeline between a loader's :class:`RowStream` and the loop.

A loader that ``streams`` returns its training split as a
:class:`~plugtune.kernel.components.RowStream` instead of a list (data larger than memory).
The run then never holds the split; each epoch is one pass through::

    rows of the stream, numbered -> seeded shuffle buffer -> cut into batch_size pieces
    -> task.normalize (when the task has it) -> empty-field check -> encode (training.overlong)
    -> a batch of encoded rows for the loop

* **Shuffle buffer** (instead of grouping by length, which needs every row's length): a
  buffer of ``stream.shuffle_buffer`` rows; each incoming row takes the place of one drawn at
  random, which is yielded. The generator is seeded by ``(seed, epoch)``, so the order is a
  function of the data, the seed and the epoch, as :func:`~plugtune.data.batching.epoch_batches`'s is.
* **Batches are cut from raw rows**: batch ``k`` of an epoch is the shuffled rows
  ``[k * batch_size, (k + 1) * batch_size)``, less those encoding drops (a row whose response
  was cut off, or longer than ``max_length`` under ``overlong: drop``). So ``--resume`` at
  batch ``k`` reads the epoch again and skips ``k * batch_size`` rows *without normalizing or
  tokenizing them*; a batch whose rows were all dropped is skipped, keeping its index.
* **Memory** is the shuffle buffer's raw rows plus one batch's encoded rows, whatever the
  size of the data.
* **Bad rows** are refused as soon as they are read, naming the row's position in the
  stream (counted from 1, after the loader's own selection): an empty task field, a missing
  field, ``overlong: refuse`` on a row too long. The stream cannot be checked ahead, so
  such a refusal may come after training has started.

:func:`split_stream` takes the first :data:`SAMPLE_ROWS` rows of the stream as the in-memory
training sample: the run checks and sets the task up on it (``task.setup``, e.g. label names)
and scores ``training.eval_train_examples`` on it. A classification task on a stream should
list its labels: a label missing from the sample cannot be learned.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Iterator
from typing import Any

from plugtune.data.datacheck import UNLIMITED
from plugtune.data.encoding import Row, encode_split
from plugtune.data.tasks import Task
from plugtune.kernel.components import RowStream
from plugtune.kernel.errors import DataError

SAMPLE_ROWS = 1000  # the first rows of a stream, held in memory for task.setup and the train-dev score


def split_stream(splits: dict[str, Any]) -> tuple[dict[str, list[dict[str, Any]]], RowStream | None]:
    """``(splits with lists only, the stream)``: when the loader's ``train`` is a
    :class:`RowStream`, it is replaced by its first :data:`SAMPLE_ROWS` rows (the sample the
    run sets the task up on) and returned beside; a list ``train`` comes back as it is."""
    train = splits.get("train")
    if isinstance(train, list):
        return splits, None
    if not isinstance(train, RowStream):
        raise DataError(f"the data loader returned a training split of type {type(train).__name__}: "
                        f"neither a list of rows nor a RowStream")
    sample = list(itertools.islice(iter(train), SAMPLE_ROWS))
    if not sample:
        raise DataError("the streamed training split has no rows")
    return {**splits, "train": sample}, train


def shuffled(rows: Iterable[Any], buffer_size: int, seed: int, epoch: int) -> Iterator[Any]:
    """``rows`` through a shuffle buffer of ``buffer_size`` items, seeded by ``(seed, epoch)``:
    each item read once, at most ``buffer_size`` held."""
    rng = random.Random(seed * 1_000_003 + epoch)
    pool: list[Any] = []
    for row in rows:
        if len(pool) < buffer_size:
            pool.append(row)
            continue
        j = rng.randrange(buffer_size)
        yield pool[j]
        pool[j] = row
    rng.shuffle(pool)
    yield from pool


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _show(row: dict[str, Any], limit: int = 80) -> str:
    text = json.dumps(row, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class StreamedTraining:
    """The training split of a run whose loader streams: batches of encoded rows, made on
    the fly from ``stream`` (see the module docstring). Counts what it read and did:
    ``rows_read`` (rows taken from the stream for batches, skipped ones included), ``cut``
    (truncated) and ``dropped`` (left out for length)."""

    def __init__(self, stream: RowStream, task: Task, tokenizer: Any, *, max_length: int, overlong: str,
                 batch_size: int, seed: int) -> None:
        self.stream, self.task, self.tokenizer = stream, task, tokenizer
        self.max_length, self.overlong, self.batch_size, self.seed = max_length, overlong, batch_size, seed
        self.buffer_size = max(1, int(getattr(stream, "shuffle_buffer", 10_000)))
        self.normalize = getattr(task, "normalize", None)
        self.fields = sorted(task.required_fields())
        self.rows_read = self.cut = self.dropped = 0

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, list[Row]]]:
        """``(batch index, encoded rows)`` of ``epoch``, from batch ``start`` on (the rows of
        the batches before are read and skipped, not encoded). Raises :class:`DataError`
        when the epoch has no row at all."""
        rows = shuffled(enumerate(self.stream, 1), self.buffer_size, self.seed, epoch)
        any_row = any_batch = False
        for index in itertools.count():
            chunk = list(itertools.islice(rows, self.batch_size))
            if not chunk:
                break
            any_row = True
            self.rows_read += len(chunk)
            if index < start:
                continue
            encoded = [item for item in (self._encode(row, n) for n, row in chunk) if item is not None]
            if encoded:
                any_batch = True
                yield index, encoded
        if not any_row:
            raise DataError("the streamed training split has no rows")
        if start == 0 and not any_batch:  # else the loop would read epoch after epoch for nothing
            raise DataError("no streamed training row left after encoding (check the templates and training.max_length)")

    def _encode(self, row: dict[str, Any], n: int) -> Row | None:
        """One raw row -> its encoded row, or None when ``training.overlong`` or a cut-off
        response leaves it out."""
        where = f"streamed train row {n}"
        if self.normalize is not None:
            try:
                row = self.normalize(row)
            except DataError as exc:
                raise DataError(f"{where}: {exc}") from None
        for field in self.fields:
            if _blank(row.get(field)):
                raise DataError(f"{where}: the field {field!r} is empty ({_show(row)}); "
                                f"fill it in or filter such rows out of the source")
        limit = self.max_length if self.overlong == "truncate" else UNLIMITED
        try:
            ids = self.task.encode(row, self.tokenizer, limit)
        except KeyError as exc:
            raise DataError(f"{where}: missing field {exc.args[0]!r}") from None
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        except (ValueError, TypeError) as exc:
            raise DataError(f"{where}: cannot be encoded ({type(exc).__name__}: {exc})") from None
        length = len(ids["input_ids"])
        if self.overlong != "truncate" and length > self.max_length:
            if self.overlong == "refuse":
                raise DataError(f"{where} is longer than {self.max_length} tokens ({length}); raise training.max_length, "
                                f"or set training.overlong to truncate or drop")
            self.dropped += 1
            return None
        encoded, cut = encode_split([row], self.task, self.tokenizer, self.max_length, "train", encoded=[ids])
        self.cut += cut
        return encoded[0] if encoded else None
