"""``hf``: data through the Hugging Face ``datasets`` library.

Options::

    path: data/train.jsonl       # a JSON/JSONL/CSV/TSV/Parquet/Arrow file (relative to the recipe),
                                 # a folder written by save_to_disk (a Dataset or a DatasetDict),
                                 # or a hub dataset id (org/name): used from the cache, fetched when online
    format: auto                 # json | csv | tsv | parquet | arrow (auto: from the extension;
                                 # .jsonl and .json are json, .gz/.bz2/.xz/.zst compressed files too)
    config: null                 # a hub dataset's configuration name
    test_path: null              # a file holding the test rows (files only)
    split: train                 # the split trained on
    test_split: null             # the held-out split; null: "test" when there is one, else a seeded split
    test_size: 0.2               # fraction held out when there is no test split (seeded, like table's)
    columns: {text: sentence}    # task field <- data column, exactly as table's
    select: "0:5000"             # row ranges of the training split, start:stop, comma-separated
    filter: "len(text) > 20 and label != 'spam'"   # keep the rows where this is true (both splits)
    streaming: false             # read the training split lazily (data larger than memory)
    test_rows: 1000              # streaming: the test split is this many rows (see below)
    shuffle_buffer: 10000        # streaming: rows in the core's seeded shuffle buffer

**Splits.** A file is one split, ``train`` (with ``test_path``, a second one, ``test``); a
``save_to_disk`` folder of one ``Dataset`` is ``train``; a ``DatasetDict`` folder and a hub
dataset have the splits they have (an unknown ``split``/``test_split`` is refused naming
them). Without a test split, ``test_size`` of the training rows are held out by a seeded
permutation: the same rows ``table`` would hold out of the same file with the same seed (and
the rows ``datasets``' ``train_test_split`` would, numpy's generator seeded with ``seed``).

**select and filter.** ``select`` takes row ranges of the training split, before the
held-out split is carved from it; ``filter`` then keeps the rows for which the expression is
true, in the training and test splits both. Both act on the data's own column names, before
``columns`` renames them. The expression language (columns, literals, comparisons, boolean
operators, arithmetic, ``len``, ``lower()``, ``in``...) is parsed with :mod:`ast` and refused
at validation when it uses anything else; see :mod:`plugtune.plugins.loaders.hf_expressions`.
They run through ``datasets``' own ``select``/``filter`` (``skip``/``take``/``filter`` when
streaming), with indices kept in memory, so nothing is written beside the data.

**streaming: true** returns the training split as a :class:`~plugtune.sdk.RowStream`: the
core reads it lazily through a seeded shuffle buffer, tokenizes on the fly, and never holds
the split (memory is bounded by ``shuffle_buffer`` rows; BENCHMARKS.md measures it on a
million rows). ``training.max_steps`` is required. The test split is the first ``test_rows``
rows of the named test split, or, without one, the first ``test_rows`` rows of the (selected
and filtered) training split, which training then skips: put a shuffled file first if its
rows are sorted. A hub dataset streams from the hub when online, and from its cached Arrow
files (memory-mapped, not read into memory) when offline.

**columns()** reads no rows where it can: a Parquet or Arrow file's schema, a
``save_to_disk`` folder's ``dataset_info.json``, a hub dataset's cached builder info; for
JSON and CSV, ``datasets`` reads the header or the first block of lines in streaming mode.

**Caches.** ``datasets`` turns files into Arrow files before use. For local files they go
under ``$PLUGTUNE_HOME/datasets`` (``~/.cache/plugtune`` by default) rather than
``~/.cache/huggingface``, with plugtune's other caches: one place to clear, and a recipe's
data never writes beside itself; the next run of the same file reuses them. A ``save_to_disk``
folder is memory-mapped where it is (nothing copied, nothing written). A hub dataset uses the
``datasets`` cache (``$HF_DATASETS_CACHE``, ``~/.cache/huggingface/datasets``), the one where
a dataset you downloaded before already sits; offline (``HF_HUB_OFFLINE=1`` or no network)
a dataset that is not there is a one-line error naming the id and that folder. Streaming
reads files directly and writes no cache.

**Strict input.** Local files must be regular files: a FIFO, device or socket is refused by
name (at validation and again, on the open descriptor, before ``datasets`` reads it), and so
is one among a ``save_to_disk`` folder's files. A missing file, an unknown split or column, a
bad expression or a row the expression cannot be evaluated on is one line saying what and
where. CSV values are typed by ``datasets`` (pandas): use ``table`` to keep every value as
the text in the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from plugtune import hookimpl
from plugtune.plugins.loaders.hf_expressions import ExpressionError, RowFilter, in_ranges, parse_ranges, range_indices
from plugtune.sdk import ComponentOptions, DataError, DataPath, not_regular, open_regular, plugtune_home

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".arrow": "arrow"}
COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".zip"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SAVED = ("dataset_dict.json", "state.json")  # what save_to_disk writes (a DatasetDict, a Dataset)
MAX_INFO_BYTES = 64 << 20  # a save_to_disk folder's JSON files


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in COMPRESSION:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


class HfOptions(ComponentOptions):
    path: Path | str = Field(description="a data file, a save_to_disk folder, or a hub dataset id (org/name)")
    format: Literal["auto", "json", "csv", "tsv", "parquet", "arrow"] = "auto"
    config: str | None = Field(None, description="a hub dataset's configuration name")
    test_path: DataPath | None = Field(None, description="a file of test rows (when path is a file)")
    split: str = Field("train", min_length=1)
    test_split: str | None = Field(None, min_length=1)
    test_size: float = Field(0.2, gt=0, lt=1)
    columns: dict[str, str] = Field(default_factory=dict, description="task field -> data column")
    select: str | None = Field(None, description="row ranges of the training split: start:stop, comma-separated")
    filter: str | None = Field(None, description="keep the rows where this expression is true")
    streaming: bool = False
    test_rows: int = Field(1000, gt=0, le=10_000_000, description="streaming: rows in the test split")
    shuffle_buffer: int = Field(10_000, gt=0, le=10_000_000, description="streaming: rows in the shuffle buffer")

    @field_validator("path", mode="before")
    @classmethod
    def _source(cls, value: Any, info: ValidationInfo) -> Path | str:
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise ValueError("give a data file, a save_to_disk folder, or a hub dataset id (org/name)")
        local = _local(Path(value), info)
        if _exists(local):
            what = not_regular(local)
            if what == "a folder":
                if not any(_exists(local / name) for name in SAVED):
                    raise ValueError(f"{local} is a folder but not one written by save_to_disk (no dataset_dict.json "
                                     f"or state.json); name a data file in it, or save the dataset with save_to_disk")
            elif what is not None:
                raise ValueError(f"{local} is {what}, not a regular file or a folder")
            return local
        text = str(value)
        if HUB_ID.fullmatch(text) and _suffix(Path(text)) not in FORMATS and not text.startswith("."):
            return text  # a hub id (no local file or folder of that name)
        raise ValueError(f"file not found: {local} (paths are relative to the recipe's folder; a hub dataset is org/name)")

    @field_validator("select")
    @classmethod
    def _ranges(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_ranges(value)
            except ExpressionError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("filter")
    @classmethod
    def _expression(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                RowFilter(value)
            except ExpressionError as exc:
                raise ValueError(str(exc)) from None
        return value


def _local(path: Path, info: ValidationInfo) -> Path:
    base = Path((info.context or {}).get("base_dir", "."))
    return path if path.is_absolute() else base / path


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _quiet() -> Iterator[Any]:
    """``datasets`` imported with its progress bars and info logging off (restored after)."""
    import datasets
    from datasets import utils as ds_tqdm
    from datasets.utils import logging as ds_logging

    verbosity, bars = ds_logging.get_verbosity(), ds_tqdm.are_progress_bars_disabled()
    ds_logging.set_verbosity_error()
    ds_tqdm.disable_progress_bars()
    try:
        yield datasets
    finally:
        ds_logging.set_verbosity(verbosity)
        if not bars:
            ds_tqdm.enable_progress_bars()


def hub_cache() -> Path:
    """Where ``datasets`` keeps prepared hub datasets (``$HF_DATASETS_CACHE``)."""
    from datasets import config

    return Path(os.environ.get("HF_DATASETS_CACHE") or config.HF_DATASETS_CACHE)


def _offline() -> bool:
    from datasets import config

    return bool(config.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _read_json(path: Path) -> Any:
    with open_regular(path) as fh:
        raw = fh.read(MAX_INFO_BYTES + 1)
    if len(raw) > MAX_INFO_BYTES:
        raise DataError(f"{path}: larger than {MAX_INFO_BYTES} bytes; not a dataset_info file")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); the save_to_disk folder is damaged") from None


def _rename(row: dict[str, Any], renames: dict[str, str], dropped: set[str]) -> dict[str, Any]:
    return {renames.get(k, k): v for k, v in row.items() if k not in dropped or k in renames}


class HfStream:
    """The training split of ``streaming: true``: a :class:`~plugtune.sdk.RowStream` over a
    ``datasets.IterableDataset`` with ``select``, ``filter``, the held-out rows and the
    column mapping applied as it is read."""

    def __init__(self, dataset: Any, loader: HfLoader, skip: int) -> None:
        self.dataset, self.loader, self.skip = dataset, loader, skip
        self.shuffle_buffer = loader.options.shuffle_buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows = self.loader._stream_rows(self.dataset, train=True)
        with _quiet():
            for i, row in enumerate(rows):
                if i >= self.skip:
                    yield self.loader._prepare(row)


class HfLoader:
    """Rows through ``datasets`` (see the module docstring)."""

    Options = HfOptions

    def __init__(self, options: HfOptions) -> None:
        self.options = options
        self.row_filter = RowFilter(options.filter) if options.filter else None
        self.ranges = parse_ranges(options.select) if options.select else None

    @property
    def streams(self) -> bool:
        return self.options.streaming

    # -- where the data is ---------------------------------------------------------------

    @property
    def kind(self) -> Literal["file", "disk", "hub"]:
        path = self.options.path
        if isinstance(path, str):
            return "hub"
        return "disk" if path.is_dir() else "file"

    def _format(self, path: Path) -> str:
        if self.options.format != "auto":
            return self.options.format
        try:
            return FORMATS[_suffix(path)]
        except KeyError:
            raise DataError(f"{path}: cannot tell the format from the extension; set data.options.format "
                            f"({', '.join(sorted(set(FORMATS.values())))})") from None

    def _files(self) -> dict[str, Path]:
        o = self.options
        files = {"train": o.path}
        if o.test_path is not None:
            files["test"] = o.test_path
        for path in files.values():
            open_regular(path).close()  # a regular file when opened (a FIFO swapped in is refused, never read)
        return files

    def _builder(self, path: Path) -> tuple[str, dict[str, Any]]:
        fmt = self._format(path)
        return ("csv", {"delimiter": "\t"}) if fmt == "tsv" else (fmt, {})

    def _where(self) -> str:
        return str(self.options.path)

    def _check_folder(self, folder: Path) -> None:
        """Every file of a save_to_disk folder is a regular one (a FIFO would block the read)."""
        for entry in sorted(folder.rglob("*")):
            what = not_regular(entry)
            if what is not None and what != "a folder":
                raise DataError(f"{entry} is {what}, not a regular file; the save_to_disk folder {folder} is not one datasets wrote")

    def _hub_error(self, exc: Exception) -> DataError:
        o = self.options
        config = f" (config {o.config!r})" if o.config else ""
        if _offline() or isinstance(exc, ConnectionError):
            return DataError(f"hub dataset {o.path!r}{config} is not in the datasets cache ({hub_cache()}) and the hub "
                             f"cannot be reached (offline); download it once online, or set HF_DATASETS_CACHE to where it is")
        return DataError(f"hub dataset {o.path!r}{config}: {type(exc).__name__}: {_one_line(exc)}")

    # -- opening -------------------------------------------------------------------------

    def _open(self, streaming: bool) -> dict[str, Any]:
        """The source's splits, by name: ``datasets.Dataset``s (memory-mapped Arrow), or
        ``IterableDataset``s when ``streaming``."""
        o = self.options
        with _quiet() as datasets:
            try:
                if self.kind == "disk":
                    self._check_folder(o.path)
                    loaded = datasets.load_from_disk(str(o.path))
                    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
                    return {k: v.to_iterable_dataset() for k, v in splits.items()} if streaming else splits
                if self.kind == "hub":
                    return self._open_hub(datasets, streaming)
                files = self._files()
                builder, kwargs = self._builder(files["train"])
                if "test" in files and self._builder(files["test"]) != (builder, kwargs):
                    raise DataError(f"{files['test'].name}: test_path is not in the format of {files['train'].name}; "
                                    f"convert one of them")
                loaded = datasets.load_dataset(builder, data_files={k: str(v) for k, v in files.items()}, streaming=streaming,
                                               cache_dir=None if streaming else str(plugtune_home() / "datasets"), **kwargs)
                return dict(loaded)
            except DataError:
                raise
            except Exception as exc:  # noqa: BLE001 - datasets/pyarrow/pandas errors on a bad file
                raise DataError(f"{self._where()}: cannot read with datasets ({type(exc).__name__}: {_one_line(exc)})") from None

    def _open_hub(self, datasets: Any, streaming: bool) -> dict[str, Any]:
        o = self.options
        try:
            if streaming and not _offline():
                return dict(datasets.load_dataset(o.path, o.config, streaming=True))
            loaded = datasets.load_dataset(o.path, o.config, cache_dir=str(hub_cache()))
        except (ConnectionError, FileNotFoundError, OSError, ValueError) as exc:
            raise self._hub_error(exc) from None
        splits = dict(loaded)
        return {k: v.to_iterable_dataset() for k, v in splits.items()} if streaming else splits

    def _split(self, splits: dict[str, Any], name: str, option: str) -> Any:
        if name not in splits:
            raise DataError(f"{option}: no split {name!r} in {self._where()} (splits: {', '.join(splits)})")
        return splits[name]

    def _test_split_name(self, names: list[str]) -> str | None:
        o = self.options
        if o.test_split is not None:
            return o.test_split
        if o.test_path is not None:
            return "test"
        return "test" if "test" in names and o.split != "test" else None

    # -- columns, cheaply ----------------------------------------------------------------

    def _split_names_and_columns(self) -> tuple[list[str], dict[str, list[str] | None]]:
        """The split names, and each split's columns where they can be had without reading
        rows (None: read them from the first rows)."""
        o = self.options
        if self.kind == "disk":
            self._check_folder(o.path)
            if (o.path / "dataset_dict.json").exists():
                names = list(_read_json(o.path / "dataset_dict.json").get("splits") or [])
                return names, {n: _features(o.path / n / "dataset_info.json") for n in names}
            return ["train"], {"train": _features(o.path / "dataset_info.json")}
        if self.kind == "hub":
            with _quiet() as datasets:
                try:
                    builder = datasets.load_dataset_builder(o.path, o.config, cache_dir=str(hub_cache()))
                except (ConnectionError, FileNotFoundError, OSError, ValueError) as exc:
                    raise self._hub_error(exc) from None
            features = list(builder.info.features) if builder.info.features else None
            names = list(builder.info.splits or {}) or [o.split]
            return names, {n: features for n in names}
        files = self._files()
        return list(files), {name: self._file_columns(path) for name, path in files.items()}

    def _file_columns(self, path: Path) -> list[str] | None:
        fmt = self._format(path)
        if path.suffix.lower() in COMPRESSION or fmt in {"csv", "tsv"}:
            return None  # CSV, compressed files: datasets reads the header or first block in streaming mode
        if fmt == "json":
            return _first_json_line(path)
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            with open_regular(path) as fh:
                if fmt == "parquet":
                    return list(pq.read_schema(fh).names)
                try:
                    return list(pa.ipc.open_stream(fh).schema.names)
                except pa.ArrowInvalid:
                    fh.seek(0)
                    return list(pa.ipc.open_file(fh).schema.names)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a file of another format
            raise DataError(f"{path}: cannot read as {fmt} ({type(exc).__name__}: {_one_line(exc)})") from None

    def _first_row_columns(self, name: str) -> list[str]:
        splits = self._open(streaming=True)
        dataset = splits[name]
        if dataset.features is not None:
            return list(dataset.features)
        with _quiet():
            try:
                first = next(iter(dataset), None)
            except Exception as exc:  # noqa: BLE001
                raise DataError(f"{self._where()}: cannot read with datasets ({type(exc).__name__}: {_one_line(exc)})") from None
        if first is None:
            raise DataError(f"{self._where()}: no rows in the {name} split")
        return list(first)

    def source_columns(self) -> list[str]:
        """The columns of the training split as the data names them (before ``columns``),
        checked against the test split's like table's; the splits named must exist."""
        o = self.options
        names, columns = self._split_names_and_columns()
        if o.split not in names:
            raise DataError(f"split: no split {o.split!r} in {self._where()} (splits: {', '.join(names)})")
        test = self._test_split_name(names)
        if test is not None and test not in names:
            raise DataError(f"test_split: no split {test!r} in {self._where()} (splits: {', '.join(names)})")
        found = columns[o.split] if columns[o.split] is not None else self._first_row_columns(o.split)
        if test is not None:
            test_columns = columns[test] if columns[test] is not None else self._first_row_columns(test)
            found = [n for n in found if n in test_columns]
        return found

    def columns(self) -> list[str]:
        o = self.options
        names = self.source_columns()
        missing = [src for src in o.columns.values() if src not in names]
        if missing:
            raise DataError(f"columns: {', '.join(map(repr, missing))} not in {self._where()} (columns: {', '.join(names)})")
        if self.row_filter is not None:
            unknown = sorted(self.row_filter.names - set(names))
            if unknown:
                raise DataError(f"filter: {', '.join(map(repr, unknown))} not a column of {self._where()} "
                                f"(columns: {', '.join(names)}); the filter names the data's own columns")
        inverse = {src: dst for dst, src in o.columns.items()}
        return [inverse.get(n, n) for n in names if n not in o.columns or n in inverse]

    # -- rows ----------------------------------------------------------------------------

    def _prepare(self, row: dict[str, Any]) -> dict[str, Any]:
        renames = {src: dst for dst, src in self.options.columns.items() if src != dst}
        dropped = {c for c in self.options.columns if c not in renames}  # shadowed by a renamed column
        return _rename(row, renames, dropped) if renames or dropped else row

    def _filter_error(self, exc: ExpressionError) -> DataError:
        return DataError(f"data.options.filter: {exc}; guard it, e.g. \"text is not None and ...\"")

    def _selected(self, dataset: Any) -> Any:
        if self.ranges is None:
            return dataset
        return dataset.select(list(range_indices(self.ranges, len(dataset))), keep_in_memory=True)

    def _filtered(self, dataset: Any) -> Any:
        if self.row_filter is None:
            return dataset
        try:
            return dataset.filter(self.row_filter, keep_in_memory=True)
        except ExpressionError as exc:
            raise self._filter_error(exc) from None

    def _stream_rows(self, dataset: Any, train: bool) -> Iterator[dict[str, Any]]:
        """A streamed split's rows as the data names them, ``select`` (training split) and
        ``filter`` applied."""
        if train and self.ranges is not None:
            selected, last = in_ranges(self.ranges)
            if len(self.ranges) == 1:  # one range: datasets' own skip/take
                start, stop = self.ranges[0]
                dataset = dataset.skip(start) if start else dataset
                dataset = dataset.take(stop - start) if stop is not None else dataset
            else:
                dataset = dataset.filter(lambda _row, i: selected(i), with_indices=True)
                if last is not None:
                    dataset = dataset.take(last)  # nothing after the last range
        if self.row_filter is not None:
            dataset = dataset.filter(self.row_filter)
        try:
            yield from dataset
        except ExpressionError as exc:
            raise self._filter_error(exc) from None
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bad line in the middle of a streamed file
            raise DataError(f"{self._where()}: cannot read with datasets ({type(exc).__name__}: {_one_line(exc)})") from None

    def load(self, seed: int) -> dict[str, Any]:
        with _quiet():
            return self._load_stream() if self.options.streaming else self._load_lists(seed)

    def _load_lists(self, seed: int) -> dict[str, list[dict[str, Any]]]:
        o = self.options
        splits = self._open(streaming=False)
        train = self._filtered(self._selected(self._split(splits, o.split, "split")))
        test_name = self._test_split_name(list(splits))
        if test_name is not None:
            test = self._filtered(self._split(splits, test_name, "test_split"))
        else:
            import numpy as np

            if len(train) < 2:
                raise DataError(f"{self._where()}: {len(train)} row(s) cannot be split into train and test"
                                f"{' (after select/filter)' if self.ranges or self.row_filter else ''}")
            order = np.random.default_rng(seed).permutation(len(train))  # table's (and train_test_split's) order
            n_test = math.ceil(o.test_size * len(train))
            train, test = (train.select(order[n_test:], keep_in_memory=True),
                           train.select(order[:n_test], keep_in_memory=True))
        out = {}
        for name, dataset in (("train", train), ("test", test)):
            if len(dataset) == 0:
                raise DataError(f"{self._where()}: no rows in the {name} split"
                                f"{' after select/filter' if self.ranges or self.row_filter else ''}")
            out[name] = [self._prepare(row) for row in dataset.to_list()]
        return out

    def _load_stream(self) -> dict[str, Any]:
        o = self.options
        splits = self._open(streaming=True)
        train = self._split(splits, o.split, "split")
        test_name = self._test_split_name(list(splits))
        if test_name is not None:
            rows, skip = self._stream_rows(self._split(splits, test_name, "test_split"), train=False), 0
        else:
            rows, skip = self._stream_rows(train, train=True), o.test_rows
        with _quiet():
            test = [self._prepare(row) for _, row in zip(range(o.test_rows), rows)]
        if not test:
            raise DataError(f"{self._where()}: no rows in the test split")
        if skip and len(test) < skip:
            raise DataError(f"{self._where()}: only {len(test)} row(s), all held out as test_rows ({o.test_rows}); "
                            f"lower data.options.test_rows or give a test split")
        return {"train": HfStream(train, self, skip), "test": test}


def _first_json_line(path: Path) -> list[str] | None:
    """The keys of a JSON Lines file's first non-blank line (None when it is not one JSON
    object, e.g. a JSON array over many lines: datasets then reads the start of the file)."""
    with open_regular(path) as fh:
        while True:
            line = fh.readline(MAX_INFO_BYTES)
            if not line:
                return None
            if line.strip():
                break
    try:
        record = json.loads(line.decode("utf-8-sig"))
    except (ValueError, RecursionError):
        return None
    return list(record) if isinstance(record, dict) else None


def _features(info: Path) -> list[str] | None:
    if not info.exists():
        return None
    features = _read_json(info).get("features")
    return list(features) if isinstance(features, dict) else None


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


@hookimpl
def register_data_loaders(register):
    register("hf", HfLoader)
