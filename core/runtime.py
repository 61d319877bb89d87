"""Hardware defaults a recipe does not have to spell out, each overridable in ``training``.

* CPU threads: one per physical core (hyper-threads share a core's matrix units and slow
  GEMMs down when both run), divided among the processes of a data-parallel run on one host.
* Precision: fp32 on CPUs; bf16 autocast on GPUs that support it (fp16 otherwise). CPUs are
  not switched to bf16 automatically even with AMX: fp32 keeps the per-example loss equal to
  the reference's, and a CPU run in bf16 autocast spends time casting around the ops that
  have no bf16 kernel. ``precision: bf16`` opts in.
* Attention: SDPA on GPUs (fused kernels); on CPUs the library's own default (SDPA for the
  models that have it). ``attention: eager`` is there for models whose SDPA path misbehaves.
"""

from __future__ import annotations

import os


def physical_cores() -> int:
    """Physical CPU cores of this machine (logical CPUs when that cannot be told)."""
    try:
        import psutil

        count = psutil.cpu_count(logical=False)
    except ImportError:
        count = None
    return count or os.cpu_count() or 1


def choose_threads(requested: int | None, *, physical: int | None = None, local_processes: int = 1) -> int:
    """torch's intra-op threads: the recipe's ``training.threads``, else the physical cores
    shared evenly among the processes on this host (at least one each)."""
    if requested:
        return requested
    cores = physical if physical is not None else physical_cores()
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
