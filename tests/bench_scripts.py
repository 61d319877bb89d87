"""The bench/ scripts, imported by the tests the way the scripts import each other: with bench/
on ``sys.path`` while they load (and only then), so a test reads the benchmark's own code."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_modules(*names: str) -> tuple[ModuleType, ...]:
    """``bench/<name>.py`` for each name, imported (once per process, like any module)."""
    sys.path.insert(0, str(BENCH))
    try:
        return tuple(importlib.import_module(name) for name in names)
    finally:
        sys.path.remove(str(BENCH))
