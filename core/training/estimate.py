"""``plugtune estimate``: peak memory and seconds per step of a recipe, before any weight loads.

When: ``plugtune estimate RECIPE`` on its own, and one line of ``plugtune validate``. Why: a
run that does not fit fails (or swaps) only after the data is tokenized and the base is
loaded; the numbers below come from the recipe, the base's configuration and the tokenizer.

How, in order (nothing here reads a weight; the tests delete the weights file first):

1. **Shapes.** The base's model class for the task's head is built from its configuration on
   the ``meta`` device (storage-free tensors; :mod:`plugtune.artifacts.outline`), in the dtype
   the run loads it in (``training.base_dtype``), and the recipe's tuning method ``prepare``\\ s
   it there, as in a run (peft injects on ``meta``). Parameters are then counted by dtype
   and ``requires_grad``: frozen ones are the base's weights, trainable ones bring the same
   again as gradients and an optimizer state (AdamW: two moments in the parameter's dtype).
   A method that stores the base differently (8-bit, 4-bit) says its bytes per weight of the
   base's linear layers through its optional ``memory_hints`` (:class:`MemoryHints`).
2. **Batches.** The training split is loaded and encoded with the tokenizer only (as
   ``plugtune preview`` does) and cut into the very batches the run takes (core/data/batching.py,
   same seed, grouped by length or not), for the steps the run will take; the largest batch
   (rows x padded length) and the one with the most label tokens are the candidates.
3. **What autograd keeps.** One training step of each candidate batch runs on the ``meta``
   model: the forward under ``torch.autograd.graph.saved_tensors_hooks``, so every tensor
   saved for backward is seen (its storage counted once, parameters left out), with the LM
   head at the label positions only when ``training.logits_on_labels_only`` applies (the
   run's path, core/training/loss.py) and the full ``(B, T, V)`` logits otherwise; a
   sequence classifier's head is its own small layer. What is saved from the LM head's input
   on (its forward pre-hook) is the **logits** part, the rest **activations**. The same pass runs under
   ``torch.utils.flop_counter.FlopCounterMode`` with its backward, which counts the FLOPs
   of the step as autograd runs them (frozen weights get no weight-gradient matmuls: about
   2x the forward for a frozen base, 3x for full fine-tuning, from the graph, not assumed).
4. **The rule** (calibrated on the shipped recipes, SmolLM2-135M, 2 CPU cores, torch 2.13;
   BENCHMARKS.md "Memory estimate")::

       train peak = framework + base + trainable + gradients + optimizer + method state
                    + ACTIVATION_FACTOR x activations + LOGITS_FACTOR x logits
       load peak  = framework + checkpoint file pages + base   (only when the load converts:
                    another dtype than the file's, or quantized; else the weights are the
                    file's pages)
       eval peak  = framework + base + trainable + optimizer + method state
                    + LOGITS_FACTOR x an evaluation batch's fp32 logits (no graph kept)
       peak       = max(train peak, load peak, eval peak)

   ``ACTIVATION_FACTOR`` covers what backward allocates beside the saved tensors (the
   gradients of the activations as they flow back, the allocator's slack: glibc keeps freed
   heap); ``LOGITS_FACTOR`` the log-softmax saved for backward, its gradient and the
   logits' gradient, alive together when backward starts. **framework** is what the
   process holds before any weight: on a CPU, measured in this process (the training stack
   imported, the tokenizer loaded) plus ``RUN_OVERHEAD`` for what a run adds (accelerate,
   the encoded splits, the progress display); on CUDA the device memory outside tensors,
   the documented constant ``CUDA_FRAMEWORK``.
5. **Seconds per step:** the step's FLOPs over this machine's sustained matmul rate, timed
   once per process at the model's shapes and dtype (:func:`matmul_rate`, well under a
   second; the fastest repeat) times ``EFFICIENCY`` (what the whole step reaches of the bare
   matmul rate): the step on an idle machine, within about 30% there; a machine that other
   jobs share runs steps slower by their load (up to 8x in BENCHMARKS.md's table).

The available memory the warning compares with is ``MemAvailable`` (``psutil``), or on CUDA
the device's free memory; ``$PLUGTUNE_AVAILABLE_MEMORY`` (bytes, or ``512M``/``8G``)
replaces it, for tests and for planning for another machine.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from plugtune.kernel.components import BaseLoading, MemoryHints, PrepareContext, call_prepare
from plugtune.kernel.errors import ModelError, PlugtuneError, RecipeError
from plugtune.kernel.registry import PluginSystem, get_plugin_system
from plugtune.training.recipe import Recipe

ACTIVATION_FACTOR = 1.35
"""Measured peak over saved tensors, for the activations (see the module rule): fitted on the
first seven shipped LoRA recipes (bench/estimate_check.py), where (measured peak - framework
- parameters - 3 x logits) / saved activations came out 1.23-1.46, median 1.42, saved
activations 275 MB to 2.7 GB; 1.35 puts all seven within 10%."""
LOGITS_FACTOR = 3.0
"""The logits part over what the loss saves of them (the fp32 log-softmax, ``(N, V)``): at
the start of backward that tensor, its gradient and the logits' gradient are alive at once."""
RUN_OVERHEAD = 0
"""Bytes a training process holds beyond this process's framework baseline (CPU)."""
CUDA_FRAMEWORK = 512 << 20
"""Device memory of the CUDA context, cuBLAS workspace and allocator slack (a constant: it
cannot be measured without creating a context)."""
CPU_FRAMEWORK = 560 << 20
"""The CPU framework baseline measured once (python, torch, transformers, peft, accelerate,
the plugtune training stack, SmolLM2's tokenizer: 530-550 MB RSS on Linux); used when this
process cannot read its own memory."""
EFFICIENCY = 1.0
"""The share of the probe's best matmul rate a whole training step reaches: 1.0-1.3 in the
bench runs that had the 2 cores to themselves (SmolLM2 LoRA, 125-340 GFLOP steps at 80-97
GFLOP/s, probe 60-80 GFLOP/s); steps that shared the cores with other jobs ran up to 8x
slower than this predicts. The estimate is the step on an idle machine."""
AVAILABLE_ENV = "PLUGTUNE_AVAILABLE_MEMORY"


