"""Hardware defaults a recipe does not have to spell out, each overridable in ``training``.

* CPU threads: one per physical core (hyper-threads share a core's matrix units and slow
  GEMMs down when both run), divided among the processes of a data-parallel run on one host;
  ``$PLUGTUNE_CORES`` lowers the cores counted, for jobs that share a machine.
* Precision (``auto``): bf16 autocast on GPUs that support it (fp16 otherwise). On a CPU, by
  measurement (:func:`training_precision`): bf16 autocast only where the CPU reports native
  bf16 instructions and a start-up probe of the model's matrix shapes runs it faster than
  fp32 by a margin; fp32 elsewhere (an AVX2-only CPU emulates bf16, slower). The choice and
  its reason are printed and kept in the manifest. ``fp32`` and ``bf16`` force one. Under bf16
  autocast on a CPU the attention runs in fp32 (:data:`FP32_SDPA`).
* Attention: SDPA on GPUs (fused kernels); on CPUs the library's own default (SDPA for the
  models that have it). ``attention: eager`` is there for models whose SDPA path misbehaves.
* Grouped-query attention (CPU runs, ``attention: auto``): keys and values go to torch's SDPA
  with their own, fewer heads (``enable_gqa``) instead of being copied to every query head
  first; the copies were saved for backward in every layer (about 60 MB of the benchmark's
  peak in BENCHMARKS.md's ablation, up to 190 MB in other runs; same loss). ``attention:
  sdpa`` keeps transformers' path as it is.
* Host memory (``malloc_mmap_threshold``, Linux/glibc): torch allocates CPU tensors with
  malloc. Left alone, glibc serves blocks over its dynamic mmap threshold with mappings of
  their own, unmapped when freed, and trims the heap's free top back to the OS; every step
  then faults its activations' pages in afresh (the kernel zeroes each one). ``auto`` (the
  default, CPU runs): a fixed 32 MiB threshold (glibc's largest) and no trimming, so a step
  reuses the pages the one before freed. On the SST-2 LoRA benchmark in fp32 that halves the
  run's page faults (0.53x) for 1.07x the tokens/s in alternating runs (0.94x in the noisier
  AVX2-only run BENCHMARKS.md also holds: a few percent either way); in bf16 the faults are
  the same either way (0.98x) and so is the speed, within the noise; peak RSS is the same
  (BENCHMARKS.md, "The kept heap against glibc's allocator defaults"). The memory stays in the
  process until it ends. A small fixed threshold (1 MiB, say) is the memory saver: large
  tensors in their own mappings, returned when freed; about 7-12% lower peak RSS for slower
  steps. 0: glibc's defaults, untouched.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


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


MIN_BF16_HIDDEN = 256
"""``precision: auto`` keeps fp32 for models narrower than this: their matrix products are too
small for bf16 to pay for its casts, and it keeps tiny test models exact on every CPU."""
PROBE_ROWS = (64, 4096)  # the probe's rows (a batch's tokens) are kept within these


@dataclass(frozen=True)
class TrainingPrecision:
    """What ``training.precision`` became for this run, and why (printed, and kept in the
    manifest as ``training.precision``)."""

    requested: str
    mixed_precision: str  # accelerate's: "no", "bf16", "fp16"
    reason: str
    probed: bool = False  # chosen by timing this machine (printed at start-up; the manifest has every choice)
    bf16_speedup: float | None = None  # the probe's fp32 time / bf16 time, where it ran

    def record(self) -> dict[str, Any]:
        chosen = {"no": "fp32"}.get(self.mixed_precision, self.mixed_precision)
        record: dict[str, Any] = {"requested": self.requested, "chosen": chosen, "reason": self.reason}
        if self.bf16_speedup is not None:
            record["bf16_speedup"] = round(self.bf16_speedup, 3)
        return record


def training_precision(requested: str, on_cuda: bool, config: Any | None, batch_tokens: int) -> TrainingPrecision:
    """``training.precision`` for this run. Explicit values and GPUs follow
    :func:`choose_precision`. ``auto`` on a CPU: bf16 autocast when the CPU reports native bf16
    instructions and a probe of the model's own matrix shapes (``config``: its transformers
    config; ``batch_tokens`` rows, a batch's tokens) runs bf16 faster than fp32 by
    :data:`~plugtune.kernel.hardware.BF16_MARGIN` (:func:`~plugtune.kernel.hardware.choose_cpu_dtype`,
    about half a second); fp32 otherwise, with the reason."""
    mixed = choose_precision(requested, on_cuda)
    if requested != "auto":
        return TrainingPrecision(requested, mixed, f"{requested}: as the recipe says")
    if on_cuda:
        return TrainingPrecision(requested, mixed, f"{mixed}: autocast on this GPU")
    from plugtune.kernel.hardware import choose_cpu_dtype, native_bf16

    if not native_bf16():
        return TrainingPrecision(requested, "no", "fp32: this CPU reports no native bf16 (avx512_bf16 / amx_bf16)")
    hidden = int(getattr(config, "hidden_size", 0) or 0) if config is not None else 0
    if hidden < MIN_BF16_HIDDEN:
        why = "the model's configuration is not on this machine" if config is None else f"hidden size {hidden} < {MIN_BF16_HIDDEN}"
        return TrainingPrecision(requested, "no", f"fp32: {why}, so bf16 is not probed")
    intermediate = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 4 * hidden)
    rows = min(max(batch_tokens, PROBE_ROWS[0]), PROBE_ROWS[1])
    choice = choose_cpu_dtype(hidden, intermediate, rows=rows)
    speedup = choice.fp32_ms / choice.bf16_ms if choice.fp32_ms and choice.bf16_ms else None
    if str(choice.dtype) != "torch.bfloat16":
        return TrainingPrecision(requested, "no", choice.reason, probed=True, bf16_speedup=speedup)
    # the base's dtype is training.base_dtype's to say (bf16 for a frozen base under auto)
    return TrainingPrecision(requested, "bf16", choice.reason + " (autocast; the adapter and optimizer state in fp32)",
                             probed=True, bf16_speedup=speedup)


def choose_attention(requested: str, on_cuda: bool) -> str | None:
    """``attn_implementation`` to load the base with; None leaves transformers' default."""
    if requested == "auto":
        return "sdpa" if on_cuda else None
    return requested


