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
    max_line_bytes: 8388608      # the longest line (a quoted CSV record across lines counts whole)
    max_file_bytes: 4294967296   # the largest file

The split is deterministic: the same file, seed and ``test_size`` always hold out the same
rows, whatever the row order of the rest of the recipe.

Strict input: only regular files are opened (a FIFO, device or folder is refused by name);
a CSV quote never closed names the line where it opened (it cannot swallow the rows after
it), a record with more or fewer fields than the header names its line, a header naming a
column twice is refused; a JSON Lines line that is not an object, or is nested more than
100 levels, is refused with its number. A line longer than ``max_line_bytes`` or a file larger
than ``max_file_bytes`` is refused with a line saying which option raises the limit, after
reading no more than the limit.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from plugtune import hookimpl
from plugtune.sdk import ComponentOptions, DataError, DataPath, open_regular

MAX_LINE_BYTES = 8 << 20  # 8 MiB: far above any real row; bounds the memory one line can take
MAX_FILE_BYTES = 4 << 30  # 4 GiB: the rows of such a file already take several GB of memory
MAX_JSON_DEPTH = 100  # lists and objects inside one JSON Lines row

SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


class TableOptions(ComponentOptions):
    path: DataPath
    test_path: DataPath | None = None
    test_size: float = Field(0.2, gt=0, lt=1)
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict, description="task field -> file column")
    max_train_rows: int | None = Field(None, gt=0)
    max_test_rows: int | None = Field(None, gt=0)
    max_line_bytes: int = Field(MAX_LINE_BYTES, gt=0, description="the longest line (or quoted CSV record) read")
    max_file_bytes: int = Field(MAX_FILE_BYTES, gt=0, description="the largest file read")

    @property
    def limits(self) -> Limits:
        return Limits(self.max_line_bytes, self.max_file_bytes)


def _format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    try:
        return SUFFIX_FORMATS[path.suffix.lower()]
    except KeyError:
        raise DataError(f"{path}: cannot tell the format from the extension; set data.options.format") from None


@dataclass(frozen=True)
class Limits:
    """How much one line and one file may hold (``max_line_bytes``, ``max_file_bytes``):
    checked while streaming, so a 50 MB line fails after reading ``max_line_bytes`` of it."""

    line: int = MAX_LINE_BYTES
    file: int = MAX_FILE_BYTES


def check_size(path: Path, limits: Limits) -> None:
    """Refuse a file larger than ``limits.file`` before reading it (validation calls this)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size > limits.file:
        raise _too_big(path, limits)


def _too_big(path: Path, limits: Limits) -> DataError:
    return DataError(f"{path}: larger than max_file_bytes ({limits.file} bytes); "
                     f"raise data.options.max_file_bytes to read it")


def _lines(path: Path, limits: Limits = Limits()) -> Iterator[str]:
    """The file's lines, decoded one at a time (the file is never held whole in memory, nor
    a line longer than ``limits.line``); a byte that is not UTF-8 is reported with its line
    and byte offset. Only a regular file is opened (:func:`open_regular`)."""
    offset = 0
    with open_regular(path) as fh:
        try:
            for number in itertools.count(1):
                raw = fh.readline(limits.line + 1)
                if not raw:
                    return
                if len(raw) > limits.line and not raw.endswith(b"\n"):
                    raise DataError(f"{path}: line {number} is longer than max_line_bytes ({limits.line} bytes); "
                                    f"raise data.options.max_line_bytes if the data is meant to be this way")
                if offset + len(raw) > limits.file:
                    raise _too_big(path, limits)
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


class _Records:
    """The lines fed to :mod:`csv`, remembering those of the record being read: its first
    line number, and (on an unclosed quote) the line where the quote opened. A record may
    span lines only inside a quoted field, and never more than ``limits.line`` bytes, so an
    unbalanced quote cannot swallow the rest of the file."""

    def __init__(self, path: Path, limits: Limits) -> None:
        self.path, self.limits = path, limits
        self.lines = _lines(path, limits)
        self.start, self.read = 1, 0  # the current record's first line; lines read so far
        self.pending: list[str] = []
        self.size = 0

    def __iter__(self) -> _Records:
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        self.read += 1
        self.pending.append(line)
        self.size += len(line)
        if self.size > self.limits.line:
            raise DataError(f"{self.path}: line {self.unclosed_quote_line()}: a quoted field is never closed within "
                            f"max_line_bytes ({self.limits.line} bytes, up to line {self.read}); close it, "
                            f"or raise data.options.max_line_bytes if the field is meant to be this long")
        return line

    def record_done(self) -> None:
        self.start, self.pending, self.size = self.read + 1, [], 0

    def unclosed_quote_line(self, quote: str = '"') -> int:
        """The line where the record's open quoted field started (csv's rules: a quote opens
        a field only at its start, and ``""`` inside it is a literal quote)."""
        text, opened, inside, at_field_start, i = "".join(self.pending), 0, False, True, 0
        while i < len(text):
            c = text[i]
            if inside:
                if c == quote:
                    if text[i + 1 : i + 2] == quote:
                        i += 1
                    else:
                        inside = False
            elif c == quote and at_field_start:
                inside, opened = True, i
            at_field_start = not inside and c in ",\n\r"
            i += 1
        return self.start + text.count("\n", 0, opened)


def _csv_rows(path: Path, fmt: str, limits: Limits = Limits()) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) of each non-blank CSV/TSV record, the header first.
    Strict: a quote never closed, or text after a closing quote, is an error naming the line."""
    dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {"delimiter": ",", "strict": True}
    if csv.field_size_limit() < limits.line:
        csv.field_size_limit(limits.line)  # only ever raised: _Records bounds every record to limits.line
    feed = _Records(path, limits)
    reader = csv.reader(feed, **dialect)
    try:
        for fields in reader:
            start = feed.start
            feed.record_done()
            if fields:
                yield start, fields
    except csv.Error as exc:
        if feed.pending and str(exc) == "unexpected end of data":
            raise DataError(f"{path}: line {feed.unclosed_quote_line()}: a quoted field is never closed; close it, "
                            f"or double a quote that belongs inside a field (\"\")") from None
        raise DataError(f"{path}: line {reader.line_num}: not valid {fmt} ({exc})") from None


