"""A recipe's data: one loader, or several sources mixed into one training split.

``data: {loader, options}`` is one source. ``data: {sources: [...], mix: concat|sample,
seed, size}`` is a mixture: each source is a loader of its own (any loader, its own
options and column mapping), optionally with a ``weight``, a ``name``, ``max_rows`` (a
seeded cap on its training rows) and ``task`` (overrides of the recipe task's options,
used only to :meth:`normalize` that source's rows: a ShareGPT source in an OpenAI-shaped
chat recipe). The recipe's task encodes every row.

* ``concat``: the sources' training rows one after another (the loop shuffles batches).
* ``sample``: the training split is drawn from the sources in proportion to their weights:
  ``size`` rows (default: as many as the sources hold together), each source's quota by
  largest remainder, drawn without replacement while a source has rows enough and by whole
  repetitions plus a seeded draw beyond that, then shuffled, all from ``seed`` (default:
  ``training.seed``).

Test rows are never resampled: every source's test split is concatenated.

The core names no loader here: a source's loader is whatever the recipe bound. The rows a
source contributes are tracked by identity (:class:`MixedData`), so that after encoding
each source's truncated and dropped rows are counted (:meth:`MixedData.count_encoded`),
printed one line per source and recorded in the adapter's manifest
(``training.sources``).

Normalization happens here, once per row, for single sources and mixtures alike: the
task's optional ``normalize(example) -> example`` maps a raw row to its canonical form. A
single source's rows go through the caller's task (what it notes, ``notes()``, is the run's
note); in a mixture each source's rows go through a copy of its own task (its ``task:``
options) or of the recipe's, so detection never leaks between sources, and each copy's
notes are prefixed with the source. Callers must not normalize again.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plugtune.data.datacheck import check_empty_fields, normalize_splits, task_notes
from plugtune.data.streaming import split_stream
from plugtune.data.tasks import Task
from plugtune.kernel.errors import DataError

SPLITS = ("train", "test")


@dataclass
class Source:
    """One source of a recipe's data: a bound loader (anything with ``name`` and
    ``build() -> DataLoader``) and how it enters the mixture. ``where`` is its field path
    (``data`` for a single source, ``data.sources[1]`` in a mixture)."""

    name: str
    loader: Any
    where: str = "data"
    weight: float | None = None
    task: Task | None = None  # a per-source task, only to normalize this source's rows
    max_rows: int | None = None


@dataclass(frozen=True)
class Mix:
    """How a mixture combines its sources: ``how`` is ``concat`` or ``sample``."""

    how: str = "concat"
    seed: int | None = None
    size: int | None = None


def path_options(options: Any, key: str = "") -> list[tuple[str, Path]]:
    """``(dotted key, path)`` for every Path value in a component's options (nested too):
    the files a source reads, for its default name and for the run's inputs."""
    if isinstance(options, Path):
        return [(key, options)]
    if hasattr(options, "model_fields"):
        items = [(name, getattr(options, name, None)) for name in type(options).model_fields]
    elif isinstance(options, dict):
        items = list(options.items())
    elif isinstance(options, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(options)]
    else:
        return []
    return [found for name, value in items for found in path_options(value, f"{key}.{name}" if key else str(name))]


def _zero() -> dict[str, int]:
    return dict.fromkeys(SPLITS, 0)


@dataclass
class SourceCounts:
    """What one source contributed: rows its loader read, rows kept in the mixed splits
    (after ``max_rows`` and sampling), and rows truncated or dropped for length once
    encoded (None until :meth:`MixedData.count_encoded`, or when they cannot be told apart,
    e.g. a regularizer replaced rows)."""

    name: str
    loader: str
    weight: float | None
    read: dict[str, int] = field(default_factory=_zero)
    kept: dict[str, int] = field(default_factory=_zero)
    truncated: dict[str, int | None] = field(default_factory=_zero)
    dropped: dict[str, int | None] = field(default_factory=_zero)

    def record(self) -> dict[str, Any]:
        """The manifest's record (``training.sources[i]``)."""
        out: dict[str, Any] = {"name": self.name, "loader": self.loader}
        if self.weight is not None:
            out["weight"] = self.weight
        out.update(rows_read=dict(self.read), rows_kept=dict(self.kept), truncated=dict(self.truncated),
                   dropped=dict(self.dropped))
        return out

    def line(self, train_total: int) -> str:
        """One line for the log: ``source NAME (loader): read ..., kept ..., ...``."""
        share = f" ({self.kept['train'] / train_total:.1%} of train)" if train_total else ""
        weight = f", weight {self.weight:g}" if self.weight is not None else ""
        return (f"source {self.name} ({self.loader}{weight}): read {self.read['train']} train + {self.read['test']} test, "
                f"kept {self.kept['train']} train{share} + {self.kept['test']} test, "
                f"{_count(self.truncated)} truncated, {_count(self.dropped)} dropped")