def choose_packing(on_cuda: bool) -> bool:
    """``training.packing: auto``'s choice where packing is possible (a causal-LM or chat task,
    a method and an attention that keep packed examples apart): on a CPU, pack; on a GPU,
    don't. Measured on this project's 2-core CPU (BENCHMARKS.md, "Packing"): packed batches
    beat length-grouped ones on the SST-2 SFT benchmark (fewer padded positions; the layout
    never computes more positions than one example per row, and attention over rows a few
    hundred wide costs little beside the linear layers) and tie on the support chats, whose
    grouped batches are already 99% full; random or streamed batches gain most. Not measured
    on a GPU, where SDPA with a packed mask leaves its fused causal kernel: off there until it is."""
    return not on_cuda


FP32_SDPA = "plugtune_fp32_sdpa"
"""The attention implementation of CPU runs in bf16 autocast: transformers' SDPA with the query,
keys and values in fp32. torch's CPU attention kernels are slower in bf16 than in fp32 (this
machine: forward + backward 2-4x (`python bench/precision.py --attention`: 2.0-3.9x over three runs) slower at the benchmark's shapes, BENCHMARKS.md), while
the linear layers around them gain from bf16; the attention's output goes back to bf16."""


def _fp32_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return output.to(dtype), weights


def use_fp32_attention(model: Any) -> bool:
    """Give ``model`` :data:`FP32_SDPA` where it runs transformers' SDPA through the attention
    interface (models on other paths keep theirs). Returns whether it changed."""
    from transformers import AttentionInterface

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(FP32_SDPA, _fp32_sdpa)
    AttentionMaskInterface.register(FP32_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # SDPA's masks, exactly
    try:
        model.set_attn_implementation(FP32_SDPA)
    except (ValueError, ImportError):
        return False
    return getattr(model.config, "_attn_implementation", None) == FP32_SDPA


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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
KEEP_HEAP_THRESHOLD = 32 << 20  # glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: no heap top that large is ever trimmed


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply glibc ``mallopt`` settings; False off glibc or where one is refused."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) for param, value in settings)
    except (OSError, AttributeError):
        return False


def set_mmap_threshold(threshold: int | None) -> bool:
    """Serve allocations of at least ``threshold`` bytes with their own mappings, returned to
    the OS when freed (``mallopt(M_MMAP_THRESHOLD)``). Process-wide and kept after the run;
    a no-op returning False off glibc or for None and 0 (glibc's default stays)."""
    return bool(threshold) and _mallopt((M_MMAP_THRESHOLD, int(threshold)))


def keep_freed_heap() -> bool:
    """Keep freed CPU tensors' memory in the process for the next step to reuse: blocks up
    to 32 MiB from the heap, never trimmed (see the module docstring; process-wide, kept
    after the run). False off glibc."""
    return _mallopt((M_MMAP_THRESHOLD, KEEP_HEAP_THRESHOLD), (M_TRIM_THRESHOLD, NEVER_TRIM))


def configure_host_allocator(setting: int | str | None, on_cuda: bool) -> str:
    """Apply ``training.malloc_mmap_threshold`` before the model and activations are
    allocated; returns what was done, for the run's log. ``auto`` keeps the freed heap on CPU
    runs (GPU runs allocate little host memory per step: glibc's default stays)."""
    if setting == "auto":
        if on_cuda:
            return "glibc default (GPU run)"
        return "freed memory kept for reuse (mmap threshold 32 MiB, no trim)" if keep_freed_heap() else "system default (not glibc)"
    if set_mmap_threshold(setting):
        return f"blocks of {setting} bytes or more returned to the OS when freed"
    return "glibc default"
