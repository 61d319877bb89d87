"""Ctrl-C during training: the first stops cleanly after the current step, the second at once.

:class:`StopRequest` replaces the SIGINT handler while the training loop runs. The first
SIGINT only sets :attr:`StopRequest.requested` (and says so on stderr); the loop checks it
after each optimizer step, saves a checkpoint and raises :class:`Interrupted`, which the CLI
turns into exit code 130 and a line saying how to resume. A second SIGINT raises
``KeyboardInterrupt`` wherever the process is (exit 130, "interrupted"); the last checkpoint
on disk is still whole, because checkpoints are renamed into place only when complete.

Outside the main thread (a run started from a worker thread) Python cannot install signal
handlers; there the default behaviour stays.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

from typing_extensions import Self

from plugtune.kernel.errors import PlugtuneError


class Interrupted(PlugtuneError):
    """The user stopped training with Ctrl-C and a checkpoint was saved."""

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


class StopRequest:
    """Context manager: SIGINT sets a flag the first time, interrupts the second time."""

    def __init__(self, message: str = "stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)") -> None:
        self.message = message
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(self.message, file=sys.stderr, flush=True)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