def _count(values: dict[str, int | None]) -> str:
    if any(v is None for v in values.values()):
        return "?"
    return str(sum(v for v in values.values() if v is not None))


@dataclass
class MixedData:
    """The loaded (and normalized) splits, each source's counts, and which source every
    row object came from (``owner``: ``id(row)`` -> the source's index)."""

    splits: dict[str, list[dict[str, Any]]]
    counts: list[SourceCounts]
    owner: dict[int, int]
    mixture: bool
    notes: list[str] = field(default_factory=list)  # what the normalizing tasks noted (detected formats)
    stream: Any = None  # a single source's streamed training split (a RowStream); splits["train"] is its sample

    def count_encoded(self, split: str, encoded: list[dict[str, Any]], *, policy: str, max_length: int,
                      cut: int, dropped: int) -> None:
        """Attribute a split's encoding outcome to the sources: ``encoded`` are the rows
        encoding kept (each with its raw ``example``), ``cut`` and ``dropped`` the split's
        totals. As in :func:`~plugtune.data.encoding.encode_split`, a row is truncated when it
        reaches ``max_length`` or lost its whole response; ``drop`` leaves rows out. When the
        per-source counts do not add up to the totals (rows that are no source's, from an
        augmenting regularizer that replaced them) they are None, never a guess."""
        present: Counter[int | None] = Counter()
        full: Counter[int | None] = Counter()
        for row in encoded:
            owner = self.owner.get(id(row.get("example")))
            present[owner] += 1
            if len(row["input_ids"]) >= max_length:
                full[owner] += 1
        truncated, left_out = {}, {}
        for i, counts in enumerate(self.counts):
            missing = max(0, counts.kept[split] - present[i])
            truncated[i] = full[i] + (missing if policy != "drop" else 0)
            left_out[i] = missing if policy == "drop" else 0
        exact = sum(truncated.values()) == cut and sum(left_out.values()) == dropped
        for i, counts in enumerate(self.counts):
            counts.truncated[split] = truncated[i] if exact else None
            counts.dropped[split] = left_out[i] if exact else None

    def records(self) -> list[dict[str, Any]]:
        return [c.record() for c in self.counts]

    def lines(self) -> list[str]:
        total = len(self.splits["train"])
        return [c.line(total) for c in self.counts]


def carve_validation(data: MixedData, size: float, seed: int) -> MixedData:
    """Move a seeded sample of the training rows into the evaluation split, replacing the
    test split: ``size`` below 1 is a fraction of the training rows, from 1 a row count. For
    choosing among runs (``plugtune sweep``, a rate search) without ever reading the test
    split; the test rows are not kept. Each source's counts follow its rows."""
    import random

    train = data.splits["train"]
    count = round(size * len(train)) if size < 1 else int(size)
    if not 1 <= count < len(train):
        raise DataError(f"data.validation: {size:g} leaves no rows on one side of the {len(train)} training rows; "
                        f"give a fraction between 0 and 1 or a count below {len(train)}")
    chosen = set(random.Random(seed).sample(range(len(train)), count))
    validation = [row for i, row in enumerate(train) if i in chosen]
    rest = [row for i, row in enumerate(train) if i not in chosen]
    data.splits = {**data.splits, "train": rest, "test": validation}
    for i, counts in enumerate(data.counts):
        counts.kept["test"] = sum(1 for row in validation if data.owner.get(id(row), 0 if len(data.counts) == 1 else None) == i)
        counts.kept["train"] = sum(1 for row in rest if data.owner.get(id(row), 0 if len(data.counts) == 1 else None) == i)
    data.notes.append(f"validation: {count} of the {len(train)} training rows (seed {seed}) are the evaluation split; "
                      f"the test split is not read")
    return data


def load_data(sources: list[Source], task: Task, seed: int, mix: Mix | None = None) -> MixedData:
    """Load every source (``loader.load(seed)``), normalize its rows with its task, check
    their task fields are filled, and combine them as ``mix`` says (None: one source, its
    splits as they are)."""
    if not sources:
        raise DataError("data: no sources")
    loaded: list[dict[str, list[dict[str, Any]]]] = []
    counts: list[SourceCounts] = []
    notes: list[str] = []
    mixing = mix is not None or len(sources) > 1
    stream = None
    for source in sources:
        splits, stream = split_stream(source.loader.build().load(seed))  # a stream: its first rows stand in
        if stream is not None and mixing:
            raise DataError(f"{source.where} ({source.name}): a streamed source cannot be mixed; "
                            "stream a single source, or set streaming: false")
        splits = {split: list(splits.get(split) or []) for split in SPLITS}
        normalizer = copy.deepcopy(source.task or task) if mixing else task
        splits = _normalized(splits, normalizer, source)
        notes += [f"{source.name}: {n}" if mixing else n for n in task_notes(normalizer)]
        if len(sources) > 1:  # a single source's rows are checked by the caller, as before mixtures
            try:
                check_empty_fields(splits, task)
            except DataError as exc:
                raise DataError(f"{source.where} ({source.name}): {exc}") from None
        counts.append(SourceCounts(source.name, source.loader.name, source.weight,
                                   read={s: len(splits[s]) for s in SPLITS}))
        loaded.append(splits)
    if mix is None and len(sources) == 1:
        splits = loaded[0]
        counts[0].kept = {s: len(splits[s]) for s in SPLITS}
        owner = {id(row): 0 for s in SPLITS for row in splits[s]}
        return MixedData(splits, counts, owner, mixture=False, notes=notes, stream=stream)
    mixed = _mix(sources, loaded, counts, mix or Mix(), seed)
    mixed.notes = notes
    return mixed