class EstimateUnavailable(ModelError):
    """The estimate cannot be made offline (the base's configuration or tokenizer is not on
    this machine); ``plugtune validate`` prints the reason instead of the line."""


@dataclass(frozen=True)
class BatchShape:
    """One training micro-batch as the run cuts it: rows, padded length, label tokens."""

    rows: int
    length: int
    label_tokens: int

    @property
    def tokens(self) -> int:
        return self.rows * self.length


@dataclass
class Estimate:
    """The estimate of one recipe. ``parts``: bytes by name, in the order printed; the train
    peak is their sum, the peak the largest of it, ``load_peak`` and ``eval_peak``."""

    recipe: str
    device: str
    what: str  # "peak RSS" | "peak device memory"
    parts: dict[str, int]
    load_peak: int
    eval_peak: int
    batch: BatchShape
    step_flops: float
    seconds_per_step: float
    matmul_rate: float  # FLOP/s of the probe
    available: int | None
    available_source: str
    trainable_parameters: int
    total_parameters: int
    saved: tuple[int, int] = (0, 0)  # bytes autograd keeps of the worst batch: (activations, logits), before the factors
    notes: list[str] = field(default_factory=list)

    @property
    def train_peak(self) -> int:
        return sum(self.parts.values())

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.load_peak, self.eval_peak)

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.peak <= self.available

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "device": self.device, "what": self.what, "peak_bytes": self.peak,
                "train_peak_bytes": self.train_peak, "load_peak_bytes": self.load_peak, "eval_peak_bytes": self.eval_peak, "parts": dict(self.parts),
                "batch": {"rows": self.batch.rows, "length": self.batch.length, "label_tokens": self.batch.label_tokens},
                "step_flops": self.step_flops, "seconds_per_step": self.seconds_per_step,
                "matmul_flops_per_s": self.matmul_rate, "available_bytes": self.available,
                "available_source": self.available_source, "trainable_parameters": self.trainable_parameters,
                "total_parameters": self.total_parameters, "saved_activations_bytes": self.saved[0],
                "saved_logits_bytes": self.saved[1], "notes": list(self.notes)}


def human_bytes(n: float) -> str:
    """``1.62 GB``, ``380 MB`` (powers of 1024, as ``free -h``)."""
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GB" else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


# --------------------------------------------------------------------------------------------
# Available memory
# --------------------------------------------------------------------------------------------