def _header_fields(path: Path, first: tuple[int, list[str]] | None, what: str) -> list[str]:
    """The header record's column names; refused when empty or when a name repeats (a row
    would silently keep only one of the two values)."""
    if first is None:
        raise DataError(f"{path}: {what}")
    header = [c.strip() for c in first[1]]
    seen = set()
    for name in header:
        if name in seen:
            raise DataError(f"{path}: line {first[0]}: column {name!r} appears twice in the header")
        seen.add(name)
    return header


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and objects (iterative: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        if children:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _json_records(path: Path, limits: Limits = Limits()) -> Iterator[dict[str, Any]]:
    """Each non-blank line as a JSON object; a line that is not JSON, not an object, or nested
    more than MAX_JSON_DEPTH deep is refused with its number."""
    for number, line in enumerate(_lines(path, limits), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except RecursionError:
            raise DataError(f"{path}: line {number} is nested more than {MAX_JSON_DEPTH} levels deep") from None
        except ValueError as exc:  # JSONDecodeError, or an integer of more digits than Python converts
            raise DataError(f"{path}: line {number} is not valid JSON ({getattr(exc, 'msg', str(exc).split(':')[0])})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number} is not a JSON object (it is {_json_kind(record)})")
        if line.count("[") + line.count("{") > MAX_JSON_DEPTH and _depth(record) > MAX_JSON_DEPTH:
            raise DataError(f"{path}: line {number} is nested more than {MAX_JSON_DEPTH} levels deep")
        yield record


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _check_encoding(path: Path, limits: Limits, probe: int = 1 << 16) -> None:
    """Decode the first ``probe`` bytes, so validation catches a file saved in another
    encoding without reading it all (loading checks the rest)."""
    seen = 0
    for line in _lines(path, limits):
        seen += len(line)
        if seen > probe:
            break


def _header(path: Path, fmt: str, limits: Limits = Limits()) -> list[str]:
    """The file's column names, read without loading the file."""
    check_size(path, limits)
    if fmt in {"csv", "tsv", "jsonl"}:
        _check_encoding(path, limits)
    if fmt in {"csv", "tsv"}:
        return _header_fields(path, next(_csv_rows(path, fmt, limits), None), "the file is empty")
    if fmt == "jsonl":
        record = next(_json_records(path, limits), None)
        if record is None:
            raise DataError(f"{path}: the file is empty")
        return list(record)
    try:
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a non-parquet file
        raise DataError(f"{path}: cannot read as {fmt} ({type(exc).__name__}: {exc})") from None


def _read(path: Path, fmt: str, limits: Limits = Limits()) -> list[dict[str, Any]]:
    """Every row as a dict, streamed: one line in memory at a time besides the rows kept.
    CSV/TSV values stay the text they are in the file (no type guessing); a record with more
    or fewer fields than the header is refused with its line."""
    check_size(path, limits)
    if fmt in {"csv", "tsv"}:
        records = _csv_rows(path, fmt, limits)
        header = _header_fields(path, next(records, None), "no rows")
        rows = []
        for line, fields in records:
            if len(fields) != len(header):
                raise DataError(f"{path}: line {line} has {len(fields)} fields, the header has {len(header)} "
                                f"({', '.join(header)})")
            rows.append(dict(zip(header, fields)))
    elif fmt == "jsonl":
        rows = list(_json_records(path, limits))
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
        names = _header(o.path, _format(o.path, o.format), o.limits)
        if o.test_path is not None:
            test_names = _header(o.test_path, _format(o.test_path, o.format), o.limits)
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
        train = self._prepare(_read(o.path, _format(o.path, o.format), o.limits))
        if o.test_path is not None:
            test = self._prepare(_read(o.test_path, _format(o.test_path, o.format), o.limits))
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