def _normalized(splits: dict[str, list[dict[str, Any]]], task: Task, source: Source) -> dict[str, list[dict[str, Any]]]:
    """Each row through ``task.normalize`` (:func:`normalize_splits`); a row it refuses is one
    line naming the source (in a mixture), the split and the row."""
    try:
        return normalize_splits(splits, task)
    except DataError as exc:
        if source.where == "data":
            raise
        raise DataError(f"{source.where} ({source.name}) {exc}") from None


def _rng(seed: int, index: int) -> Any:
    import numpy as np

    return np.random.default_rng([seed, index])


def quotas(total: int, weights: list[float]) -> list[int]:
    """``total`` rows split in proportion to ``weights`` by largest remainder (ties to the
    earlier source): whole numbers that add up to ``total``."""
    top = max(weights)
    weights = [w / top for w in weights]  # 1e308 and 1e308 add up to infinity; their ratios do not
    whole = sum(weights)
    shares = [total * w / whole for w in weights]
    base = [math.floor(s) for s in shares]
    order = sorted(range(len(weights)), key=lambda i: (-(shares[i] - base[i]), i))
    for i in order[: total - sum(base)]:
        base[i] += 1
    return base


def _draw(rows: list[dict[str, Any]], n: int, rng: Any) -> list[dict[str, Any]]:
    """``n`` of ``rows``: a seeded subset, or whole repetitions plus a seeded subset."""
    repeats, rest = divmod(n, len(rows))
    return rows * repeats + [rows[j] for j in rng.permutation(len(rows))[:rest].tolist()]


def _mix(sources: list[Source], loaded: list[dict[str, list[dict[str, Any]]]], counts: list[SourceCounts],
         mix: Mix, seed: int) -> MixedData:
    seed = seed if mix.seed is None else mix.seed
    rngs = [_rng(seed, i) for i in range(len(sources))]
    trains = []
    for source, splits, rng in zip(sources, loaded, rngs):
        train = splits["train"]
        if source.max_rows is not None and len(train) > source.max_rows:
            train = _draw(train, source.max_rows, rng)
        trains.append(train)
    if mix.how == "sample":
        empty = [s for s, rows in zip(sources, trains) if not rows]
        if empty:
            raise DataError(f"{empty[0].where} ({empty[0].name}): no training rows to sample from; "
                            f"remove the source or give it data")
        total = mix.size if mix.size is not None else sum(len(rows) for rows in trains)
        wanted = quotas(total, [float(s.weight or 0.0) for s in sources])
        trains = [_draw(rows, n, rng) if n != len(rows) else rows for rows, n, rng in zip(trains, wanted, rngs)]
    owner: dict[int, int] = {}
    for i, (rows, splits) in enumerate(zip(trains, loaded)):
        counts[i].kept = {"train": len(rows), "test": len(splits["test"])}
        owner.update((id(row), i) for row in (*rows, *splits["test"]))
    train = [row for rows in trains for row in rows]
    if mix.how == "sample":
        order = _rng(seed, len(sources)).permutation(len(train)).tolist()
        train = [train[j] for j in order]
    test = [row for splits in loaded for row in splits["test"]]
    if not train:
        raise DataError("data.sources: no training rows in any source")
    return MixedData({"train": train, "test": test}, counts, owner, mixture=True)


class MixedLoader:
    """A mixture standing where a recipe's single bound loader would (``recipe.loader``):
    ``build().load(seed)`` gives the mixed splits, already normalized; ``columns()`` the
    columns every source has."""

    name = "sources"
    options = None

    def __init__(self, sources: list[Source], mix: Mix, task: Task) -> None:
        self.sources, self.mix, self.task = sources, mix, task

    def build(self) -> MixedLoader:
        return self

    def options_dict(self) -> dict[str, Any]:
        return {}

    def columns(self) -> list[str]:
        each = [s.loader.build().columns() for s in self.sources]
        return [c for c in each[0] if all(c in other for other in each[1:])]

    def load(self, seed: int) -> dict[str, list[dict[str, Any]]]:
        return load_data(self.sources, self.task, seed, self.mix).splits


__all__ = ["Mix", "MixedData", "MixedLoader", "Source", "SourceCounts", "load_data", "path_options", "quotas"]
