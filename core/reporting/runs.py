"""Reading run and adapter folders for ``plugtune report``: what a folder holds, typed.

A run folder (``plugtune run``'s output) holds ``metrics.jsonl``; a finished one is also an
adapter folder with ``plugtune.json`` (its manifest). Either is enough: an adapter copied
without its log reports its manifest's before/after metrics, a run that stopped before
saving reports its log. The log's record shapes are in core/training/metrics_log.py.

Hostile folders are handled here, once: a path that is no folder or holds neither file is
one error line; a log that is a link out of its folder, no regular file, or larger than
:data:`MAX_LOG_BYTES` is not read past the limit; unreadable lines (truncated, not JSON,
no object) are skipped with one warning per file; values that are not finite numbers are
dropped by :func:`points`. Two runs with the same name are told apart by their folders.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plugtune.artifacts.adapters import MANIFEST_FILE, Manifest, read_manifest
from plugtune.kernel.errors import PlugtuneError

LOG_FILE = "metrics.jsonl"
PREVIOUS_LOG = "metrics.previous.jsonl"  # an adapter's own log while an --overwrite run has not replaced it
MAX_LOG_BYTES = 256 * 1024 * 1024  # a million steps' records fit in well under this
MAX_LINE_BYTES = 1024 * 1024  # a record is a few hundred bytes; a longer line is no record


class ReportError(PlugtuneError):
    """A folder or output ``plugtune report`` cannot use."""


@dataclass
class Run:
    """One folder's records, split by event, in log order."""

    folder: Path
    name: str
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)  # "eval" records, and "best" as a test evaluation
    data: dict[str, Any] | None = None
    manifest: Manifest | None = None
    warnings: list[str] = field(default_factory=list)

    def eval_splits(self) -> list[str]:
        return sorted({str(r.get("split", "test")) for r in self.evals})


def read_runs(folders: list[str | Path]) -> list[Run]:
    """Every folder read (:func:`read_run`), names made unique."""
    resolved = [Path(f).resolve() for f in folders]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise ReportError(f"{folders[i]}: given twice (the same folder as {folders[resolved.index(path)]}); give each run once")
    runs = [read_run(f) for f in folders]
    _unique_names(runs)
    return runs


def read_run(folder: str | Path) -> Run:
    """The records of the run or adapter in ``folder``."""
    path = Path(folder)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise ReportError(f"{folder} {what}; give a run or adapter folder (one holding {LOG_FILE} or {MANIFEST_FILE})")
    log = path / LOG_FILE
    if not log.exists() and (path / PREVIOUS_LOG).exists():
        log = path / PREVIOUS_LOG
    has_manifest = (path / MANIFEST_FILE).exists()
    if not log.exists() and not has_manifest:
        raise ReportError(f"{folder} is neither a run nor an adapter folder: it holds no {LOG_FILE} or {MANIFEST_FILE} "
                          f"(give the output.dir of a 'plugtune run')")
    manifest = read_manifest(path) if has_manifest else None  # a broken manifest: read_manifest's one line
    run = Run(path, name=_run_name(path, manifest), manifest=manifest)
    if log.exists():
        _read_log(run, log)
    return run


def _run_name(folder: Path, manifest: Manifest | None) -> str:
    name = manifest.name if manifest is not None and manifest.name else ""
    return name or folder.resolve().name or str(folder)


def _unique_names(runs: list[Run]) -> None:
    """Runs sharing a name are named ``name (folder)``, the folder as short as tells them apart."""
    by_name: dict[str, list[Run]] = {}
    for run in runs:
        by_name.setdefault(run.name, []).append(run)
    for name, same in by_name.items():
        if len(same) < 2:
            continue
        parts = [r.folder.resolve().parts for r in same]
        depth = 1
        while depth < max(len(p) for p in parts) and len({p[-depth:] for p in parts}) < len(parts):
            depth += 1
        for run, p in zip(same, parts):
            run.name = f"{name} ({os.path.join(*p[-depth:])})"


def _read_log(run: Run, log: Path) -> None:
    reason = _unreadable(run.folder, log)
    if reason:
        run.warnings.append(f"{log}: {reason}; not read")
        return
    bad, first_bad = 0, 0
    for number, record in _records(log, run):
        if record is None:
            bad += 1
            first_bad = first_bad or number
            continue
        event = record.get("event")
        if event == "train":
            run.train.append(record)
        elif event == "eval":
            run.evals.append(record)
        elif event == "best":  # the weights kept: the run's final test evaluation
            run.evals.append({**record, "split": "test", "when": "best"})
        elif event == "data" and run.data is None:
            run.data = record
    if bad:
        run.warnings.append(f"{log}: skipped {bad} unreadable line{'s' if bad > 1 else ''} (first: line {first_bad}); "
                            f"reporting the rest")


def _unreadable(folder: Path, log: Path) -> str | None:
    """Why the log is not read at all, or None."""
    if log.is_symlink() and not log.resolve().is_relative_to(folder.resolve()):
        return f"a link out of the folder (to {log.resolve()})"
    if not log.is_file():
        return "not a regular file"
    if not os.access(log, os.R_OK):
        return "not readable"
    return None


def _records(log: Path, run: Run) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """``(line number, record)`` for every non-blank line, the record None when the line is
    no JSON object; stops (with a warning) after :data:`MAX_LOG_BYTES`."""
    read = 0
    with open(log, "rb") as fh:
        for number, (line, size) in enumerate(_lines(fh), start=1):
            read += size
            if read > MAX_LOG_BYTES:
                run.warnings.append(f"{log}: larger than {MAX_LOG_BYTES >> 20} MiB; reporting its first {MAX_LOG_BYTES >> 20} MiB")
                return
            if line.strip():
                yield number, _parse(line) if size <= MAX_LINE_BYTES else None


def _lines(fh: Any) -> Iterator[tuple[bytes, int]]:
    """``(line, its size)``: a line longer than :data:`MAX_LINE_BYTES` comes back cut there
    (its size the whole line's), read past in bounded pieces."""
    while True:
        line = fh.readline(MAX_LINE_BYTES)
        if not line:
            return
        size, rest = len(line), line
        while len(rest) == MAX_LINE_BYTES and not rest.endswith(b"\n"):
            rest = fh.readline(MAX_LINE_BYTES)
            size += len(rest)
        yield line, size


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def points(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """The ``(steps, values)`` of ``key`` over ``records``: those with an integer step and a
    finite value (NaN, inf, strings and gaps skipped)."""
    steps, values = [], []
    for record in records:
        step, value = record.get("step"), finite(record.get(key))
        if isinstance(step, int) and not isinstance(step, bool) and value is not None:
            steps.append(step)
            values.append(value)
    return steps, values
