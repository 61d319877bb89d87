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
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from plugtune.kernel.paths import plugtune_home
from plugtune.data.tasks import Task

CACHE_VERSION = 2  # bump when the entry's format changes (2: the overlong outcome, in the key and the entry)
Encoded = TypeVar("Encoded")  # what the caller's encode() returns: a PreparedSplit in a run


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


def cached_encode(rows: list[dict[str, Any]], task: Task, tokenizer: Any, max_length: int, split: str,
                  encode: Callable[[], Encoded], *, fingerprint: str | None = None, overlong: str = "truncate",
                  enabled: bool = True) -> tuple[Encoded, bool]:
    """``encode()``'s result for this split, from the cache when the key matches; returns it
    and whether it was a hit. ``fingerprint``: the tokenizer's, when the caller computed it
    once for all its splits (otherwise it is computed here); ``overlong``: the
    ``training.overlong`` policy ``encode()`` applies. Writes are atomic (a rename), so
    concurrent runs and the processes of a data-parallel run can share the cache."""
    if not enabled:
        return encode(), False
    fingerprint = fingerprint if fingerprint is not None else tokenizer_fingerprint(tokenizer)
    path = cache_dir() / f"{cache_key(rows, task, fingerprint, max_length, split, overlong)}.pkl"
    if path.exists():
        try:
            with open(path, "rb") as fh:
                return pickle.load(fh), True
        except (OSError, pickle.UnpicklingError, EOFError):
            pass  # a damaged entry: encode again and overwrite it
    result = encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False, suffix=".tmp") as fh:
            pickle.dump(result, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(fh.name, path)
    except OSError:
        pass  # a read-only home: the run goes on without caching
    return result, False
