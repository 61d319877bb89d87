"""``AdapterCache``: adapters loaded on first use from a root folder, a bounded resident set
with least-recently-used eviction (as LoRAX does).

    host = AdapterHost.from_base("smollm2-135m", task)
    cache = AdapterCache(host, "adapters", max_adapters=8)
    cache.ensure("support")            # loads adapters/support unless it is resident
    host.generate(prompts, adapters=["support", None])

``plugtune serve a b --adapters-root R --max-adapters 8`` holds one: a request naming a folder
under ``R`` loads it; ``a`` and ``b`` (named on the command line) are pinned.

Names are folder names directly under the root, safe ones only (:data:`ADAPTER_NAME`). A folder
is resolved (symlinks included) and refused unless it, and every file in it, lies inside the
root (:func:`adapter_folder`, the same rule as ``POST /v1/adapters``).

Pinned adapters are never evicted: those named in ``pinned`` and every adapter the host held
already, or was given later, by someone other than the cache (it only unloads what it loaded).
``max_adapters`` counts them all. An adapter in use (rows running on it, the host's active or
merged one) is never evicted either. The new adapter is attached before the evicted ones are
unloaded, so that a load that fails (an adapter for another base) evicts nothing: for that
moment the host holds one more than ``max_adapters``.

Threads: :meth:`ensure` attaches to the model, so it runs where the model runs (a server's
model thread, between decode steps); :meth:`available`, :meth:`resident`, :meth:`ready` and
:meth:`prefetch` may be called from any thread. :meth:`prefetch` reads an adapter's files
(manifest, safetensors, hashes checked) on a background thread, so that the following
:meth:`ensure` only attaches: a load then never holds the model thread for a file read.
"""

from __future__ import annotations

import collections
import difflib
import errno
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from plugtune.artifacts.adapters import MANIFEST_FILE, Adapter, read_adapter
from plugtune.kernel.errors import AdapterError

if TYPE_CHECKING:
    from plugtune.serving.host import AdapterHost

log = logging.getLogger("plugtune.serving.cache")

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Names an adapter may be loaded under by request: no slashes, no leading dot, at most 64."""
MAX_ADAPTER_FILES = 1000
"""Most entries an adapter folder loaded by request may hold (each is resolved and checked)."""
ROOT_FIX = "use another adapters root (--adapters-root)"
"""The way out :func:`adapter_folder`'s messages suggest, unless told another."""


READS_HELD = 64
"""Prefetched reads kept for requests that have not joined yet (more when ``max_adapters`` is
large); the oldest is dropped past it, and its request then reads on joining."""