def parse_bytes(text: str) -> int:
    """``"1073741824"``, ``"512M"``, ``"8G"``, ``"1.5GB"`` -> bytes; ValueError otherwise."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(value[-1:], 1)
    number = float(value[:-1] if scale > 1 else value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(text)
    return int(number * scale)


def available_memory(on_cuda: bool) -> tuple[int | None, str]:
    """Bytes available to a run now and where the number comes from: ``$PLUGTUNE_AVAILABLE_MEMORY``
    when set, else the CUDA device's free memory, else ``MemAvailable`` (psutil)."""
    override = os.environ.get(AVAILABLE_ENV)
    if override:
        try:
            return parse_bytes(override), f"${AVAILABLE_ENV}"
        except ValueError:
            raise RecipeError([f"${AVAILABLE_ENV}: {override!r} is not a size; give bytes or e.g. 512M, 8G"]) from None
    if on_cuda:
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free), "free CUDA memory"
    try:
        import psutil

        return int(psutil.virtual_memory().available), "MemAvailable"
    except (ImportError, OSError):
        return None, "unknown"


def process_rss() -> int | None:
    """This process's resident memory now (``/proc/self/status`` VmRSS), None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# --------------------------------------------------------------------------------------------
# The matmul rate
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def matmul_rate(rows: int, hidden: int, intermediate: int, dtype_name: str, device: str, threads: int) -> float:
    """Sustained FLOP/s of this machine for ``(rows, hidden) @ (hidden, intermediate)`` and
    back in ``dtype``: the fastest of a few repeats after a warm-up, at most about half a
    second; cached per process."""
    import torch

    dtype = getattr(torch, dtype_name)
    previous = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(threads)
    try:
        a = torch.randn(rows, hidden, dtype=dtype, device=device)
        up = torch.randn(hidden, intermediate, dtype=dtype, device=device)
        down = torch.randn(intermediate, hidden, dtype=dtype, device=device)
        flops = 2 * rows * hidden * intermediate * 2
        (a @ up) @ down  # warm-up: the library picks its kernels on the first call
        times, budget = [], time.perf_counter() + 0.5
        while len(times) < 3 or (len(times) < 9 and time.perf_counter() < budget):
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            (a @ up) @ down
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return flops / max(min(times), 1e-9)  # the best repeat: the machine's rate, not its neighbours' load
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------
# The batches the run takes
# --------------------------------------------------------------------------------------------


def run_batches(rows: list[dict[str, Any]], recipe: Recipe) -> Iterator[list[dict[str, Any]]]:
    """The training micro-batches of the run, in its order: the same cut as the training
    loop's (``epoch_batches`` with the seed, grouped by length when the recipe is), for the
    optimizer steps it takes times ``grad_accum``."""
    from plugtune.data.batching import epoch_batches

    t = recipe.training
    batches_per_epoch = math.ceil(len(rows) / t.batch_size)
    steps = t.max_steps or max(1, math.ceil(t.epochs * math.ceil(batches_per_epoch / t.grad_accum)))
    lengths = [len(r["input_ids"]) for r in rows] if t.group_by_length else None
    left, epoch = steps * t.grad_accum, 0
    while left > 0 and rows:
        for indices in epoch_batches(len(rows), t.batch_size, seed=t.seed, epoch=epoch, lengths=lengths):
            yield [rows[i] for i in indices]
            left -= 1
            if left == 0:
                return
        epoch += 1


def candidate_batches(rows: list[dict[str, Any]], recipe: Recipe) -> list[list[dict[str, Any]]]:
    """The batches whose step may be the peak: the most padded tokens, and the most label
    tokens (logits), one batch when they are the same."""
    from plugtune.training.preview import trained_tokens

    best_tokens, best_labels = None, None
    for batch in run_batches(rows, recipe):
        tokens = len(batch) * max(len(r["input_ids"]) for r in batch)
        labels = sum(trained_tokens(r) for r in batch)
        if best_tokens is None or tokens > best_tokens[0]:
            best_tokens = (tokens, batch)
        if best_labels is None or labels > best_labels[0]:
            best_labels = (labels, batch)
    if best_tokens is None:
        return []
    return [best_tokens[1]] if best_labels[1] is best_tokens[1] else [best_tokens[1], best_labels[1]]


# --------------------------------------------------------------------------------------------
# The meta model and one step on it
# --------------------------------------------------------------------------------------------


@dataclass
class Traced:
    """What one meta training step showed: bytes saved for backward (activations and
    logits), its FLOPs (forward and backward), and the batch's shape."""

    activations: int
    logits: int
    flops: float
    shape: BatchShape


