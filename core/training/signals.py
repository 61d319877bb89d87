"""Ctrl-C or SIGTERM during training: the first stops cleanly after the current step, the second at once.

:class:`StopRequest` replaces the SIGINT and SIGTERM handlers while the training loop runs.
SIGTERM is what ``docker stop``, systemd, ``timeout`` and batch schedulers send, so it is
treated like Ctrl-C. The first signal only sets :attr:`StopRequest.requested` (and says so on
stderr); the loop checks it after each optimizer step, saves a checkpoint and raises
:class:`Interrupted`, which the CLI turns into exit code 130 and a line saying how to resume.
A second signal (either kind) raises ``KeyboardInterrupt`` wherever the process is (exit 130,
"interrupted"); the last checkpoint on disk is still whole, because checkpoints are renamed
into place only when complete.

Outside the loop (loading, evaluating, saving) :func:`terminate_as_interrupt` makes SIGTERM
raise ``KeyboardInterrupt`` like Ctrl-C, so cleanup code runs (a half-written staging folder
is removed) instead of the process vanishing mid-write.

Outside the main thread (a run started from a worker thread) Python cannot install signal
handlers; there the default behaviour stays.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from typing_extensions import Self

from plugtune.kernel.errors import PlugtuneError


class Interrupted(PlugtuneError):
    """The user stopped training with Ctrl-C (or SIGTERM) and a checkpoint was saved."""

    exit_code = 130


def resume_command(recipe: Any, nproc: int = 1) -> str:
    """The command that resumes ``recipe``'s run; names the overrides when the recipe in
    memory is not the file as written (a resume must repeat them, or it is refused), and
    ``--nproc`` for a data-parallel run (each process restores its own RNG state)."""
    from plugtune.training.recipe import read_recipe_file

    processes = f" --nproc {nproc}" if nproc > 1 else ""
    if recipe.source is None:
        return f"plugtune run RECIPE --resume{processes}"
    command = f"plugtune run {recipe.source} --resume{processes}"
    try:
        overridden = read_recipe_file(recipe.source) != recipe.raw
    except PlugtuneError:
        overridden = True
    return command + (" with the same key=value overrides" if overridden else "")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager: SIGINT or SIGTERM sets a flag the first time, interrupts the second time."""

    def __init__(self, message: str = "stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)",
                 terminate_message: str = ("SIGTERM: stopping after this step and saving a checkpoint "
                                           "(a second SIGTERM or Ctrl-C stops at once)")) -> None:
        self.messages = {signal.SIGINT: message, signal.SIGTERM: terminate_message}
        self.requested = False
        self.signum: int | None = None  # the first signal received
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        print(self.messages[signal.Signals(signum)], file=sys.stderr, flush=True)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous = {}


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``KeyboardInterrupt`` as Ctrl-C does (only where
    the handler is still the default: a caller's own handler is left alone)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
