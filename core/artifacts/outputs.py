"""One output policy for every command that writes a folder (``run``, ``merge``, ``combine``).

    check_output(out, overwrite=False, inputs=[("the base model", base), ("adapter", a)])
    with staged_output(out, keep_extra=False) as staging:
        model.save_pretrained(staging)          # swapped in only if this block ends normally

The policy, checked before any work and again before the write:

* a path that is a regular file (or under one) is refused;
* an existing non-empty folder is refused without ``--overwrite``;
* the output may not be an input, lie inside one, or contain one: the base model's own
  folder, a parent adapter, the recipe's data files. Both sides are resolved first
  (symlinks, ``..``, aliases resolved by the caller), so no spelling gets around it;
* the write is atomic: everything goes into a hidden sibling ``.NAME.tmp-PID-*``, is fsynced
  and renamed into place; an existing folder is renamed aside to ``.NAME.old-PID`` first and
  removed after. SIGINT and SIGTERM are deferred during the two renames
  (:func:`deferred_signals`), and the leftovers of a process killed anyway (SIGKILL, power
  loss) are recovered by the next write of that folder (:func:`recover_interrupted_swap`):
  the previous folder is put back when nothing replaced it, stale staging folders are removed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from plugtune.kernel.errors import PlugtuneError


class OutputError(PlugtuneError):
    """An output path a write command may not use (exit 2, like a recipe's refused output.dir)."""

    exit_code = 2


Inputs = Sequence[tuple[str, "str | Path"]]


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def input_conflict(out: str | Path, inputs: Inputs) -> str | None:
    """Why ``out`` may not be written, given what the command reads, or None.

    ``out`` may not be an input, lie inside an input folder, or contain an input (an
    overwrite would replace the folder holding it)."""
    target = _resolved(out)
    for what, source in inputs:
        where = _resolved(source)
        if target == where:
            return f"{out} is {what} ({where}); write to another folder"
        if _inside(target, where):
            return f"{out} is inside {what} ({where}); write to another folder"
        if _inside(where, target):
            return f"{out} contains {what} ({where}); write to another folder"
    return None


def check_output(out: str | Path, *, overwrite: bool, inputs: Inputs = (), resume: bool = False,
                 occupied: Callable[[Path], str | None] | None = None,
                 error: Callable[[str], PlugtuneError] = OutputError,
                 hint: str = "pass --overwrite to replace it", note: Callable[[str], None] | None = None) -> None:
    """Refuse an output this command may not use, before anything is loaded or written; see
    the module docstring. Recovers an interrupted swap of ``out`` first and says what it did
    through ``note`` (default: one line each on stderr), before any refusal.

    ``occupied(path)`` may describe a non-empty folder better than the generic refusal (an
    interrupted run, say); ``error`` makes the exception (``run`` raises RecipeError lines
    starting ``output.dir:``); ``resume`` allows a non-empty folder (the run continues there)."""
    path = Path(out)
    for line in recover_interrupted_swap(path):
        (note or _to_stderr)(line)
    if path.exists() and not path.is_dir():
        raise error(f"{path} exists and is not a folder")
    conflict = input_conflict(path, inputs)
    if conflict:
        raise error(conflict)
    if not resume and not overwrite and path.is_dir() and any(path.iterdir()):
        raise error((occupied(path) if occupied else None) or f"{path} already exists and is not empty; {hint}")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise error(f"cannot write to {path} ({ancestor} is not a folder)")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def written_files(folder: str | Path) -> list[str]:
    """The files under ``folder`` (relative, sorted), for a report of what a command wrote."""
    root = Path(folder)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def describe_written(folder: str | Path) -> str:
    """``FOLDER (N files: a, b, c)``: what a command wrote, for its last line."""
    files = written_files(folder)
    return f"{folder} ({len(files)} file{'s' if len(files) != 1 else ''}: {', '.join(files)})"


# -- the atomic swap -----------------------------------------------------------------------------


def staging_prefix(target: Path) -> str:
    """Staging folders carry the writer's pid, so a later write can tell an abandoned one
    (its process is gone) from one another process is still filling."""
    return f".{target.name}.tmp-{os.getpid()}-"


def make_staging(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=staging_prefix(target)))


@contextmanager
def staged_output(target: str | Path, *, keep_extra: bool = False) -> Iterator[Path]:
    """A staging folder beside ``target``, swapped in when the block ends normally and
    removed whatever happens (an error, Ctrl-C, SIGTERM raised as KeyboardInterrupt)."""
    target = Path(target)
    staging = make_staging(target)
    try:
        yield staging
        fsync_tree(staging)
        replace_dir(staging, target, keep_extra=keep_extra)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and make it durable before returning."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` (written by a library that does not)."""
    for path in folder.rglob("*"):
        if path.is_file():
            _fsync_path(path)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    _fsync_path(path)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def old_path(target: Path) -> Path:
    return target.parent / f".{target.name}.old-{os.getpid()}"


def replace_dir(new: Path, target: Path, *, keep_extra: bool = False, kept: Sequence[str] = ()) -> None:
    """Put the folder ``new`` at ``target``, atomically, with signals deferred while the two
    renames run. ``keep_extra``: files already in ``target`` that ``new`` lacks, other than
    the names in ``kept``, are linked into ``new`` first (a run's metrics log beside its
    adapter); without it ``target`` is replaced as a whole (a model folder: a stale shard
    must not survive)."""
    if target.exists():
        if keep_extra:
            # Extra files are linked, not moved, so the previous folder stays whole until the swap.
            for item in target.iterdir():
                if not (new / item.name).exists() and item.name not in kept:
                    if item.is_dir():
                        shutil.copytree(item, new / item.name, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(item, new / item.name)
        old = old_path(target)
        with deferred_signals():
            target.rename(old)
            try:
                new.rename(target)
            except OSError:
                old.rename(target)  # put the previous folder back
                raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)
    fsync_dir(target.parent)


def _link_or_copy(source: str | Path, destination: str | Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not inside a swap of the folder while it checks it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted_swap(target: str | Path) -> list[str]:
    """Undo what a killed writer of ``target`` left beside it; returns one note per action.

    ``.NAME.old-PID`` is the previous folder, renamed aside: put back when ``target`` is
    missing (the new one never arrived), else deleted. ``.NAME.tmp-PID-*`` is an unfinished
    staging folder: deleted. Only leftovers of processes that are gone are touched (a name
    without a pid is from an older plugtune, whose writer is gone too)."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    notes: list[str] = []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(old|tmp)-(.*)$")
    for item in sorted(parent.iterdir()):
        match = pattern.match(item.name)
        if not match or not item.is_dir():
            continue
        pid = re.match(r"(\d+)(?:-|$)", match.group(2))
        if pid and _alive(int(pid.group(1))):
            continue
        if match.group(1) == "old" and not target.exists():
            item.rename(target)
            notes.append(f"{target}: put back the previous contents from {item.name} (a write was interrupted)")
        else:
            shutil.rmtree(item, ignore_errors=True)
            notes.append(f"{target}: removed {item.name}, left by an interrupted write")
    return notes


@contextmanager
def deferred_signals(signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs, then deliver them to the handlers that
    were in place: a signal cannot land between two renames that must happen together. Only
    the main thread can set handlers; elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous: dict[int, Any] = {s: signal.signal(s, hold) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)