class AdapterPathError(AdapterError):
    """An adapter name or path that does not lead to a folder inside the root. ``status``: the
    HTTP status a server answers with (400 malformed, 403 outside the root, 404 not there)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class CacheFullError(AdapterError):
    """No room: every resident adapter is pinned or in use. ``status`` 503: retry later."""

    status = 503


def _done(result: Adapter | None) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def adapter_folder(root: Path, path: str | Path, *, fix: str = ROOT_FIX,
                   who: str = "adapters loaded by request") -> Path:
    """``path`` (relative to ``root``, or absolute) resolved, refused with an
    :class:`AdapterPathError` unless it is a folder inside ``root`` (itself resolved) whose
    every entry (files, folders, symlinks, at any depth), resolved, lies inside ``root`` too:
    a folder inside it whose files link elsewhere is refused, as the folder itself would be.
    At most :data:`MAX_ADAPTER_FILES` entries are looked at. ``fix`` and ``who`` word the
    messages (a server: ``"restart the server with another --adapters-root"``)."""
    given = Path(path)
    try:
        full = (given if given.is_absolute() else root / given).resolve()
    except (OSError, ValueError) as exc:  # a NUL byte, a symlink loop
        raise AdapterPathError(_one_line(f"adapter path {str(path)!r} cannot be resolved ({exc})"), 400) from None
    if full != root and not full.is_relative_to(root):
        raise AdapterPathError(f"adapter path {str(path)!r} is outside the adapters root {root}; "
                               f"put the adapter under it or {fix}", 403)
    try:  # one stat: is_dir() lets some errors through (a name too long for the file system)
        is_dir = stat.S_ISDIR(full.stat().st_mode)
    except OSError as exc:
        is_dir, why = False, f" ({exc.strerror})" if exc.errno != errno.ENOENT else ""
    else:
        why = ""
    if not is_dir:
        raise AdapterPathError(f"no adapter folder at {str(path)!r} under {root}{why}", 404)
    seen = 0
    for top, dirs, files in os.walk(full, followlinks=True):  # linked folders too; the cap ends any loop
        for entry in (*dirs, *files):
            seen += 1
            if seen > MAX_ADAPTER_FILES:
                raise AdapterPathError(f"adapter folder {str(path)!r} holds more than {MAX_ADAPTER_FILES} entries; "
                                       "an adapter is a few files", 400)
            link = Path(top, entry)
            try:
                target = link.resolve(strict=True)
            except (OSError, RuntimeError):  # dangling, a loop, unreadable
                raise AdapterPathError(f"adapter path {str(path)!r}: {link.relative_to(full)} cannot be resolved "
                                       f"(a dangling or looping link); {who} must lie whole inside the adapters "
                                       f"root {root}", 403) from None
            if not target.is_relative_to(root):
                raise AdapterPathError(f"adapter path {str(path)!r}: {link.relative_to(full)} links outside the "
                                       f"adapters root {root}; copy the file into the adapter folder or {fix}", 403)
    return full


class AdapterCache:
    """Adapters under ``root`` loaded into ``host`` on first use, at most ``max_adapters``
    resident (``None``: no bound), least recently used evicted first; ``pinned`` names are
    loaded now (unless the host holds them) and never evicted. ``allow_pickle``: as in
    :meth:`AdapterHost.load`. ``loads`` and ``evictions`` count what the cache did; listeners
    given to :meth:`on_event` hear each as it happens."""

    def __init__(self, host: AdapterHost, root: str | Path, *, max_adapters: int | None = None,
                 pinned: Iterable[str] = (), allow_pickle: bool = False) -> None:
        if max_adapters is not None and max_adapters < 1:
            raise AdapterError(f"--max-adapters must be at least 1 (got {max_adapters})")
        self.host = host
        self.root = Path(root).resolve()
        self.max_adapters = max_adapters
        self.allow_pickle = allow_pickle
        self.loads = 0
        self.evictions = 0
        self._lock = threading.Lock()  # the state below, shared with other threads
        self._ensuring = threading.Lock()  # one ensure() at a time
        self._order: collections.OrderedDict[str, None] = collections.OrderedDict.fromkeys(host.adapters)  # LRU first
        self._loaded: set[str] = set()  # what this cache loaded: the only adapters it may evict
        self._reads: collections.OrderedDict[str, Future] = collections.OrderedDict()  # prefetched, oldest first
        self._listeners: list[Callable[[str, str], None]] = []
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="plugtune-adapter-read")
        pinned = list(dict.fromkeys(pinned))
        held = list(dict.fromkeys([*host.adapters, *pinned]))
        if max_adapters is not None and len(held) > max_adapters:
            raise AdapterError(f"{len(held)} adapters are pinned ({', '.join(held[:8])}{', ...' if len(held) > 8 else ''}) "
                               f"but --max-adapters is {max_adapters}; raise it to at least {len(held)} or name fewer")
        self._pinned = set(pinned)
        for name in pinned:
            if name not in host.adapters:
                self.ensure(name)

    # -- what there is ------------------------------------------------------------------------

    def available(self) -> list[str]:
        """The adapter folders under the root (a folder holding a manifest, under a safe name,
        not a link out of the root), sorted."""
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError:
            return []
        names = []
        for entry in entries:
            if not ADAPTER_NAME.fullmatch(entry.name):
                continue
            try:
                folder = Path(entry.path).resolve()
                if folder.is_relative_to(self.root) and (folder / MANIFEST_FILE).is_file():
                    names.append(entry.name)
            except (OSError, RuntimeError):
                continue
        return names

    def resident(self) -> list[str]:
        """The adapters the host holds, least recently used first."""
        with self._lock:
            self._sync()
            return list(self._order)

    @property
    def pinned(self) -> list[str]:
        """The adapters that are never evicted: named at start, or loaded outside the cache."""
        with self._lock:
            self._sync()
            return sorted(set(self._pinned) | {n for n in self._order if n not in self._loaded})

    def ready(self, name: str) -> bool:
        """Whether :meth:`ensure` of ``name`` would read no file: it is resident, or its
        prefetched read has finished (successfully or not)."""
        with self._lock:
            read = self._reads.get(name)
            return name in self.host.adapters or (read is not None and read.done())

    def reading(self, name: str) -> bool:
        """Whether a prefetched read of ``name`` is still under way (its request can wait a
        step for it rather than read on the model thread)."""
        with self._lock:
            read = self._reads.get(name)
            return read is not None and not read.done()

    def on_event(self, fn: Callable[[str, str], None]) -> None:
        """Call ``fn(kind, name)`` after each load (``"load"``) and eviction (``"evict"``),
        on the thread that called :meth:`ensure`; an exception it raises is logged."""
        self._listeners.append(fn)

    # -- loading ------------------------------------------------------------------------------

    def prefetch(self, name: str) -> Future:
        """Read adapter ``name``'s files on a background thread; the future's result is the
        read :class:`~plugtune.artifacts.adapters.Adapter` (``None`` when it is resident), or
        the :class:`AdapterError` that :meth:`ensure` would raise for it. The next
        :meth:`ensure` of ``name`` uses the read. Calling it again while a read is pending or
        held returns the same future."""
        with self._lock:
            if name in self.host.adapters:
                return _done(None)
            read = self._reads.get(name)
            if read is None or (read.done() and read.exception() is not None):
                read = self._reads[name] = self._pool.submit(self._read, name)
            self._reads.move_to_end(name)
            while len(self._reads) > max(READS_HELD, 4 * (self.max_adapters or 0)):  # reads nobody came for
                self._reads.popitem(last=False)
            return read

    def ensure(self, name: str, in_use: Collection[str] = ()) -> str:
        """Make adapter ``name`` resident and return its name: touched when it is, otherwise
        read (or its prefetched read taken), attached, and then as many least recently used
        adapters evicted as make room, never a pinned one, one in ``in_use`` or the host's
        active or merged one. Raises :class:`CacheFullError` when none may go, and
        :class:`AdapterPathError` for a name that is not an adapter folder under the root
        (naming the closest available ones); a load that fails evicts nothing."""
        with self._ensuring:
            with self._lock:
                self._sync()
                if name in self._order:
                    self._order.move_to_end(name)
                    return name
                read = self._reads.pop(name, None)
            adapter = read.result() if read is not None else self._read(name)
            try:
                victims = self._victims(name, in_use)
            except CacheFullError:  # keep the read for the retry
                with self._lock:
                    self._reads[name] = read if read is not None else _done(adapter)
                raise
            self.host.attach(adapter, name)
            gone = []
            for victim in victims:
                if victim in self.host.adapters:
                    self.host.unload(victim)
                    gone.append(victim)
            with self._lock:
                for victim in gone:
                    self._order.pop(victim, None)
                    self._loaded.discard(victim)
                self._order[name] = None
                self._loaded.add(name)
                self.loads += 1
                self.evictions += len(gone)
        for victim in gone:
            self._emit("evict", victim)
        self._emit("load", name)
        return name

    def close(self) -> None:
        """Stop the reading threads (reads not started are dropped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- inside -------------------------------------------------------------------------------

    def _sync(self) -> None:
        """Follow the host's own loads and unloads (under ``_lock``): an adapter it unloaded
        leaves the order, one loaded by someone else joins it (and is never evicted)."""
        held = list(self.host.adapters)  # one C-level copy: safe while the model thread attaches
        for name in [n for n in self._order if n not in held]:
            del self._order[name]
            self._loaded.discard(name)
        for name in held:
            if name not in self._order:
                self._order[name] = None

    def _victims(self, name: str, in_use: Collection[str]) -> list[str]:
        """The least recently used adapters to unload so that ``name`` fits."""
        if self.max_adapters is None:
            return []
        with self._lock:
            excess = len(self._order) + 1 - self.max_adapters
            if excess <= 0:
                return []
            busy = {*in_use, self.host.active, self.host.merged}
            victims = [n for n in self._order if n in self._loaded and n not in self._pinned and n not in busy][:excess]
            if len(victims) < excess:
                raise CacheFullError(
                    f"cannot load adapter {name!r}: all {len(self._order)} resident adapters are pinned or in use "
                    f"(--max-adapters {self.max_adapters}); retry when running requests finish, or raise --max-adapters")
            return victims

    def _read(self, name: str) -> Adapter:
        """Adapter ``name``'s files, read and checked (any thread)."""
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise AdapterPathError(f"{str(name)[:80]!r} is not an adapter name: adapters under {self.root} are named "
                                   "by their folder (letters, digits, '.', '_' or '-', at most 64, not starting "
                                   "with '.' or '-')", 400)
        try:
            folder = adapter_folder(self.root, name)
        except AdapterPathError as exc:
            if exc.status != 404:
                raise
            raise AdapterPathError(self._unknown(name), 404) from None
        adapter = read_adapter(folder, allow_pickle=self.allow_pickle)
        adapter.size_bytes  # noqa: B018 - stat the file here, not on the model thread
        return adapter

    def _unknown(self, name: str) -> str:
        names = self.available()
        if not names:
            return f"no adapter {name!r} under {self.root} (it holds no adapter folders)"
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return f"no adapter {name!r} under {self.root}{hint} (available: {shown})"

    def _emit(self, kind: str, name: str) -> None:
        for fn in list(self._listeners):
            try:
                fn(kind, name)
            except Exception:  # a listener (metrics) must not break loading
                log.exception("adapter cache listener %r failed on %s %s", fn, kind, name)