def build_meta_model(config: Any, head: str, num_labels: int, dtype: Any, pad_token_id: int | None) -> Any:
    """The model class for ``head`` from ``config`` on the ``meta`` device, in ``dtype``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    if config.pad_token_id is None and pad_token_id is not None:
        config.pad_token_id = pad_token_id  # as load_base does: a classifier pools at the last real token
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            if head == "classifier":
                config.num_labels = num_labels
                model = AutoModelForSequenceClassification.from_config(config)
            else:
                model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - an architecture transformers cannot build
        raise EstimateUnavailable(f"cannot build the model class from its configuration: {exc}") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model.to(dtype)


def _sequences(batch: dict[str, Any]) -> list[tuple[Any, Any]]:
    """The ``(input_ids, labels)`` pairs of a collated training batch: ``input_ids`` and any
    ``<name>_input_ids`` with its ``<name>_labels`` (a preference pair's rejected answers)."""
    out = []
    for key, ids in batch.items():
        if key.endswith("input_ids") and hasattr(ids, "dim") and ids.dim() == 2 and ids.numel():
            out.append((ids, batch.get(key.removesuffix("input_ids") + "labels")))
    return out


def trace_step(model: Any, batch: dict[str, Any], *, label_only: bool) -> Traced:
    """Run one training step of ``batch`` (collated, on the CPU) on the meta ``model``: the
    forward with every tensor saved for backward recorded, then the backward, both under the
    FLOP counter. The attention mask is left out (building it reads values, which meta
    tensors have none of; for right padding its memory is ``B x T x T`` booleans at most)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from plugtune.data.labels import LabelPositions
    from plugtune.training.loss import head_at, output_head

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, tuple[int, bool]] = {}
    in_head = [False]  # from the LM head's input on, what is saved is the logits' (and the loss's)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = (storage.nbytes(), in_head[0])
        return tensor

    def entering_head(module: Any, args: Any) -> None:
        in_head[0] = True

    head = output_head(model)
    hook = head.register_forward_pre_hook(entering_head) if head is not None else None
    counter = FlopCounterMode(display=False)
    losses, rows, width, labelled = [], 0, 0, 0
    model.train()
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            for ids, labels in _sequences(batch):
                b, t = ids.shape
                in_head[0] = False
                rows, width = rows + b, max(width, t)
                meta_ids = torch.zeros(b, t, dtype=torch.long, device="meta")
                if labels is not None and labels.dim() == 1:  # a classifier: one class per row
                    logits = model(input_ids=meta_ids).logits  # (B, C)
                    losses.append(torch.nn.functional.cross_entropy(logits.float(), labels.to("meta")))
                elif label_only and head is not None and labels is not None:
                    cpu = LabelPositions.of(labels)
                    positions = LabelPositions(cpu.rows.to("meta"), cpu.columns.to("meta"), cpu.targets.to("meta"),
                                               cpu.batch_size, cpu.width)
                    labelled += int(cpu.rows.numel())
                    with head_at(head, positions):
                        logits = model(input_ids=meta_ids).logits  # (N, V)
                    losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                                                    positions.targets))
                else:
                    logits = model(input_ids=meta_ids).logits  # (B, T, V)
                    targets = torch.zeros(b, t - 1, dtype=torch.long, device="meta")
                    labelled += b * (t - 1)
                    losses.append(torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets))
        if hook is not None:
            hook.remove()
        loss = torch.stack(losses).sum()
        if loss.requires_grad:
            loss.backward()
    activations = sum(n for n, is_logits in saved.values() if not is_logits)
    logit_bytes = sum(n for n, is_logits in saved.values() if is_logits)
    return Traced(activations, logit_bytes, float(counter.get_total_flops()), BatchShape(rows, width, labelled))


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


# --------------------------------------------------------------------------------------------
# Parameters, by role
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterBytes:
    base: int
    trainable: int
    gradients: int
    optimizer: int
    method_state: int
    trainable_count: int
    total_count: int


def quantizable_weights(model: Any, head_modules: tuple[str, ...]) -> set[int]:
    """``id`` of the weight of every ``nn.Linear`` outside ``head_modules`` (the layers a
    quantizing load converts), read before ``prepare`` wraps them."""
    from torch import nn

    out = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[0] not in head_modules:
            out.add(id(module.weight))
    return out


def count_parameter_bytes(model: Any, quantizable: set[int], hints: MemoryHints) -> ParameterBytes:
    """Bytes of the prepared model's parameters: frozen ones as the base stores them
    (``hints.linear_bytes_per_param`` for the quantizable weights), trainable ones with their
    gradients and optimizer state (``hints.optimizer_bytes_per_param``, else AdamW's two
    moments in the parameter's dtype) and what the method keeps beside them
    (``hints.host_bytes_per_trainable_param``)."""
    base = trainable = optimizer = kept = 0
    trainable_count = total = 0
    for p in model.parameters():  # tied weights once
        size = p.numel() * p.element_size()
        total += p.numel()
        if p.requires_grad:
            trainable += size
            trainable_count += p.numel()
            per = hints.optimizer_bytes_per_param
            optimizer += int(p.numel() * per) if per is not None else 2 * size
            kept += int(p.numel() * (hints.host_bytes_per_trainable_param or 0))
        elif hints.linear_bytes_per_param is not None and id(p) in quantizable:
            base += int(p.numel() * hints.linear_bytes_per_param)
        else:
            base += size
    return ParameterBytes(base, trainable, trainable, optimizer, kept, trainable_count, total)


def checkpoint_file(location: Path) -> tuple[int | None, set[str]]:
    """Bytes of the base's weight files and the dtypes stored in them (read from the
    safetensors headers only); ``(None, set())`` when there are none here (the estimate then
    takes the file to hold what the model loads)."""
    import json
    import struct

    from plugtune.artifacts.models import converted_folder

    folder = converted_folder(location) if location.suffix == ".gguf" else location
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None, set()
    total, dtypes = 0, set()
    for path in files:
        try:
            total += path.stat().st_size
            with open(path, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                if size < 100 << 20:
                    header = json.loads(fh.read(size))
                    dtypes |= {v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
        except (OSError, ValueError, struct.error):
            continue
    return total, {d for d in dtypes if d}


SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


# --------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------


def estimate(recipe: Recipe, plugins: PluginSystem | None = None) -> Estimate:
    """The estimate of ``recipe`` (see the module docstring); :class:`EstimateUnavailable`
    when the base's configuration or tokenizer is not on this machine."""
    import torch

    from plugtune.artifacts.outline import outline_for
    from plugtune.data.encoding import collate_rows
    from plugtune.training.loss import output_head, supports_label_positions
    from plugtune.training.preview import build_preview, local_tokenizer
    from plugtune.training.runtime import choose_threads, uses_cuda
    from plugtune.training.train import base_dtype, choose_run_precision  # the run's own choices, not copies of them

    plugins = plugins or get_plugin_system()
    t = recipe.training
    on_cuda = uses_cuda(t.device)
    device = "cuda" if on_cuda else "cpu"
    found = local_tokenizer(recipe.spec.base_model, plugins)
    if found.tokenizer is None:
        raise EstimateUnavailable(f"base_model: {found.reason}; the estimate needs the tokenizer and configuration "
                                  f"(never the weights)")
    preview = build_preview(recipe, found)
    task, rows = preview.task, preview.splits["train"].encoded
    test_rows = preview.splits["test"].encoded[: t.max_eval_examples or None]
    if preview.splits["train"].error:
        raise EstimateUnavailable(preview.splits["train"].error)
    outline = outline_for(recipe.spec.base_model, task, plugins)
    if outline is None:
        raise EstimateUnavailable(f"base_model: {recipe.spec.base_model} has no configuration on this machine")
    notes: list[str] = []
    method_class = recipe.method.component.obj
    trains_base = getattr(method_class, "trains_base_weights", False)
    cpu_bf16 = (t.base_dtype == "auto" and not on_cuda and not trains_base
                and choose_run_precision(recipe, on_cuda, plugins).mixed_precision == "bf16")  # the run's own probe
    dtype = base_dtype(t.base_dtype, on_cuda, trains_base, cpu_bf16=cpu_bf16)
    pad_id = found.tokenizer.pad_token_id
    try:
        config = outline.config
    except PlugtuneError as exc:
        raise EstimateUnavailable(str(exc)) from None
    model = build_meta_model(config, task.head, outline.num_labels, dtype, pad_id)
    heads = head_modules(model)
    quantizable = quantizable_weights(model, heads)
    new = frozenset(n for n, _ in model.named_parameters() if n.split(".")[0] in heads) if task.head == "classifier" \
        else frozenset()
    method = recipe.method.build()
    loading = BaseLoading(device=device, dtype=str(dtype).replace("torch.", ""), head=task.head, head_modules=heads)
    hints = memory_hints(method, loading)
    context = PrepareContext(new_parameters=new, tokenizer=found.tokenizer, seed=t.seed, device=device)
    try:
        with _quiet_transformers():
            model = call_prepare(method, model, task, context)
    except Exception as exc:  # noqa: BLE001 - a method that cannot prepare on meta: count every weight as trained
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        notes.append(f"the method's prepare failed on the meta device ({first}); counted as full fine-tuning, an upper bound")
        for p in model.parameters():
            p.requires_grad_(True)
    params = count_parameter_bytes(model, quantizable, hints)
    regularizers = [b.build() for b in recipe.regularizers]
    label_only = (t.logits_on_labels_only and not task.is_classification
                  and supports_label_positions(model, regularizers))
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    traced = []
    for batch_rows in candidate_batches(rows, recipe):
        batch = collate_rows(task, batch_rows, pad_id if pad_id is not None else 0)
        try:
            traced.append(trace_step(model, batch, label_only=label_only and output_head(model) is not None))
        except Exception as exc:  # noqa: BLE001 - an op without a meta kernel in a plugin's layer
            raise EstimateUnavailable(f"the training step could not be traced on the meta device "
                                      f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not traced:
        raise EstimateUnavailable("no training rows to estimate from")
    worst = max(traced, key=lambda tr: tr.activations + tr.logits)
    framework, how = framework_bytes(on_cuda)
    if how:
        notes.append(how)
    parts = {"framework": framework, "base weights": params.base, "trainable parameters": params.trainable,
             "gradients": params.gradients, "optimizer state": params.optimizer,
             "method state": 0 if on_cuda else params.method_state,
             "activations": int(ACTIVATION_FACTOR * worst.activations), "logits": int(LOGITS_FACTOR * worst.logits)}
    resident = framework + params.base + params.trainable + params.optimizer + parts["method state"]
    eval_peak = resident + evaluation_bytes(test_rows, t.eval_batch_size or 2 * t.batch_size, vocab,
                                            label_only=label_only, classifier=task.is_classification)
    file_bytes, file_dtypes = checkpoint_file(outline.location)
    converts = hints.linear_bytes_per_param is not None or (
        bool(file_dtypes) and {SAFETENSORS_DTYPES.get(d, d) for d in file_dtypes} != {str(dtype).replace("torch.", "")})
    load_peak = framework + (file_bytes or 0) + params.base if converts else 0
    hidden = int(getattr(config, "hidden_size", 0) or 512)
    intermediate = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    rate = matmul_rate(min(max(worst.shape.tokens, 16), 2048), hidden, intermediate, str(dtype).replace("torch.", ""),
                       device, choose_threads(t.threads))
    flops = statistics.mean(tr.flops for tr in traced)
    available, source = available_memory(on_cuda)
    return Estimate(recipe=recipe.name, device=device, what="peak device memory" if on_cuda else "peak RSS",
                    parts=parts, load_peak=load_peak, eval_peak=eval_peak, batch=worst.shape, step_flops=flops * t.grad_accum,
                    seconds_per_step=flops * t.grad_accum / (rate * EFFICIENCY), matmul_rate=rate,
                    available=available, available_source=source, trainable_parameters=params.trainable_count,
                    total_parameters=params.total_count, saved=(worst.activations, worst.logits), notes=notes)


def evaluation_bytes(rows: list[dict[str, Any]], batch_size: int, vocab: int, *, label_only: bool,
                     classifier: bool) -> int:
    """What an evaluation batch adds on top of the resident model and optimizer: no graph is
    kept, so its logits dominate: fp32 ``(N, V)`` at the label positions (or ``(B, T, V)``
    without ``logits_on_labels_only``), held with the cross-entropy's log-softmax and the
    greedy log-softmax at once (core/data/labels.py): three copies. A classifier's are tiny."""
    from plugtune.training.preview import trained_tokens

    if classifier or not rows or not vocab:
        return 0
    worst = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        positions = (sum(trained_tokens(r) for r in chunk) if label_only
                     else len(chunk) * max(len(r["input_ids"]) for r in chunk))
        worst = max(worst, positions)
    return int(LOGITS_FACTOR * worst * vocab * 4)


def head_modules(model: Any) -> tuple[str, ...]:
    """The top-level modules outside the pretrained backbone (``base_model_prefix``) that hold
    parameters, and the output embedding's name: what a quantizing load keeps in full
    precision (the same rule as :func:`plugtune.artifacts.models.head_modules`, on the model
    already built here)."""
    backbone = getattr(model, "base_model_prefix", "") or ""
    names = [name for name, child in model.named_children()
             if backbone and name != backbone and any(True for _ in child.parameters())]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names += [name for name, module in model.named_modules() if output is not None and module is output and name]
    return tuple(dict.fromkeys(names))


def memory_hints(method: Any, context: BaseLoading) -> MemoryHints:
    """The method's :class:`MemoryHints` (its optional ``memory_hints``), or the default:
    the base stored as loaded, AdamW's state."""
    get = getattr(method, "memory_hints", None)
    hints = get(context) if get is not None else None
    return hints if isinstance(hints, MemoryHints) else MemoryHints()


def framework_bytes(on_cuda: bool) -> tuple[int, str]:
    """The framework part and how it was had: on a CPU this process's resident memory with the
    training stack imported and the tokenizer loaded (what a run holds before its first
    weight) plus :data:`RUN_OVERHEAD`; on CUDA :data:`CUDA_FRAMEWORK`."""
    if on_cuda:
        return CUDA_FRAMEWORK, ""
    import plugtune.training.train  # noqa: F401 - the run's imports (accelerate, peft, rich): part of what it holds

    rss = process_rss()
    if rss is None:
        return CPU_FRAMEWORK + RUN_OVERHEAD, "framework: the documented constant (this process's memory is unreadable)"
    return rss + RUN_OVERHEAD, ""


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def summary_line(est: Estimate) -> str:
    """``plugtune validate``'s line: the peak and seconds per step."""
    b = est.batch
    fits = "" if est.available is None else \
        f"; {human_bytes(est.available)} available ({est.available_source})"
    return (f"estimate: {est.what} {human_bytes(est.peak)} on {est.device}, {est.seconds_per_step:.2g} s/step "
            f"(largest batch {b.rows} x {b.length} tokens){fits}")


def warning_line(est: Estimate) -> str | None:
    """A warning when the estimated peak exceeds the available memory, else None."""
    if est.fits is not False:
        return None
    return (f"warning: the estimated {est.what} {human_bytes(est.peak)} exceeds the {human_bytes(est.available or 0)} "
            f"available ({est.available_source}); lower training.batch_size or training.max_length, or use a method "
            f"that stores the base in fewer bits")


def render(est: Estimate, console: Any) -> None:
    """``plugtune estimate``'s table: each part, the peaks, the step."""
    from rich.table import Table

    b = est.batch
    table = Table(title=f"{est.recipe}: estimated {est.what} on {est.device} (no weights loaded)")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    for name, value in est.parts.items():
        table.add_row(name, human_bytes(value))
    table.add_row("[bold]training peak[/]", f"[bold]{human_bytes(est.train_peak)}[/]")
    if est.load_peak:
        table.add_row("loading peak (checkpoint pages + converted base)", human_bytes(est.load_peak))
    table.add_row("evaluation peak (resident + an evaluation batch's logits)", human_bytes(est.eval_peak))
    console.print(table)
    console.print(f"peak {human_bytes(est.peak)}; {est.trainable_parameters:,} of {est.total_parameters:,} parameters "
                  f"trained; largest batch {b.rows} rows x {b.length} tokens ({b.label_tokens} label tokens)")
    console.print(f"{est.step_flops / 1e9:.1f} GFLOP per step at {est.matmul_rate / 1e9:.1f} GFLOP/s measured x "
                  f"{EFFICIENCY:g} efficiency: ~{est.seconds_per_step:.2g} s/step on an idle machine (slower while others share it)")
    for note in est.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    line = warning_line(est)
    if line:
        console.print(f"[yellow]{line}[/]")
    elif est.available is not None:
        console.print(f"fits: {human_bytes(est.available)} available ({est.available_source})")


__all__ = ["Estimate", "EstimateUnavailable", "available_memory", "estimate", "human_bytes", "matmul_rate",
           "parse_bytes", "render", "summary_line", "warning_line"]
