"""``table``: CSV, TSV, JSON Lines and Parquet files.

CSV, TSV and JSON Lines are streamed line by line into rows (the file is never read whole,
and there is no second copy in an Arrow cache); a byte that is not UTF-8 is reported with
its line and byte offset. Parquet is read with pyarrow.

Options::

    path: data/train.csv         # relative to the recipe's folder
    test_path: data/test.csv     # optional held-out split; without it, a seeded split
    test_size: 0.2               # fraction held out when there is no test_path
    format: auto                 # csv | tsv | jsonl | parquet (auto: from the extension)
    columns: {text: sentence}    # task field <- file column
    max_train_rows: 2000         # optional seeded subsets
    max_test_rows: 500

The split is deterministic: the same file, seed and ``test_size`` always hold out the same
rows, whatever the row order of the rest of the recipe.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from plugtune import hookimpl
from plugtune.sdk import ComponentOptions, DataError, DataPath

SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


class TableOptions(ComponentOptions):
    path: DataPath
    test_path: DataPath | None = None
    test_size: float = Field(0.2, gt=0, lt=1)
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict, description="task field -> file column")
    max_train_rows: int | None = Field(None, gt=0)
    max_test_rows: int | None = Field(None, gt=0)


def _format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    try:
        return SUFFIX_FORMATS[path.suffix.lower()]
    except KeyError:
        raise DataError(f"{path}: cannot tell the format from the extension; set data.options.format") from None


def _lines(path: Path) -> Iterator[str]:
    """The file's lines, decoded one at a time (the file is never held whole in memory); a
    byte that is not UTF-8 is reported with its line and byte offset."""
    offset = 0
    try:
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}: not UTF-8 text (byte {offset + exc.start}, line {number}); "
                                    f"re-save it as UTF-8") from None
                if number == 1 and line.startswith("\ufeff"):  # a byte-order mark
                    line = line[1:]
                offset += len(raw)
                yield line
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _csv_rows(path: Path, fmt: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank CSV/TSV record, the header first."""
    dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {"delimiter": ","}
    reader = csv.reader(_lines(path), **dialect)
    try:
        for fields in reader:
            if fields:
                yield reader.line_num, fields
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: not valid {fmt} ({exc})") from None


def _json_records(path: Path) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number} is not a JSON object")
        yield record


def _check_encoding(path: Path, limit: int = 1 << 16) -> None:
    """Decode the first ``limit`` bytes, so validation catches a file saved in another
    encoding without reading it all (loading checks the rest)."""
    seen = 0
    for line in _lines(path):
        seen += len(line)
        if seen > limit:
            break


def _header(path: Path, fmt: str) -> list[str]:
    """The file's column names, read without loading the file."""
    if fmt in {"csv", "tsv", "jsonl"}:
        _check_encoding(path)
    if fmt in {"csv", "tsv"}:
        first = next(_csv_rows(path, fmt), None)
        if first is None:
            raise DataError(f"{path}: the file is empty")
        return [c.strip() for c in first[1]]
    if fmt == "jsonl":
        record = next(_json_records(path), None)
        if record is None:
            raise DataError(f"{path}: the file is empty")
        return list(record)
    try:
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a non-parquet file
        raise DataError(f"{path}: cannot read as {fmt} ({type(exc).__name__}: {exc})") from None


def _read(path: Path, fmt: str) -> list[dict[str, Any]]:
    """Every row as a dict, streamed: one line in memory at a time besides the rows kept.
    CSV/TSV values stay the text they are in the file (no type guessing)."""
    if fmt in {"csv", "tsv"}:
        records = _csv_rows(path, fmt)
        first = next(records, None)
        if first is None:
            raise DataError(f"{path}: no rows")
        header = [c.strip() for c in first[1]]
        rows = []
        for line, fields in records:
            if len(fields) != len(header):
                raise DataError(f"{path}: line {line} has {len(fields)} fields, the header has {len(header)} "
                                f"({', '.join(header)})")
            rows.append(dict(zip(header, fields)))
    elif fmt == "jsonl":
        rows = list(_json_records(path))
    else:
        try:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{path}: cannot read as {fmt} ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _permutation(n: int, seed: int) -> list[int]:
    """The seeded row order ``datasets`` uses for ``train_test_split`` and ``shuffle``
    (numpy's default generator), so splits match those made with ``datasets``."""
    import numpy as np

    return np.random.default_rng(seed).permutation(n).tolist()


class TableLoader:
    """Rows of a table file become examples; ``columns`` renames file columns to task fields."""

    Options = TableOptions

    def __init__(self, options: TableOptions) -> None:
        self.options = options

    def columns(self) -> list[str]:
        o = self.options
        names = _header(o.path, _format(o.path, o.format))
        if o.test_path is not None:
            test_names = _header(o.test_path, _format(o.test_path, o.format))
            names = [n for n in names if n in test_names]
        missing = [src for src in o.columns.values() if src not in names]
        if missing:
            raise DataError(f"columns: {', '.join(map(repr, missing))} not in {o.path.name} (columns: {', '.join(names)})")
        inverse = {src: dst for dst, src in o.columns.items()}
        return [inverse.get(n, n) for n in names if n not in o.columns or n in inverse]

    def _prepare(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        renames = {src: dst for dst, src in self.options.columns.items() if src != dst}
        dropped = {c for c in self.options.columns if c not in renames}  # shadowed by a renamed column
        if not renames and not dropped:
            return rows
        return [{renames.get(k, k): v for k, v in row.items() if k not in dropped or k in renames} for row in rows]

    def load(self, seed: int) -> dict[str, list[dict[str, Any]]]:
        o = self.options
        train = self._prepare(_read(o.path, _format(o.path, o.format)))
        if o.test_path is not None:
            test = self._prepare(_read(o.test_path, _format(o.test_path, o.format)))
        else:
            if len(train) < 2:
                raise DataError(f"{o.path}: {len(train)} row(s) cannot be split into train and test")
            n_test = math.ceil(o.test_size * len(train))
            order = _permutation(len(train), seed)
            train, test = [train[i] for i in order[n_test:]], [train[i] for i in order[:n_test]]
        if o.max_train_rows is not None and len(train) > o.max_train_rows:
            train = [train[i] for i in _permutation(len(train), seed)[: o.max_train_rows]]
        if o.max_test_rows is not None and len(test) > o.max_test_rows:
            test = [test[i] for i in _permutation(len(test), seed)[: o.max_test_rows]]
        return {"train": train, "test": test}


@hookimpl
def register_data_loaders(register):
    register("table", TableLoader)
