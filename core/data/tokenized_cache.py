"""Tokenized splits cached across runs of the same recipe.

Tokenizing tens of thousands of rows takes longer than a short training run's first steps;
rerunning a recipe (a new learning rate, a new method) needs exactly the same token ids.
The encoded split is kept under ``$PLUGTUNE_HOME/tokenized/`` keyed by everything the ids
depend on: the data's content (not its path), the tokenizer (its full serialised form and
special tokens), the task (templates, label words, labels), ``max_length``,
``training.overlong`` and the split's name. Changing any of them misses the cache; nothing is
ever invalidated by time. The entry is the whole outcome of encoding the split
(core/datacheck.py's ``PreparedSplit``: the rows, the truncated and dropped counts, or the
refusal), so a hit prints and refuses exactly as the first run did, without tokenizing.

Serialising and hashing the tokenizer is the key's costliest part: a run computes
:func:`tokenizer_fingerprint` once and passes it to every split's :func:`cached_encode`.

**Nothing in the cache can run code.** An entry is one safetensors file,
``<key>.safetensors``: per encoded column (``input_ids``, ``labels``, ...) the ids of every
row end to end (int64) and each row's offsets, the index of each row's example in the
split's rows (the examples themselves are not stored: the key already pins their content,
so a hit points back into the caller's rows), and a JSON header in the file's metadata (the
version, the key, the counts, the refusal). safetensors' parser checks the header against the
bytes; this module checks dtypes, shapes, offsets and indexes. Anything else at the entry's
path (truncated, a pickle, another version, a folder, a FIFO, wrong shapes) is a miss with
one note (``tokenized cache entry KEY.safetensors unreadable (...); tokenizing again``) and
is replaced. An outcome the format cannot hold exactly (a task whose encodings are not lists
of ints) is simply not cached.

Measured on 5,000 encoded rows (550k tokens, 2 shared cores, best of 7):
loading a pickle took 123 ms; JSON 113 ms plus 94 ms to check its types with
pydantic; this format 115 ms, types and shapes checked, rows rebuilt. Writing one (only on a
miss, after tokenizing) takes 165 ms against pickle's 29 ms; the file is about twice the
pickle's size (int64 ids).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plugtune.data.datacheck import PreparedSplit
from plugtune.data.tasks import Task
from plugtune.kernel.paths import plugtune_home

CACHE_VERSION = 3  # bump when the entry's format changes (2: the overlong outcome; 3: safetensors, not pickle)
ENTRY_SUFFIX = ".safetensors"
FORMAT = "plugtune-tokenized"
EXAMPLE_INDEX = "example_index"  # the tensor holding each row's position in the split's rows
OFFSETS = ".offsets"  # suffix of a column's row offsets tensor


class Unreadable(Exception):
    """An entry that is not a whole, current cache entry for this key: a miss."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides token ids: the tokenizer's serialised pipeline (vocabulary,
    merges, normalisers, added tokens) and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps({"class": type(tokenizer).__name__, **{k: str(v) for k, v in tokenizer.special_tokens_map.items()},
                           "eos_id": tokenizer.eos_token_id, "bos_id": tokenizer.bos_token_id}, sort_keys=True)
    return hashlib.sha256((body + specials).encode()).hexdigest()


