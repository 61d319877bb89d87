"""What this machine's CPU offers, read at run time, and a precision chosen by measurement.

CPUs of one machine kind differ (some AVX2-only, some with AVX-512 BF16 or AMX), so nothing
here is assumed: :func:`cpu_flags` reads the flags the kernel reports, and
:func:`choose_cpu_dtype` times the matrix products a model of the given shapes runs, in fp32
and in bf16, and keeps bf16 only when the CPU has native bf16 instructions *and* the probe
shows it faster by a margin. On a CPU without them bf16 is emulated and slower, and is never
chosen.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags that mean native bf16 matrix instructions."""
BF16_MARGIN = 1.15
"""bf16 is kept only when the probe runs at least this much faster than fp32."""


def _cpuinfo(field: str) -> str:
    """The first ``field`` line of /proc/cpuinfo, its value; "" where Linux does not report it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where it does not)."""
    return frozenset(_cpuinfo("flags").split())


def cpu_name() -> str:
    """The CPU's model name as Linux reports it (for benchmark records), else the platform's."""
    import platform

    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown"


def native_bf16() -> bool:
    """Whether the CPU has bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


@dataclass(frozen=True)
class PrecisionChoice:
    """The dtype chosen and why (printed at start-up and shown in ``/health``)."""

    dtype: torch.dtype
    reason: str
    fp32_ms: float | None = None
    bf16_ms: float | None = None


def _time_matmuls(dtype: torch.dtype, rows: int, shapes: list[tuple[int, int]], repeats: int) -> float:
    weights = [torch.randn(n_in, n_out, dtype=dtype) for n_in, n_out in shapes]
    inputs = [torch.randn(rows, n_in, dtype=dtype) for n_in, _ in shapes]
    for x, w in zip(inputs, weights):  # warm-up: oneDNN picks its kernels on the first call
        x @ w
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for x, w in zip(inputs, weights):
            x @ w
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def choose_cpu_dtype(hidden: int, intermediate: int, *, rows: int = 16, repeats: int = 7) -> PrecisionChoice:
    """fp32 or bf16 for a model of these shapes on this CPU, by measurement: ``rows`` rows
    (a decode step's batch) through the model's projection shapes, median of ``repeats``.
    About a tenth of a second; fp32 at once where the CPU has no native bf16."""
    if not native_bf16():
        return PrecisionChoice(torch.float32, "fp32: this CPU reports no native bf16 (avx512_bf16 / amx_bf16)")
    shapes = [(hidden, hidden), (hidden, intermediate), (intermediate, hidden)]
    fp32 = _time_matmuls(torch.float32, rows, shapes, repeats)
    bf16 = _time_matmuls(torch.bfloat16, rows, shapes, repeats)
    if bf16 * BF16_MARGIN <= fp32:
        return PrecisionChoice(torch.bfloat16, f"bf16: {fp32 / bf16:.2f}x fp32's speed on this CPU's probe", fp32, bf16)
    return PrecisionChoice(torch.float32, f"fp32: bf16 ran at {fp32 / bf16:.2f}x fp32's speed on this CPU's probe "
                           f"(kept only from {BF16_MARGIN:.2f}x)", fp32, bf16)
