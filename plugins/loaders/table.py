"""``table``: CSV, TSV, JSON Lines and Parquet files through ``datasets``.

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
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from plugtune import hookimpl
from plugtune.components import ComponentOptions
from plugtune.errors import DataError
from plugtune.recipe import DataPath

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


def _header(path: Path, fmt: str) -> list[str]:
    """The file's column names, read without loading the file."""
    try:
        if fmt in {"csv", "tsv"}:
            with open(path, encoding="utf-8", newline="") as fh:
                row = next(csv.reader(fh, delimiter="\t" if fmt == "tsv" else ","), None)
            if not row:
                raise DataError(f"{path}: the file is empty")
            return [c.strip() for c in row]
        if fmt == "jsonl":
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise DataError(f"{path}: line 1 is not a JSON object")
                        return list(record)
            raise DataError(f"{path}: the file is empty")
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno} is not valid JSON ({exc.msg})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - e.g. pyarrow's errors for a non-parquet file
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read as {fmt} ({type(exc).__name__}: {exc})") from None


def _read(path: Path, fmt: str) -> Any:
    import datasets

    datasets.disable_progress_bars()
    builder, kwargs = {
        "csv": ("csv", {}),
        "tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
        "jsonl": ("json", {}),
        "parquet": ("parquet", {}),
    }[fmt]
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; report one line
        cause = exc.__cause__ or exc
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(f"{path}: not UTF-8 text ({cause.reason}); re-save it as UTF-8") from None
        if isinstance(cause, ValueError) and "corresponds to no data" in str(cause):
            raise DataError(f"{path}: no rows") from None
        raise DataError(f"{path}: cannot read as {fmt} ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})") from None
    if len(ds) == 0:
        raise DataError(f"{path}: no rows")
    return ds


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

    def _prepare(self, ds: Any) -> Any:
        renames = {src: dst for dst, src in self.options.columns.items() if src != dst}
        shadowed = [c for c in ds.column_names if c in self.options.columns and c not in renames]
        ds = ds.remove_columns(shadowed) if shadowed else ds
        return ds.rename_columns(renames) if renames else ds

    def load(self, seed: int) -> dict[str, list[dict[str, Any]]]:
        o = self.options
        train = self._prepare(_read(o.path, _format(o.path, o.format)))
        if o.test_path is not None:
            test = self._prepare(_read(o.test_path, _format(o.test_path, o.format)))
        else:
            if len(train) < 2:
                raise DataError(f"{o.path}: {len(train)} row(s) cannot be split into train and test")
            parts = train.train_test_split(test_size=o.test_size, seed=seed, shuffle=True)
            train, test = parts["train"], parts["test"]
        if o.max_train_rows is not None and len(train) > o.max_train_rows:
            train = train.shuffle(seed=seed).select(range(o.max_train_rows))
        if o.max_test_rows is not None and len(test) > o.max_test_rows:
            test = test.shuffle(seed=seed).select(range(o.max_test_rows))
        try:
            return {"train": train.to_list(), "test": test.to_list()}
        except UnicodeDecodeError as exc:  # pyarrow's JSON reader lets invalid UTF-8 through
            raise DataError(f"{o.path}: not UTF-8 text ({exc.reason}); re-save it as UTF-8") from None


@hookimpl
def register_data_loaders(register):
    register("table", TableLoader)