def data_fingerprint(rows: list[dict[str, Any]]) -> str:
    """A hash of the rows' content, in order."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def cache_key(rows: list[dict[str, Any]], task: Task, fingerprint: str, max_length: int, split: str,
              overlong: str = "truncate") -> str:
    """The cache key of one encoded split; ``fingerprint`` is :func:`tokenizer_fingerprint`'s."""
    parts = {
        "version": CACHE_VERSION,
        "data": data_fingerprint(rows),
        "tokenizer": fingerprint,
        "task": task.to_dict(),
        "max_length": max_length,
        "overlong": overlong,
        "split": split,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_dir() -> Path:
    return plugtune_home() / "tokenized"


def entry_path(key: str) -> Path:
    """Where the entry of ``key`` lives."""
    return cache_dir() / f"{key}{ENTRY_SUFFIX}"


def _columns(prepared: PreparedSplit, examples: list[dict[str, Any]]) -> tuple[list[str], list[int]] | None:
    """The encoded columns every row shares (in the rows' key order) and each row's position
    in ``examples``; None when the rows do not fit the format (differing keys, an example
    that is not one of ``examples``)."""
    position = {id(row): i for i, row in enumerate(examples)}
    columns = [k for k in prepared.rows[0] if k != "example"] if prepared.rows else []
    index = []
    for row in prepared.rows:
        if [k for k in row if k != "example"] != columns or id(row.get("example")) not in position:
            return None
        index.append(position[id(row["example"])])
    return columns, index


def encode_entry(prepared: PreparedSplit, examples: list[dict[str, Any]], key: str) -> bytes | None:
    """``prepared`` as the bytes of a cache entry, or None when the format cannot hold it
    exactly (it is then not cached): rows whose encodings are not lists of ints, or whose
    examples are not the split's own rows."""
    import numpy as np
    from safetensors.numpy import save

    layout = _columns(prepared, examples)
    if layout is None:
        return None
    columns, index = layout
    if prepared.rows and not columns:
        return None
    tensors = {EXAMPLE_INDEX: np.asarray(index, dtype=np.int64).reshape(-1)}
    try:
        for column in columns:
            values = [row[column] for row in prepared.rows]
            if not all(type(v) is list and all(type(x) is int for x in v) for v in values):
                return None
            tensors[column] = np.fromiter((x for v in values for x in v), dtype=np.int64)
            tensors[column + OFFSETS] = np.cumsum([0, *map(len, values)], dtype=np.int64)
    except OverflowError:  # an int outside int64
        return None
    header = {"format": FORMAT, "version": CACHE_VERSION, "key": key, "rows": len(prepared.rows), "columns": columns,
              "cut": prepared.cut, "dropped": prepared.dropped, "error": prepared.error}
    return save(tensors, metadata={"plugtune": json.dumps(header)})


def _header(metadata: dict[str, str] | None, key: str) -> dict[str, Any]:
    """The entry's JSON header, checked: this format, this version, this key, sane fields."""
    try:
        header = json.loads((metadata or {})["plugtune"])
    except (KeyError, TypeError, ValueError, RecursionError):
        raise Unreadable("no plugtune header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise Unreadable("not a plugtune tokenized entry")
    if header.get("version") != CACHE_VERSION:
        raise Unreadable(f"version {header.get('version')!r}, not {CACHE_VERSION}")
    if header.get("key") != key:
        raise Unreadable("made for another key")
    counts = [header.get(f) for f in ("rows", "cut", "dropped")]
    columns = header.get("columns")
    if (not all(type(n) is int and n >= 0 for n in counts) or not isinstance(columns, list)
            or not all(isinstance(c, str) and c != "example" for c in columns) or len(set(columns)) != len(columns)
            or not isinstance(header.get("error"), (str, type(None)))):
        raise Unreadable("a malformed header")
    return header


def decode_entry(path: Path, examples: list[dict[str, Any]], key: str) -> PreparedSplit:
    """The :class:`PreparedSplit` an entry holds, its rows pointing into ``examples``; raises
    :class:`Unreadable` for anything but a whole entry of this version and key. Only a
    regular file is opened (a FIFO planted at the path would block the read)."""
    import numpy as np
    from safetensors import safe_open

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise Unreadable("not a regular file")
        with safe_open(str(path), framework="np") as fh:
            header = _header(fh.metadata(), key)
            names = set(fh.keys())
            columns, n = header["columns"], header["rows"]
            if names != {EXAMPLE_INDEX, *columns, *(c + OFFSETS for c in columns)}:
                raise Unreadable("unexpected tensors")
            tensors = {name: fh.get_tensor(name) for name in names}
    except Unreadable:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors' errors for bytes that are not an entry
        raise Unreadable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if any(t.dtype != np.int64 or t.ndim != 1 for t in tensors.values()):
        raise Unreadable("wrong dtypes or shapes")
    index = tensors[EXAMPLE_INDEX]
    if n and not columns:
        raise Unreadable("rows without encoded columns")
    if len(index) != n or (n and (index.min() < 0 or index.max() >= len(examples))):
        raise Unreadable("example indexes that do not fit the split")
    values: dict[str, list[list[int]]] = {}
    for column in columns:
        flat, offsets = tensors[column], tensors[column + OFFSETS]
        if len(offsets) != n + 1 or offsets[0] != 0 or offsets[-1] != len(flat) or (np.diff(offsets) < 0).any():
            raise Unreadable(f"{column}: offsets that do not fit its ids")
        ids, bounds = flat.tolist(), offsets.tolist()
        values[column] = [ids[a:b] for a, b in zip(bounds, bounds[1:])]
    rows = [dict(zip(columns, ids), example=examples[e]) for ids, e in zip(zip(*(values[c] for c in columns)), index.tolist())]
    return PreparedSplit(rows, header["cut"], header["dropped"], header["error"])


def _write(path: Path, data: bytes) -> None:
    """Write an entry atomically (a rename), so concurrent runs and the processes of a
    data-parallel run can share the cache; a planted file, link or FIFO at the path is
    replaced, never written through. A read-only home: the run goes on without caching."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False, suffix=".tmp") as fh:
            fh.write(data)
        try:
            os.replace(fh.name, path)
        except OSError:
            os.unlink(fh.name)  # a folder planted at the path: leave no temporary file behind
            raise
    except OSError:
        pass


def _stderr_note(message: str) -> None:
    print(message, file=sys.stderr)


def cached_encode(rows: list[dict[str, Any]], task: Task, tokenizer: Any, max_length: int, split: str,
                  encode: Callable[[], PreparedSplit], *, fingerprint: str | None = None, overlong: str = "truncate",
                  enabled: bool = True, note: Callable[[str], Any] = _stderr_note) -> tuple[PreparedSplit, bool]:
    """``encode()``'s result for this split, from the cache when the key matches; returns it
    and whether it was a hit. ``fingerprint``: the tokenizer's, when the caller computed it
    once for all its splits (otherwise it is computed here); ``overlong``: the
    ``training.overlong`` policy ``encode()`` applies. A damaged or foreign entry is a miss:
    ``note`` gets one line saying so, and the fresh entry replaces it."""
    if not enabled:
        return encode(), False
    fingerprint = fingerprint if fingerprint is not None else tokenizer_fingerprint(tokenizer)
    key = cache_key(rows, task, fingerprint, max_length, split, overlong)
    path = entry_path(key)
    if os.path.lexists(path):
        try:
            return decode_entry(path, rows, key), True
        except Unreadable as exc:
            note(f"tokenized cache entry {path.name} unreadable ({exc}); tokenizing again")
    result = encode()
    data = encode_entry(result, rows, key)
    if data is not None:
        _write(path, data)
    return result, False
