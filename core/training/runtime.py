"""Hardware defaults a recipe does not have to spell out, each overridable in ``training``.

* CPU threads: one per physical core (hyper-threads share a core's matrix units and slow
  GEMMs down when both run), divided among the processes of a data-parallel run on one host;
  ``$PLUGTUNE_CORES`` lowers the cores counted, for jobs that share a machine.
* Precision: fp32 on CPUs; bf16 autocast on GPUs that support it (fp16 otherwise). CPUs are
  not switched to bf16 automatically even with AMX: fp32 keeps the per-example loss equal to
  the reference's, and a CPU run in bf16 autocast spends time casting around the ops that
  have no bf16 kernel. ``precision: bf16`` opts in.
* Attention: SDPA on GPUs (fused kernels); on CPUs the library's own default (SDPA for the
  models that have it). ``attention: eager`` is there for models whose SDPA path misbehaves.
* Grouped-query attention (CPU runs, ``attention: auto``): keys and values go to torch's SDPA
  with their own, fewer heads (``enable_gqa``) instead of being copied to every query head
  first; the copies were saved for backward in every layer (about 60 MB of the benchmark's
  peak in BENCHMARKS.md's ablation, up to 190 MB in other runs; same loss). ``attention:
  sdpa`` keeps transformers' path as it is.
* Host memory, opt-in (``malloc_mmap_threshold``, Linux/glibc): torch allocates CPU tensors
  with malloc, and glibc raises its mmap threshold to the largest block freed so far (up to
  32 MiB); activations are then carved from the heap, batches of other lengths fragment it,
  and freed memory stays in the process. A fixed threshold (1 MiB, say) keeps large tensors
  in their own mappings, returned when freed: on the SST-2 LoRA benchmark about 7-12% lower
  peak RSS for 3-6% slower steps (BENCHMARKS.md), so it is not the default.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager


def physical_cores() -> int:
    """Physical CPU cores of this machine (logical CPUs when that cannot be told)."""
    try:
        import psutil

        count = psutil.cpu_count(logical=False)
    except ImportError:
        count = None
    return count or os.cpu_count() or 1


CORES_ENV = "PLUGTUNE_CORES"


def available_cores() -> int:
    """The cores this process may use: ``$PLUGTUNE_CORES`` where set (several jobs sharing a
    machine each take their part: the test suite's parallel workers set it), else the
    machine's physical cores. A value that is not a positive whole number is an error."""
    value = os.environ.get(CORES_ENV)
    if value is None or not value.strip():
        return physical_cores()
    if not value.strip().isdigit() or int(value) < 1:
        from plugtune.kernel.errors import PlugtuneError

        raise PlugtuneError(f"${CORES_ENV}={value!r}: give a whole number of cores, at least 1, or unset it")
    return int(value)


def uses_cuda(device: str) -> bool:
    """Whether a run with ``training.device`` trains on a CUDA GPU (auto: when one is there)."""
    import torch

    return device != "cpu" and torch.cuda.is_available()


def choose_threads(requested: int | None, *, physical: int | None = None, local_processes: int = 1) -> int:
    """torch's intra-op threads: the recipe's ``training.threads``, else the cores this process
    may use (:func:`available_cores`) shared evenly among the processes on this host (at least
    one each)."""
    if requested:
        return requested
    cores = physical if physical is not None else available_cores()
    return max(1, cores // max(1, local_processes))


def choose_precision(requested: str, on_cuda: bool, bf16_supported: bool | None = None) -> str:
    """accelerate's ``mixed_precision`` for a recipe's ``training.precision``."""
    if requested == "auto":
        if not on_cuda:
            return "no"
        if bf16_supported is None:
            import torch

            bf16_supported = torch.cuda.is_bf16_supported()
        return "bf16" if bf16_supported else "fp16"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[requested]


def choose_attention(requested: str, on_cuda: bool) -> str | None:
    """``attn_implementation`` to load the base with; None leaves transformers' default."""
    if requested == "auto":
        return "sdpa" if on_cuda else None
    return requested


FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"  # read by transformers' sdpa_attention_forward at each call


@contextmanager
def grouped_query_sdpa(enabled: bool) -> Iterator[None]:
    """While active (and ``enabled``: CPU runs), transformers' SDPA attention passes
    grouped-query keys and values to torch as they are (``enable_gqa=True``) instead of
    repeating them to the query heads' count (``repeat_kv``). torch's CPU kernel takes GQA
    with a mask, so results are the same and the repeated copies, kept for backward in every
    layer, are never made. Not on GPUs: with a mask, GQA makes torch leave its fused kernels.
    A value the user set in the environment is left alone; the previous state is restored."""
    if not enabled or FORCE_GQA in os.environ:
        yield
        return
    os.environ[FORCE_GQA] = "1"
    try:
        yield
    finally:
        os.environ.pop(FORCE_GQA, None)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def set_mmap_threshold(threshold: int | None) -> bool:
    """Serve allocations of at least ``threshold`` bytes with their own mappings, returned to
    the OS when freed (``mallopt(M_MMAP_THRESHOLD)``). Process-wide and kept after the run;
    a no-op returning False off glibc or for None and 0 (glibc's default stays)."""
    if not threshold or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold)))
    except (OSError, AttributeError):
        return False
