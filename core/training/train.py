"""``plugtune run``: the training loop.

:func:`_run` is a table of contents over named phases, each returning typed state the next
ones read (``_Process``, ``_Data``, ``_Trainee``, :class:`RunState` with its
:class:`~plugtune.training.checkpoints.BestWeights`)::

    process   threads, allocator, accelerate
    data      splits -> method built -> base model + tokenizer (method.base_loading) -> augment
              -> tokenize                                                    (_Data)
    output    the folder, the log (cut back to the checkpoint when resuming)
    before    the evaluators on the base model
    model     method.prepare -> regularizers.setup -> optimizer, schedule   (_Trainee)
    loop      for each step: batch -> regularizers.transform_batch -> forward -> loss + loss terms
              -> backward -> regularizers.after_backward -> optimizer/scheduler step
              -> log (JSONL + progress bar) -> on_step_end -> evaluate at the cadence
    after     evaluate; regularizers may mark the weights best
    artifact  save the adapter (atomically; on failure the weights go to a checkpoint) -> on_train_end

Devices and mixed precision go through accelerate: the CPU in fp32 by default (bf16 is slow
on CPUs without AVX-512/AMX), a CUDA GPU in bf16 autocast when one is present.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from plugtune import __version__
from plugtune.artifacts.adapters import WEIGHTS_FILE, BaseRecord, Manifest, MethodRecord, save_adapter
from plugtune.artifacts.inputs import base_inputs
from plugtune.artifacts.outputs import check_output
from plugtune.data.batching import epoch_batches, shard
from plugtune.training.checkpoints import (
    BestWeights,
    Checkpoint,
    Checkpointer,
    clear_checkpoints,
    interrupted_run_message,
    restore_rng,
    resume_point,
    truncate_log,
)
from plugtune.kernel.components import Decision, EvalMetrics, MetricDirections, PrepareContext, call_prepare
from plugtune.data.datacheck import (
    bind_tokenizer,
    check_empty_fields,
    fit_to_context,
    prepare_split,
    report_overlong,
    turns_cut_line,
)
from plugtune.training.evaluation import evaluate
from plugtune.training.metrics_log import data_record
from plugtune.kernel.errors import DataError, PlugtuneError, RecipeError, TrainingError
from plugtune.kernel.faults import guarded
from plugtune.training.loss import label_token_losses, output_head, supports_label_positions
from plugtune.training import reference as references
from plugtune.artifacts.models import BaseInfo, LoadedBase, load_base
from plugtune.data.encoding import REFERENCE, Row, collate_rows
from plugtune.data.packing import attention_problem, pack_rows, packed_width, packing_problem
from plugtune.data.streaming import StreamedTraining
from plugtune.kernel.registry import PluginSystem, get_plugin_system
from plugtune.training import sharding
from plugtune.training.budget import CALIBRATION_STEPS, OVERRUN, BudgetPlanner, Plan, rebuild_schedule
from plugtune.training.rates import ChosenRates, choose_rates, is_new_parameter, with_head_rate
from plugtune.training.recipe import Recipe, TrainingBlock
from plugtune.training.tracking import tracked
from plugtune.training.runtime import (
    choose_attention,
    choose_packing,
    TrainingPrecision,
    training_precision,
    use_fp32_attention,
    choose_threads,
    grouped_query_sdpa,
    configure_host_allocator,
    uses_cuda,
)
from plugtune.training.signals import Interrupted, StopRequest, resume_command, terminate_as_interrupt
from plugtune.data.mixture import MixedData, path_options as _path_options
from plugtune.data.tasks import Task
from plugtune.data.tokenized_cache import cached_encode, tokenizer_fingerprint


@dataclass
class RunState:
    """What lifecycle hooks see: the recipe, the prepared model and the counters."""

    recipe: Recipe
    task: Task
    model: torch.nn.Module
    tokenizer: Any
    base: BaseInfo
    output_dir: Path
    total_steps: int
    step: int = 0
    epoch: int = 0  # with the step, where the batch order (core/batching.py) stands
    batch: int = 0  # index of the next batch of this epoch's order (a resumed run skips those before)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: BestWeights | None = None  # the weights a regularizer (early stopping) marked best so far
    resumed: bool = False  # --resume continues an earlier run (a tracker may continue its tracker run)


@dataclass
class RunResult:
    adapter_dir: Path
    before: dict[str, float]
    after: dict[str, float]
    steps: int
    train_seconds: float
    trainable_parameters: int
    total_parameters: int
    train_metrics: dict[str, float] = field(default_factory=dict)


def base_dtype(requested: str, on_cuda: bool, trains_base_weights: bool, cpu_bf16: bool = False) -> torch.dtype:
    """The dtype to load the base in. Frozen bases go to bf16 on GPUs, and on CPUs where the run
    trains in bf16 autocast (``cpu_bf16``: the precision chosen; half the frozen weights' memory,
    a quarter less peak RSS on the SFT benchmark, and no casts of them at every step,
    BENCHMARKS.md); the trained weights stay fp32 (:func:`fp32_master_weights`). A method that trains base weights keeps
    fp32 master weights. Elsewhere a CPU keeps fp32."""
    if requested == "auto":
        bf16 = (on_cuda and torch.cuda.is_bf16_supported()) or (cpu_bf16 and not on_cuda)
        return torch.bfloat16 if bf16 and not trains_base_weights else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]


def run_inputs(recipe: Recipe) -> list[tuple[str, Path]]:
    """What a run reads and so may never write into: the base model's folder (and, for an
    adapter used as a base, the bases below it) and every path option of the recipe's
    components (every source's data files, a regularizer's file)."""
    sections = [*((source.where, source.loader) for source in recipe.sources), ("method", recipe.method),
                *((f"regularizers[{i}]", b) for i, b in enumerate(recipe.regularizers)),
                *((f"evaluators[{i}]", b) for i, b in enumerate(recipe.evaluators))]
    found = [(f"{section}.options.{key}", path) for section, bound in sections for key, path in _path_options(bound.options)]
    return [*base_inputs(recipe.spec.base_model), *found]


def _occupied(path: Path) -> str | None:
    """Why ``run`` refuses the non-empty folder ``path`` (without the ``output.dir:`` prefix)."""
    interrupted = interrupted_run_message(path)
    if interrupted:
        return interrupted.removeprefix("output.dir: ")
    if not (path / WEIGHTS_FILE).exists() and (path / "metrics.jsonl").exists():
        return (f"{path} holds a run that stopped before its first checkpoint (no adapter, nothing to resume); "
                f"pass --overwrite to start over")
    return f"{path} already holds a run; pass --overwrite or set output.overwrite: true"


def _output_error(message: str) -> RecipeError:
    return RecipeError([f"output.dir: {message}"])


def check_output_dir(path: Path, overwrite: bool, resume: bool = False,
                     inputs: list[tuple[str, Path]] | None = None) -> None:
    """Refuse an output folder this run may not use, before anything is loaded or written
    (the policy every writing command shares, core/artifacts/outputs.py): not a folder, one
    of the run's ``inputs`` or around them, holding another run (or an interrupted one)
    without --overwrite/--resume. An interrupted adapter swap is recovered first (a line on stderr)."""
    check_output(path, overwrite=overwrite, resume=resume, inputs=inputs or (), occupied=_occupied,
                        error=_output_error)


PREVIOUS_LOG = "metrics.previous.jsonl"
NO_DECAY = dict(weight_decay=0.0)  # an optimizer parameter group's default (see _model_phase)


def prepare_output_dir(path: Path, overwrite: bool, resume: bool = False,
                       inputs: list[tuple[str, Path]] | None = None) -> None:
    """Create the output folder and check it is writable; a fresh run starts a new log and
    drops the checkpoints of an earlier one (``--overwrite``).

    The adapter already in the folder stays until the new one replaces it, and so does its
    log: ``metrics.jsonl`` is renamed to ``metrics.previous.jsonl``, which the run deletes
    once its adapter is saved. If the new run fails, the folder still holds the old adapter
    with its log beside it. While ``metrics.previous.jsonl`` exists it is the adapter's log
    (an earlier overwrite failed), so the ``metrics.jsonl`` of that failed run is dropped
    instead of replacing it."""
    check_output_dir(path, overwrite, resume, inputs)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RecipeError([f"output.dir: cannot write to {path} ({exc.strerror or exc})"]) from None
    if not resume:
        log, previous = path / "metrics.jsonl", path / PREVIOUS_LOG
        if not (path / WEIGHTS_FILE).exists():  # no adapter: no log to keep for it
            previous.unlink(missing_ok=True)
            log.unlink(missing_ok=True)
        elif previous.exists():
            log.unlink(missing_ok=True)
        elif log.exists():
            log.rename(previous)
        clear_checkpoints(path)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def run(recipe: Recipe, *, plugins: PluginSystem | None = None, console: Console | None = None,
        overwrite: bool | None = None, show_progress: bool = True, resume: bool = False) -> RunResult:
    """Train ``recipe`` and save its adapter. Returns the before/after metrics.

    ``resume``: continue the run in the recipe's output folder from its last checkpoint
    (refused when there is none or the recipe changed in a way that changes training)."""
    t = recipe.training
    with terminate_as_interrupt(), grouped_query_sdpa(not uses_cuda(t.device) and t.attention == "auto"):
        return _run(recipe, plugins=plugins, console=console, overwrite=overwrite, show_progress=show_progress, resume=resume)


def _run(recipe: Recipe, *, plugins: PluginSystem | None, console: Console | None, overwrite: bool | None,
         show_progress: bool, resume: bool) -> RunResult:
    """The run as a table of contents: each phase below takes what the earlier ones made."""
    plugins = plugins or get_plugin_system()
    out = recipe.output_dir
    if resume and overwrite:
        raise RecipeError(["--resume continues the run in output.dir and --overwrite replaces it; pass one of them"])
    overwrite = (recipe.spec.output.overwrite if overwrite is None else overwrite) and not resume
    inputs = run_inputs(recipe)
    check_output_dir(out, overwrite, resume, inputs)  # nothing is written before the data and model load
    resuming = resume_point(out, recipe.raw, str(recipe.source or "the recipe")) if resume else None
    process = _start_process(recipe, console or Console(stderr=True), show_progress, plugins)
    data = _data_phase(recipe, plugins, process)
    _open_output(process, out, overwrite, resuming, inputs)
    if not resuming:  # a resumed log keeps the first run's record
        process.log(_data_summary(data))
    scoring = _Scoring.for_run(recipe, data, process, plugins)
    reference = _reference_phase(recipe, data, process, scoring)
    before = _score_base(recipe, data, scoring, resuming)
    trainee = _model_phase(recipe, data, process, reference)
    state = RunState(recipe, data.task, trainee.model, data.tokenizer, data.base.info, out, trainee.total_steps,
                     resumed=resuming is not None)
    checkpointer = Checkpointer(out, recipe.raw, every=data.training.checkpoint_every, keep=data.training.checkpoint_keep,
                                model=trainee.model, optimizer=trainee.optimizer, scheduler=trainee.scheduler,
                                regularizers=data.regularizers, unwrap=process.accelerator.unwrap_model,
                                rank=process.rank, world=process.world, sharded=trainee.sharded)
    if resuming:
        note = checkpointer.restore(resuming, state, data.train_count)
        _resume_plan(trainee, state, data.training, process, resuming)
        process.console.print(f"resuming from {resuming.path} (step {state.step} of {trainee.total_steps})")
        if note:
            process.console.print(f"[yellow]{note}[/]")
    elif trainee.planner is not None:
        plan = trainee.planner.plan
        process.console.print(f"budget {plan.budget}: {plan.total_steps:,} steps ({plan.reason})" if plan.final else
                              f"budget {plan.budget}: the steps are chosen after the first {CALIBRATION_STEPS + 1} are timed")
    with tracked(recipe, plugins, state, main=process.main):  # the recipe's trackers, closed however the run ends
        plugins.call_lifecycle("on_train_start", run=state)
        if data.training.eval_before and not resuming:
            scoring.log_test(state, "before", before)
        if resuming and resuming.meta.get("finished"):  # trained to the end; saving the adapter failed (_rescue)
            train_seconds = float(resuming.meta["train_seconds"])
            restore_rng(checkpointer.own_state(resuming)[0]["rng"])
        else:
            train_seconds = _loop_phase(recipe, data, process, trainee, scoring, state, checkpointer, before, resuming)
        log_bytes = process.log_size()  # a rescue checkpoint resumes from here: the final evaluation runs again
        with process.console.status("evaluating the adapter"):
            after, _ = _evaluate_and_decide("after", state, scoring, trainee, data.regularizers, process.console)
        return _artifact_phase(recipe, data, process, trainee, scoring, state, checkpointer,
                               before=before, after=after, train_seconds=train_seconds, log_bytes=log_bytes)


# -- the phases' typed state --------------------------------------------------------------


@dataclass
class _Process:
    """This process's place in the run (in a data-parallel run, started by ``plugtune run
    --nproc``, accelerate launch or torchrun, every process runs :func:`_run`; only the main
    one writes, logs, evaluates and checkpoints, see core/training/launch.py)."""

    accelerator: Any
    console: Console
    show_progress: bool
    metrics_log: Path
    precision: TrainingPrecision | None = None  # training.precision's outcome, kept in the manifest
    host_memory: str = ""  # what training.malloc_mmap_threshold did (runtime.configure_host_allocator), in the manifest
    sharded: bool = False  # training.distributed: fsdp over several processes (core/training/sharding.py)

    @property
    def main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def world(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to ``metrics.jsonl`` (main process only); the records' shapes
        are documented in core/training/metrics_log.py."""
        if not self.main:
            return
        try:
            with open(self.metrics_log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk: the checkpoints on disk stay whole, a resume cuts the log back
            raise TrainingError(f"could not append to {self.metrics_log} ({exc.strerror or exc}); the last checkpoint "
                                f"is intact; free space, then continue with --resume") from None

    def log_size(self) -> int:
        return self.metrics_log.stat().st_size if self.main and self.metrics_log.exists() else 0

    def on_main(self, compute: Any, everywhere: bool = False) -> Any:
        """``compute()`` on the main process, its result shared with the others. ``everywhere``:
        every process computes (a sharded model's forward passes are collectives) and the main
        process's result is the one kept, so that all agree on what follows from it."""
        if self.world == 1:
            return compute()
        from accelerate.utils import broadcast_object_list

        result = compute() if self.main or everywhere else None
        return broadcast_object_list([result if self.main else None], from_process=0)[0]

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order, on every process (a collective)."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered


@dataclass
class _Data:
    """What the data phase made: the task (labels inferred), the base model and tokenizer,
    the built regularizers, the encoded splits, and the training block with ``max_length``
    fitted to the model's context."""

    task: Task
    base: LoadedBase
    training: TrainingBlock
    regularizers: list[tuple[str, Any]]
    train_rows: list[Row]  # a streamed split: the encoded rows of its in-memory sample (core/data/streaming.py)
    test_rows: list[Row]
    sources: MixedData | None = None  # each source's counts (core/data/mixture.py)
    stream: StreamedTraining | None = None  # the training split, when the loader streams it
    method: Any = None  # the built tuning method (before the base: its base_loading may load it)

    @property
    def tokenizer(self) -> Any:
        return self.base.tokenizer

    @property
    def train_count(self) -> int:
        """The training rows a checkpoint records (0 for a stream: it has no length)."""
        return 0 if self.stream is not None else len(self.train_rows)


@dataclass
class _Trainee:
    """What the model phase made: the prepared model (accelerate-wrapped, and unwrapped for
    evaluation outside DDP), its optimizer and schedule, and how the loss is computed."""

    method: Any
    model: torch.nn.Module
    unwrapped: torch.nn.Module
    optimizer: Any
    scheduler: Any
    trainable: int
    total: int
    total_steps: int
    head: torch.nn.Module | None
    label_only: bool
    lengths: list[int] | None
    own_loss: Any = None  # the task, when it computes its own loss (ComputesLoss)
    reference: references.LiveReference | None = None  # reference scores computed in every step
    planner: BudgetPlanner | None = None  # training.budget: chooses total_steps (core/training/budget.py)
    rates: ChosenRates | None = None  # learning_rate: auto's choice (core/training/rates.py)
    packing: bool = False  # training.packing as decided for this run (core/data/packing.py)
    sharded: bool = False  # the model is sharded with FSDP (training.distributed: fsdp, several processes)
    state_bytes: dict[str, int] | None = None  # this process's training state after the first step (sharding.py)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The method's adapter tensors, whole: of a sharded model each process gathers its
        shards with the others' (so every process calls it at the same point)."""
        state = self.method.adapter_state(self.unwrapped)
        return sharding.full_tensors(state) if self.sharded else state


@dataclass
class _Scoring:
    """The recipe's evaluators over the test rows (or the first training rows), logged."""

    process: _Process
    plugins: PluginSystem
    task: Task
    evaluators: list[Any]
    kwargs: dict[str, Any]
    test_rows: list[Row]
    train_rows: list[Row]
    train_examples: int | None
    directions: MetricDirections

    @classmethod
    def for_run(cls, recipe: Recipe, data: _Data, process: _Process, plugins: PluginSystem) -> _Scoring:
        t = data.training
        evaluators = [guarded(b.build(data.task), b.component) for b in recipe.evaluators]
        kwargs = dict(batch_size=t.eval_batch_size or t.batch_size * 2, pad_id=data.tokenizer.pad_token_id,
                      device=process.device, tokenizer=data.tokenizer, max_new_tokens=t.max_new_tokens,
                      max_length=t.max_length, logits_on_labels_only=t.logits_on_labels_only)
        return cls(process, plugins, data.task, evaluators, kwargs, data.test_rows, data.train_rows, t.eval_train_examples,
                   recipe.metric_directions())

    def score(self, model: torch.nn.Module, rows: list[Row]) -> dict[str, float]:
        """The evaluators' metrics of ``model`` on ``rows`` (computed on the main process)."""
        return self.score_lazily(lambda: model, rows)

    def score_lazily(self, model: Any, rows: list[Row]) -> EvalMetrics:
        """:meth:`score` of the module ``model()`` returns, called on the main process only."""
        with self.process.accelerator.autocast():
            metrics = self.process.on_main(lambda: evaluate(model(), rows, self.task, self.evaluators, **self.kwargs),
                                           everywhere=self.process.sharded)
        return EvalMetrics(metrics, self.directions, details=metrics.details)

    def log_test(self, state: RunState, tag: str, metrics: dict[str, float]) -> EvalMetrics:
        metrics = metrics if isinstance(metrics, EvalMetrics) else EvalMetrics(metrics, self.directions)
        self.process.log({"event": "eval", "split": "test", "step": state.step, "when": tag, **metrics,
                          **({"details": metrics.details} if metrics.details else {})})
        self.plugins.call_lifecycle("on_evaluate", run=state, split="test", step=state.step, metrics=metrics)
        return metrics

    def test(self, state: RunState, model: torch.nn.Module, tag: str) -> EvalMetrics:
        with self.process.accelerator.autocast():
            return self.log_test(state, tag, self.score(model, self.test_rows))

    def train(self, state: RunState, model: torch.nn.Module, tag: str = "after") -> dict[str, float]:
        """The evaluators on the first ``eval_train_examples`` training rows (train-dev gap)."""
        if not self.train_examples:
            return {}
        with self.process.console.status("evaluating on training rows"):
            metrics = self.score(model, self.train_rows[: self.train_examples])
        self.process.log({"event": "eval", "split": "train", "step": state.step, "when": tag, **metrics})
        return metrics


# -- the phases ----------------------------------------------------------------------------


def _start_process(recipe: Recipe, console: Console, show_progress: bool, plugins: PluginSystem) -> _Process:
    """Threads, allocator and accelerate for this process, before anything is allocated."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    t = recipe.training
    on_cuda = uses_cuda(t.device)
    if not on_cuda:
        torch.set_num_threads(choose_threads(t.threads, local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    allocator = configure_host_allocator(t.malloc_mmap_threshold, on_cuda)  # before the model and activations are allocated
    precision = choose_run_precision(recipe, on_cuda, plugins)
    _forget_other_precision(precision.mixed_precision)
    accelerator = Accelerator(
        cpu=not on_cuda,
        mixed_precision=precision.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        # batch_size is the global batch, split among the processes: the scheduler steps once per step
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    if not accelerator.is_main_process:
        console, show_progress = Console(quiet=True), False
    if precision.probed:
        console.print(f"precision {precision.reason}")
    return _Process(accelerator, console, show_progress, recipe.output_dir / "metrics.jsonl", precision, host_memory=allocator)


def _forget_other_precision(mixed_precision: str) -> None:
    """accelerate keeps one mixed precision per process (``AcceleratorState`` is a singleton that
    refuses another). A later run in the same process (a notebook, a sweep, a test) may choose
    another: the accelerator part of the state is cleared for it (``_reset_state``, what
    accelerate's own tests do), the process group (``PartialState``) is kept."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()


def choose_run_precision(recipe: Recipe, on_cuda: bool, plugins: PluginSystem) -> TrainingPrecision:
    """``training.precision`` for this run (core/training/runtime.py). ``auto`` on a CPU probes
    the model's shapes, read from its configuration (never its weights), except where every
    process of a data-parallel run would have to agree on timings of its own, or where the
    method loads the base quantized itself (its kernels set their own compute dtype)."""
    t = recipe.training
    config = None
    if t.precision == "auto" and not on_cuda:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return TrainingPrecision("auto", "no", "fp32: a data-parallel CPU run does not probe (its processes must agree)")
        if hasattr(recipe.method.component.obj, "base_loading"):
            return TrainingPrecision("auto", "no", f"fp32: {recipe.method.name} loads its base quantized and sets its own compute dtype")
        from plugtune.artifacts.outline import outline_for

        outline = outline_for(recipe.spec.base_model, recipe.task, plugins)
        try:
            config = outline.config if outline is not None else None
        except PlugtuneError:  # an unreadable configuration: the load reports it; the probe is skipped
            config = None
    return training_precision(t.precision, on_cuda, config, t.batch_size * max(1, t.max_length // 2))


def _data_phase(recipe: Recipe, plugins: PluginSystem, process: _Process) -> _Data:
    """Load the splits, the base model and tokenizer; augment and tokenize the splits."""
    from accelerate.utils import set_seed

    t, console = recipe.training, process.console
    on_cuda = uses_cuda(t.device)
    set_seed(t.seed)
    task = copy.deepcopy(recipe.task)
    mixed = recipe.load_data(t.seed, task)  # every source, normalized and mixed (core/data/mixture.py)
    # a streamed training split is set aside; its first rows stand in for it in memory
    splits, stream = mixed.splits, mixed.stream
    for note in mixed.notes:
        console.print(note)
    check_empty_fields(splits, task)
    task.setup(splits["train"])
    cpu_bf16 = not on_cuda and process.precision is not None and process.precision.mixed_precision == "bf16"
    dtype = base_dtype(t.base_dtype, on_cuda, getattr(recipe.method.component.obj, "trains_base_weights", False),
                       cpu_bf16=cpu_bf16)
    # built before the base loads: the method may load it itself (base_loading: quantized)
    method = guarded(recipe.method.build(), recipe.method.component)
    loading = getattr(method, "base_loading", None)
    with console.status(f"loading {recipe.spec.base_model} ({str(dtype).replace('torch.', '')})"):
        base = load_base(recipe.spec.base_model, task, seed=t.seed, plugins=plugins, dtype=dtype,
                         attn_implementation=choose_attention(t.attention, on_cuda),
                         loading=loading, loaded=getattr(method, "base_loaded", None), device=str(process.device))
    if cpu_bf16 and t.attention == "auto":
        use_fp32_attention(base.model)  # torch's CPU attention is slower in bf16 (core/training/runtime.py)
    tokenizer = base.tokenizer
    bind_tokenizer(task, tokenizer)
    t = t.model_copy(update={"max_length": fit_to_context(t.max_length, base.model, console)})
    regularizers = [(b.name, guarded(b.build(), b.component)) for b in recipe.regularizers]
    train_examples = splits["train"]
    for name, reg in regularizers:
        if hasattr(reg, "augment_examples"):
            if stream is not None:  # refused at validation; kept here for recipes built without it
                raise RecipeError([f"regularizers: {name} rewrites the training rows in memory, which a streamed "
                                   f"training split never is; drop it or stop streaming"])
            before_count = len(train_examples)
            train_examples = reg.augment_examples(train_examples, task)
            console.print(f"{name}: {before_count} -> {len(train_examples)} training examples")
    # Each split is tokenized once, training.overlong applied on the way (core/datacheck.py), or
    # read from the cache with the same outcome; the tokenizer is fingerprinted once per run.
    fingerprint = tokenizer_fingerprint(tokenizer) if t.cache_tokenized else None
    encoded, hits = {}, []
    for split, examples in (("train", train_examples), ("test", splits["test"])):
        prepared, hit = cached_encode(
            examples, task, tokenizer, t.max_length, split, fingerprint=fingerprint, overlong=t.overlong,
            enabled=t.cache_tokenized, encode=lambda e=examples, s=split: prepare_split(e, task, tokenizer, t.max_length, t.overlong, s))
        encoded[split] = report_overlong(prepared, t.max_length, split, console)
        mixed.count_encoded(split, encoded[split][0], policy=t.overlong, max_length=t.max_length,
                            cut=prepared.cut, dropped=prepared.dropped)
        if hit:
            hits.append(split)
    for split in hits:
        console.print(f"{split}: tokenized rows from the cache")
    (train_rows, train_cut), (test_rows, test_cut) = encoded["train"], encoded["test"]
    for split, rows in (("train", train_rows), ("test", test_rows)):
        line = turns_cut_line(rows, split, t.max_length)
        if line:
            console.print(line)
    if t.max_eval_examples:
        test_rows = test_rows[: t.max_eval_examples]
    if not train_rows:
        raise DataError("no training rows left after encoding (check the templates and training.max_length)")
    if train_cut or test_cut:
        console.print(f"[yellow]{train_cut} train and {test_cut} test rows exceed max_length={t.max_length} and were truncated or dropped[/]")
    for line in mixed.lines() if mixed.mixture else ():
        console.print(line, markup=False, highlight=False)
    if stream is None:
        return _Data(task, base, t, regularizers, train_rows, test_rows, mixed, method=method)
    streamed = StreamedTraining(stream, task, tokenizer, max_length=t.max_length, overlong=t.overlong,
                                batch_size=t.batch_size, seed=t.seed)
    console.print(f"train: streamed, shuffled through a buffer of {streamed.buffer_size} rows and tokenized on the fly")
    return _Data(task, base, t, regularizers, train_rows, test_rows, mixed, streamed, method=method)


def _open_output(process: _Process, out: Path, overwrite: bool, resuming: Checkpoint | None,
                 inputs: list[tuple[str, Path]]) -> None:
    """The run's first write: the output folder, and the log cut back to the checkpoint's."""
    if process.main:
        prepare_output_dir(out, overwrite, resuming is not None, inputs)
        if resuming:
            truncate_log(process.metrics_log, int(resuming.meta["metrics_bytes"]))
    process.accelerator.wait_for_everyone()


def _data_summary(data: _Data) -> dict[str, Any]:
    """The log's ``data`` record (core/training/metrics_log.py): rows and token lengths per
    split, each source's counts."""
    return data_record({"train": data.train_rows, "test": data.test_rows},
                       data.sources.records() if data.sources is not None else None, streamed=data.stream is not None)


def _score_base(recipe: Recipe, data: _Data, scoring: _Scoring, resuming: Checkpoint | None) -> dict[str, float]:
    """"before" is the base model itself, evaluated before the method touches it (a prefix or
    a new head starts random; that is not the base's score). A resumed run keeps its own."""
    if resuming:
        return dict(resuming.meta["before"])
    if not data.training.eval_before:
        return {}
    device = scoring.process.device
    with scoring.process.console.status("evaluating the base model"):
        return scoring.score_lazily(lambda: data.base.model.to(device), data.test_rows)


@dataclass
class _Reference:
    """How a task with a reference gets its scores in this run (core/training/reference.py):
    the resolved mode, and the frozen copy of the base for ``copy``."""

    mode: str
    copy: torch.nn.Module | None = None


def _reference_phase(recipe: Recipe, data: _Data, process: _Process, scoring: _Scoring) -> _Reference | None:
    """Before the method touches the base: the evaluation rows' reference scores (the base is
    the reference), the training rows' too for ``precomputed``, a copy of the base for
    ``copy``. Nothing for a task without a reference."""
    task = data.task
    if not references.has_reference(task):
        return None
    rewrites = [name for name, reg in data.regularizers if hasattr(reg, "transform_batch")]
    mode = references.choose_mode(task.reference, data.method, streamed=data.stream is not None,
                                  rewrites_batches=bool(rewrites))
    problems = references.mode_problems(mode, data.method, recipe.method.name, streamed=data.stream is not None,
                                        rewrites_batches=rewrites)
    if problems:
        raise RecipeError(problems)
    t, model = data.training, data.base.model.to(process.device)
    rows = data.test_rows + (data.train_rows if mode == "precomputed" else [])
    with process.console.status(f"reference scores of {len(rows)} rows from the base"):
        references.precompute(model, rows, task, batch_size=t.eval_batch_size or t.batch_size * 2,
                              pad_id=data.tokenizer.pad_token_id, device=process.device,
                              autocast=process.accelerator.autocast)
    how = {"adapter_off": f"the base with the {recipe.method.name} adapter switched off, in every step; no second model",
           "precomputed": "the base, scored once before training; no second model",
           "copy": "a frozen copy of the base kept in memory"}[mode]
    process.console.print(f"reference: {mode} ({how})")
    return _Reference(mode, references.frozen_copy(model) if mode == "copy" else None)


def _model_phase(recipe: Recipe, data: _Data, process: _Process, reference: _Reference | None = None) -> _Trainee:
    """The method prepares the base; regularizers set up; optimizer and schedule are built
    and everything goes through ``accelerator.prepare``."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    t, task, regularizers = data.training, data.task, data.regularizers
    set_seed(t.seed)
    method = data.method
    if data.stream is not None and not t.max_steps and t.budget is None:
        raise RecipeError(["training.max_steps: the training split is streamed and has no length to count epochs "
                           "in; set training.max_steps or training.budget"])
    batches_per_epoch = math.ceil(len(data.train_rows) / t.batch_size)  # what epoch_batches cuts, grouped or not
    steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum)
    epoch_steps = max(1, math.ceil(t.epochs * steps_per_epoch))
    planner = _budget_planner(t, data, epoch_steps, process)
    total_steps = planner.initial_steps().total_steps if planner else (t.max_steps or epoch_steps)
    context = PrepareContext(new_parameters=data.base.new_parameters, tokenizer=data.tokenizer, seed=t.seed,
                             device=str(process.accelerator.device), total_steps=total_steps)
    model = call_prepare(method, data.base.model, task, context)
    fp32_master_weights(model)
    trainable, total = count_parameters(model)
    process.sharded = _shard(model, t, process)  # before the optimizer: it must hold the sharded parameters
    for _, reg in regularizers:
        if hasattr(reg, "setup"):
            reg.setup(model, task, data.tokenizer)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": [p for _, p in named]}]
    for _, reg in regularizers:
        if hasattr(reg, "param_groups"):
            groups = reg.param_groups(named)
    # A group decays nothing unless a regularizer's param_groups says so (torch's AdamW and
    # bitsandbytes' would otherwise decay every weight by their own default of 0.01).
    groups = [dict(NO_DECAY, **group) for group in groups]
    rate, rates = _learning_rate(t, method, data, process, named)
    if rates is not None and rates.head is not None:
        groups = with_head_rate(groups, named, data.base.new_parameters, rates.head)
    make_optimizer = getattr(method, "optimizer", None)
    optimizer = make_optimizer(groups, rate) if make_optimizer else torch.optim.AdamW(groups, lr=rate)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps)
    if process.sharded:  # FSDP2 already wraps the model; accelerate would wrap it in DDP too
        optimizer, scheduler = process.accelerator.prepare(optimizer, scheduler)
    else:
        model, optimizer, scheduler = process.accelerator.prepare(model, optimizer, scheduler)
    unwrapped = process.accelerator.unwrap_model(model)  # evaluation runs on the main process, outside DDP
    # a stream is shuffled through a buffer instead of grouped by length (its lengths are never all known)
    lengths = [len(r["input_ids"]) for r in data.train_rows] if t.group_by_length and data.stream is None else None
    label_only = (t.logits_on_labels_only and not task.is_classification
                  and supports_label_positions(unwrapped, [reg for _, reg in regularizers]))
    own_loss = task if hasattr(task, "training_loss") else None
    live = None
    if reference is not None and reference.mode == "adapter_off":
        live = references.LiveReference(task, unwrapped, method.adapter_disabled)
    elif reference is not None and reference.mode == "copy":
        live = references.LiveReference(task, reference.copy)
    packing = _decide_packing(t, task, data, unwrapped, process, recipe.method.name)
    return _Trainee(method, model, unwrapped, optimizer, scheduler, trainable, total, total_steps,
                    output_head(unwrapped), label_only and own_loss is None, lengths, own_loss, live, planner, rates,
                    packing, sharded=process.sharded)


def _decide_packing(t: TrainingBlock, task: Any, data: _Data, model: torch.nn.Module, process: _Process,
                    method_name: str) -> bool:
    """Whether this run packs its batches (``training.packing``): ``true`` checks the loaded
    model's attention too (a one-line error naming the field); ``auto`` follows
    :func:`~plugtune.training.runtime.choose_packing` where packing is possible. Printed once
    when it packs."""
    problem = packing_problem(task, data.method, method_name, data.regularizers) or attention_problem(model)
    if t.packing is True and problem:
        raise RecipeError([f"training.packing: {problem}; set training.packing: false (or auto)"])
    packing = t.packing is True or (t.packing == "auto" and problem is None
                                    and choose_packing(process.device.type == "cuda"))
    if packing:
        process.console.print("packing: several examples per row, each with its own positions and attention")
    return packing


def _shard(model: torch.nn.Module, t: TrainingBlock, process: _Process) -> bool:
    """``training.distributed: fsdp``: shard the prepared model over the processes (FSDP2,
    core/training/sharding.py); a single process has nothing to shard and trains as under
    ``ddp`` (said once). Returns whether the model is sharded."""
    if t.distributed != sharding.FSDP:
        return False
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # accelerate's own FSDP would wrap it again
        raise RecipeError(["training.distributed: fsdp shards the model itself; launch with an accelerate config of "
                           "distributed_type MULTI_GPU (or torchrun), not accelerate's distributed_type FSDP"])
    if process.world == 1:
        process.console.print("training.distributed: fsdp with one process: nothing to shard, training unsharded")
        return False
    units = sharding.shard_model(model)
    process.console.print(f"fsdp: parameters, gradients and optimizer state sharded over {process.world} processes "
                          f"({units} decoder layers + the root)")
    return True


def fp32_master_weights(model: torch.nn.Module) -> int:
    """Every trainable weight in fp32, whatever the frozen base's dtype: a bf16 base (a GPU, or a
    CPU run in bf16) hands a new classification head, or a module a method trains whole, over
    in bf16, where AdamW's small updates would round away. Autocast computes with bf16 copies.
    Returns how many tensors changed."""
    changed = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
            changed += 1
    return changed


def _learning_rate(t: TrainingBlock, method: Any, data: _Data, process: _Process,
                   named: list[tuple[str, Any]]) -> tuple[float, ChosenRates | None]:
    """``training.learning_rate``, or with ``auto`` the rule's choice (printed once)."""
    if t.learning_rate != "auto":
        return float(t.learning_rate), None
    trains_new_layer = any(is_new_parameter(n, data.base.new_parameters) for n, _ in named)
    rates = choose_rates(method, data.base.model.config, t.batch_size * t.grad_accum, trains_new_layer)
    process.console.print(rates.describe())
    return rates.adapter, rates


def _budget_planner(t: TrainingBlock, data: _Data, epoch_steps: int, process: _Process) -> BudgetPlanner | None:
    """The planner for ``training.budget`` (None without one). A step's tokens: the rows it
    takes (the global batch times grad_accum) times the training rows' mean length;
    ``max_steps``, or else explicit ``epochs``, caps the steps (a stream has no epochs)."""
    budget = t.parsed_budget()
    if budget is None:
        return None
    mean_length = sum(len(r["input_ids"]) for r in data.train_rows) / max(len(data.train_rows), 1)
    cap, source = None, ""
    if t.max_steps:  # max_steps overrides epochs, as it does without a budget (and in transformers' Trainer)
        cap, source = t.max_steps, f"training.max_steps ({t.max_steps})"
    elif "epochs" in t.model_fields_set and data.stream is None:
        cap, source = epoch_steps, f"training.epochs ({t.epochs})"
    return BudgetPlanner(budget, mean_length * t.batch_size * t.grad_accum, cap=cap, cap_source=source)


def _apply_plan(plan: Plan, trainee: _Trainee, state: RunState, t: TrainingBlock, process: _Process) -> None:
    """Adopt a new horizon: the schedule rebuilt over it from this step, the counters and the
    log told, one line printed."""
    trainee.total_steps = state.total_steps = plan.total_steps
    rebuild_schedule(trainee.scheduler, t.scheduler, t.warmup_steps, plan.total_steps, state.step)
    process.log({"event": "plan", "step": state.step, **plan.record()})
    process.console.print(f"budget {plan.budget}: {plan.total_steps:,} steps ({plan.reason})")


def _evaluate_and_decide(tag: str, state: RunState, scoring: _Scoring, trainee: _Trainee,
                         regularizers: list[tuple[str, Any]], console: Console) -> tuple[dict[str, float], bool]:
    """Evaluate on the test rows and let regularizers decide (``after_evaluate``): the
    weights marked best become ``state.best``; returns the metrics and whether to stop."""
    metrics = scoring.test(state, trainee.unwrapped, tag)
    stop = False
    for name, reg in regularizers:
        decision: Decision | None = reg.after_evaluate(metrics, state.step) if hasattr(reg, "after_evaluate") else None
        if decision is None:
            continue
        if decision.best:  # a copy: on the CPU adapter_state's tensors share the live weights' storage
            state.best = BestWeights(step=state.step, metrics=dict(metrics),
                                     state={k: v.clone() for k, v in trainee.adapter_state().items()},
                                     train=scoring.train(state, trainee.unwrapped, "best"))  # scored now: these weights may not be the last
        if decision.stop:
            stop = True
            console.print(f"{name}: stopping at step {state.step}")
    return metrics, stop


def _loop_phase(recipe: Recipe, data: _Data, process: _Process, trainee: _Trainee, scoring: _Scoring,
                state: RunState, checkpointer: Checkpointer, before: dict[str, float],
                resuming: Checkpoint | None) -> float:
    """The training loop, up to the last step or a regularizer's stop; checkpoints at the
    cadence and on Ctrl-C. Returns the seconds trained (with those before a resume)."""
    t, accelerator, device, world = data.training, process.accelerator, process.device, process.world
    model, scheduler, regularizers = trainee.model, trainee.scheduler, data.regularizers
    total_steps = trainee.total_steps
    pad_id = data.tokenizer.pad_token_id
    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=process.console, disable=not process.show_progress,
    )
    bar = progress.add_task("train", total=total_steps, completed=state.step, loss=float("nan"),
                            lr=trainee.scheduler.get_last_lr()[0], tps=0.0)
    model.train()
    earlier_seconds = float(resuming.meta["train_seconds"]) if resuming else 0.0
    started = time.perf_counter()
    window_tokens, window_start, window_loss, window_micro = 0, time.perf_counter(), 0.0, 0
    window_cpu = time.process_time()  # CPU seconds of all threads: the step's work, whatever else shares the cores
    window_rows_tokens = 0  # the global batch's real tokens this step, as the budget counts them
    window_computed = 0  # positions the model ran over this step, padding included (FLOP/s in bench/throughput.py)
    planner = trainee.planner
    if planner is not None:
        planner.spent, planner.start_step = earlier_seconds, state.step
    if resuming:
        restore_rng(checkpointer.own_state(resuming)[0]["rng"])  # last: everything before drew from the RNGs as the first run did
    stop = False
    with progress, StopRequest() as interrupt:
        while state.step < total_steps:
            for batch_index, rows in _epoch(data, trainee, state):
                if world > 1:  # t.batch_size is the global batch; each process takes its rows of it
                    if len(rows) < world:
                        continue  # a tail batch too small to give every process a row: all skip it
                    window_rows_tokens += sum(len(r["input_ids"]) for r in rows)
                    rows = shard(rows, process.rank, world)
                else:
                    window_rows_tokens += sum(len(r["input_ids"]) for r in rows)
                batch, real_tokens = _layout(rows, data, trainee, pad_id)
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                for _, reg in regularizers:
                    if hasattr(reg, "transform_batch"):
                        batch = reg.transform_batch(batch, state.step)
                with accelerator.accumulate(model):
                    outputs, batch_tokens, terms = _micro_step(model, trainee, batch, regularizers, state, accelerator, t,
                                                               real_tokens)
                window_tokens += batch_tokens
                window_computed += batch["input_ids"].numel() * world
                window_loss += float(outputs.loss.detach())
                window_micro += 1
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                state.batch = batch_index + 1
                if planner is not None:  # before the record: its lr is the next step's, under the new plan
                    total_steps, stop = _follow_budget(planner, state, trainee, t, process, window_rows_tokens,
                                                       time.perf_counter() - started, stop)
                    progress.update(bar, total=total_steps)
                window_rows_tokens = 0
                elapsed = time.perf_counter() - window_start
                record = {
                    "event": "train", "step": state.step, "loss": window_loss / window_micro,
                    "lr": scheduler.get_last_lr()[0], "tokens_per_s": window_tokens / elapsed if elapsed else 0.0,
                    "tokens": window_tokens, "computed_tokens": window_computed, "step_seconds": elapsed,
                    "step_cpu_seconds": time.process_time() - window_cpu,
                    **terms,
                }
                for name, reg in regularizers:
                    if hasattr(reg, "report"):
                        record.update({f"{name}/{k}": v for k, v in reg.report(model).items()})
                window_tokens, window_start, window_loss, window_micro, window_computed = 0, time.perf_counter(), 0.0, 0, 0
                window_cpu = time.process_time()
                state.history.append(record)
                if state.step % t.log_every == 0 or state.step == total_steps:
                    process.log(record)
                if state.step == 1 and world > 1:
                    _log_state_bytes(process, trainee, t)
                progress.update(bar, advance=1, loss=record["loss"], lr=record["lr"], tps=record["tokens_per_s"])
                scoring.plugins.call_lifecycle("on_step_end", run=state, step=state.step, metrics=record)
                if t.eval_every and state.step % t.eval_every == 0 and state.step < total_steps:
                    stop = _evaluate_and_decide("during", state, scoring, trainee, regularizers, process.console)[1] or stop
                stopping = interrupt.requested
                if world > 1:
                    # Ctrl-C (forwarded by the launcher) may reach the processes at different steps;
                    # all must agree before the checkpoint, a collective, or one would wait forever.
                    stopping = bool(accelerator.reduce(torch.tensor([int(stopping)], device=device), reduction="sum").item())
                if (checkpointer.due(state.step) and state.step < total_steps and not stop) or stopping:
                    saved = checkpointer.save(state, before=before, metrics_log=process.metrics_log, train_rows=data.train_count,
                                              train_seconds=earlier_seconds + time.perf_counter() - started)
                    if stopping:
                        raise Interrupted(f"stopped at step {state.step} of {total_steps}; checkpoint saved to {saved}; "
                                          f"continue with: {resume_command(recipe, world)}")
                if state.step >= total_steps or stop:
                    break
            else:
                state.epoch += 1
                state.batch = 0
            if stop:
                break
    return earlier_seconds + time.perf_counter() - started


def _log_state_bytes(process: _Process, trainee: _Trainee, t: TrainingBlock) -> None:
    """After the first step of a data-parallel run: the training state each process holds
    (parameters, gradients, optimizer state; core/training/sharding.py), logged as a
    ``memory`` record, so that ``ddp`` and ``fsdp`` can be compared (BENCHMARKS.md), with each
    process's peak RSS so far (loading included; the optimizer state exists from this step)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    per_process = process.gather({**(trainee.state_bytes or {}), "peak_rss": peak})
    process.log({"event": "memory", "step": 1, "distributed": t.distributed, "sharded": trainee.sharded,
                 "state_bytes": [p.get("total", 0) for p in per_process],
                 "peak_rss_bytes": [p.get("peak_rss", 0) for p in per_process],
                 **{f"{k}_bytes": [p.get(k, 0) for p in per_process] for k in ("parameters", "gradients", "optimizer")}})


def _resume_plan(trainee: _Trainee, state: RunState, t: TrainingBlock, process: _Process, resuming: Checkpoint) -> None:
    """A resumed budget run keeps the horizon its checkpoint recorded (the schedule the
    checkpoint's optimizer followed), fixed from here on."""
    if trainee.planner is None or "total_steps" not in resuming.meta:
        return
    plan = trainee.planner.fixed(int(resuming.meta["total_steps"]), f"as planned before {resuming.path.name}")
    trainee.total_steps = state.total_steps = plan.total_steps
    rebuild_schedule(trainee.scheduler, t.scheduler, t.warmup_steps, plan.total_steps, state.step)


def _follow_budget(planner: BudgetPlanner, state: RunState, trainee: _Trainee, t: TrainingBlock, process: _Process,
                   step_tokens: int, elapsed: float, stop: bool) -> tuple[int, bool]:
    """After a step under ``training.budget``: time it, make or revise the plan where due (the
    main process's plan, on every process), and stop a single-process run that overran its
    time budget. Returns the horizon and whether to stop."""
    planner.record(state.step, elapsed, step_tokens)
    if planner.due(state.step):
        plan = process.on_main(lambda: planner.replan(state.step, elapsed))
        if planner.adopt(plan):
            _apply_plan(plan, trainee, state, t, process)
    if process.world == 1 and planner.overrun(elapsed) and state.step < trainee.total_steps:
        process.console.print(f"[yellow]budget {planner.budget}: overrun by more than {OVERRUN:.0%} (the machine "
                              f"slowed down); stopping at step {state.step} of {trainee.total_steps}[/]")
        plan = planner.fixed(state.step, f"overrun: stopped past {1 + OVERRUN:.0%} of the budget")
        process.log({"event": "plan", "step": state.step, **plan.record()})
        return trainee.total_steps, True
    return trainee.total_steps, stop


def _layout(rows: list[Row], data: _Data, trainee: _Trainee, pad_id: int) -> tuple[dict[str, Any], int]:
    """This process's rows as the batch the model sees, and their real tokens: the task's
    collate, or with packing the same rows laid several to a row (core/data/packing.py),
    whose batch has no attention mask to count tokens with (a task's own collate: its mask's
    ones, as before packing existed)."""
    if not trainee.packing:
        batch = collate_rows(data.task, rows, pad_id)
        mask = batch.get("attention_mask")
        return batch, int(mask.sum()) if mask is not None else sum(len(r["input_ids"]) for r in rows)
    packed = pack_rows(rows, pad_id, packed_width(rows, data.training.max_length))
    return packed.batch, packed.real_tokens


def _epoch(data: _Data, trainee: _Trainee, state: RunState) -> Iterator[tuple[int, list[Row]]]:
    """``(batch index, encoded rows)`` of ``state.epoch`` from ``state.batch`` on (the batches
    before were consumed before the checkpoint this run resumed from): the seeded order of
    core/batching.py over the rows in memory, or a streamed split's batches made on the fly
    (core/data/streaming.py)."""
    t = data.training
    if data.stream is not None:
        yield from data.stream.batches(state.epoch, start=state.batch)
        return
    order = epoch_batches(len(data.train_rows), t.batch_size, seed=t.seed, epoch=state.epoch, lengths=trainee.lengths)
    for batch_index, indices in enumerate(order):
        if batch_index >= state.batch:
            yield batch_index, [data.train_rows[i] for i in indices]


def _micro_step(model: torch.nn.Module, trainee: _Trainee, batch: dict[str, torch.Tensor],
                regularizers: list[tuple[str, Any]], state: RunState, accelerator: Any,
                t: TrainingBlock, real_tokens: int) -> tuple[Any, int, dict[str, float]]:
    """One micro-batch inside ``accelerator.accumulate``: forward, loss terms, backward, and
    (on a sync step) clipping, ``after_backward`` and the optimizer/scheduler step.
    ``real_tokens``: this process's rows' tokens, padding excluded (counted from the rows: a
    packed batch has no attention mask). Returns the outputs, the global batch's real tokens
    and the logged terms: the regularizers' and, on a sync step, ``grad_norm``."""
    world = accelerator.num_processes
    terms: dict[str, float] = {}
    if trainee.own_loss is not None:
        loss, outputs, batch_tokens, terms = _task_loss(model, trainee, batch, world)
    elif trainee.label_only:
        loss, outputs, batch_tokens = _label_position_loss(model, trainee.head, batch, accelerator, real_tokens)
    else:
        outputs = model(**batch)
        loss, batch_tokens = outputs.loss, real_tokens * world
    for name, reg in regularizers:
        term = reg.loss_term(model, batch, outputs, state.step) if hasattr(reg, "loss_term") else None
        if term is not None:
            loss = loss + term
            terms[f"{name}/loss"] = float(term.detach())
    if not torch.isfinite(loss):
        raise TrainingError(f"loss became {float(loss.detach())} at step {state.step + 1}; lower training.learning_rate or check the data")
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        terms["grad_norm"] = (sharding.grad_norm(model, t.max_grad_norm) if trainee.sharded
                              else _grad_norm(model, accelerator, t.max_grad_norm))
        for name, reg in regularizers:
            if hasattr(reg, "after_backward"):
                terms.update({f"{name}/{k}": v for k, v in (reg.after_backward(model, state.step) or {}).items()})
    trainee.optimizer.step()
    trainee.scheduler.step()
    if accelerator.sync_gradients and trainee.state_bytes is None:  # the state in full: gradients and moments exist
        trainee.state_bytes = sharding.resident_state_bytes(model, trainee.optimizer)
    if accelerator.sync_gradients and hasattr(trainee.method, "on_step"):  # before zero_grad: it may read gradients
        trainee.method.on_step(trainee.unwrapped, state.step + 1)  # the step this optimizer update completes
    trainee.optimizer.zero_grad()
    return outputs, batch_tokens, terms


def _grad_norm(model: torch.nn.Module, accelerator: Any, max_norm: float | None) -> float:
    """The total L2 norm of the gradients before clipping, logged every step as ``grad_norm``;
    clipped to ``max_norm`` when one is set (clipping computes the norm anyway). Without
    clipping it is computed on its own: one norm per gradient and one over those (measured
    in BENCHMARKS.md at well under 1% of a step)."""
    if max_norm:
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    accelerator.unscale_gradients()  # fp16 autocast: take the loss scale out first; a no-op otherwise
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _artifact_phase(recipe: Recipe, data: _Data, process: _Process, trainee: _Trainee, scoring: _Scoring,
                    state: RunState, checkpointer: Checkpointer, *, before: dict[str, float], after: dict[str, float],
                    train_seconds: float, log_bytes: int) -> RunResult:
    """Save the adapter (the best weights when a regularizer kept earlier ones), then finish
    the run. When saving fails the trained weights are kept in a checkpoint first
    (:func:`_rescue`), so ``--resume`` re-saves them without training again."""
    best = state.best
    try:
        if best and best.step != state.step:
            process.console.print(f"keeping the best weights, from step {best.step}")
            adapter_state, after, train_metrics = best.state, best.metrics, best.train
            process.log({"event": "best", "step": best.step, **after})
        else:
            adapter_state = trainee.adapter_state()
            train_metrics = (best.train if best else {}) or scoring.train(state, trainee.unwrapped)
        manifest = _manifest(recipe, data, trainee, state, before=before, after=after, train_metrics=train_metrics,
                             train_seconds=train_seconds, precision=process.precision,
                             host_memory=process.host_memory)
        if process.main:
            save_adapter(recipe.output_dir, state=adapter_state, config=trainee.method.adapter_config(trainee.unwrapped),
                         manifest=manifest.model_dump(mode="json", exclude_unset=True))
    except PlugtuneError as exc:
        raise _rescue(recipe, process, state, checkpointer, exc, before=before, train_seconds=train_seconds,
                      train_rows=data.train_count, log_bytes=log_bytes) from exc
    if process.main:
        clear_checkpoints(recipe.output_dir)  # the adapter is whole: the run is finished
        (recipe.output_dir / PREVIOUS_LOG).unlink(missing_ok=True)  # the replaced adapter's log (--overwrite)
    process.accelerator.wait_for_everyone()
    scoring.plugins.call_lifecycle("on_train_end", run=state, adapter_dir=str(recipe.output_dir), metrics=after)
    return RunResult(recipe.output_dir, before, after, state.step, train_seconds, trainee.trainable, trainee.total, train_metrics)


def _manifest(recipe: Recipe, data: _Data, trainee: _Trainee, state: RunState, *, before: dict[str, float],
              after: dict[str, float], train_metrics: dict[str, float], train_seconds: float,
              precision: TrainingPrecision | None = None, host_memory: str = "") -> Manifest:
    """The adapter's ``plugtune.json``, typed; ``save_adapter`` adds the format, the time
    and the file hashes."""
    component = recipe.method.component
    return Manifest(
        name=recipe.name,
        plugtune_version=__version__,
        method=MethodRecord(name=recipe.method.name, options=recipe.method.options_dict(), plugin=component.plugin.name,
                            distribution=component.plugin.distribution, version=component.plugin.version),
        base_model=BaseRecord.model_validate(data.base.info.to_dict()),
        task=data.task.to_dict(),
        recipe=recipe.raw,
        recipe_dir=str(recipe.base_dir.resolve()),  # relative data paths in the recipe resolve here
        metrics={"before": before, "after": after, **({"train": train_metrics} if train_metrics else {})},
        training={
            "steps": state.step, "train_seconds": round(train_seconds, 2),
            "best_step": state.best.step if state.best else state.step,
            **({"plan": trainee.planner.plan.record()} if trainee.planner and trainee.planner.plan else {}),
            "learning_rate": trainee.rates.record() if trainee.rates else float(data.training.learning_rate),
            **({"precision": precision.record()} if precision else {}),
            **({"host_memory": host_memory} if host_memory else {}),
            "trainable_parameters": trainee.trainable, "total_parameters": trainee.total,
            "train_rows": data.stream.rows_read if data.stream else len(data.train_rows), "test_rows": len(data.test_rows),
            **({"sources": data.sources.records()} if data.sources is not None else {}),
            **({"streamed": True, "train_rows_truncated": data.stream.cut, "train_rows_dropped": data.stream.dropped}
               if data.stream else {}),
        },
    )


def _rescue(recipe: Recipe, process: _Process, state: RunState, checkpointer: Checkpointer, error: PlugtuneError, *,
            before: dict[str, float], train_seconds: float, train_rows: int, log_bytes: int) -> TrainingError:
    """Saving the adapter failed after training: keep the trained weights in a checkpoint of
    the last step and say how to save them again. The checkpoint's log length is the one
    before the final evaluation, so ``--resume`` evaluates and saves as the run would have."""
    reason = str(error)
    if process.world > 1:  # a checkpoint is a collective, and only the main process saw the failure
        return TrainingError(f"saving the adapter failed: {reason}; the trained weights were not kept "
                             f"(data-parallel run); the last checkpoint, if any, continues with: {resume_command(recipe, process.world)}")
    try:
        saved = checkpointer.save(state, before=before, metrics_log=process.metrics_log, train_rows=train_rows,
                                  train_seconds=train_seconds, metrics_bytes=log_bytes, finished=True)
    except Exception as exc:  # noqa: BLE001 - the disk may be what failed; say so rather than hide the first error
        return TrainingError(f"saving the adapter failed: {reason}; keeping the trained weights in a checkpoint "
                             f"failed too ({type(exc).__name__}: {exc}); free space or fix the cause and train again")
    return TrainingError(f"saving the adapter failed: {reason}; the trained weights are kept in {saved}; "
                         f"fix the cause, then save them with: {resume_command(recipe)}")


def _task_loss(model: torch.nn.Module, trainee: _Trainee, batch: dict[str, torch.Tensor],
               world: int) -> tuple[torch.Tensor, Any, int, dict[str, float]]:
    """The loss of a task that computes its own (:class:`~plugtune.kernel.components.ComputesLoss`),
    with the step's reference scores when they are computed live; returns the loss, an
    outputs object for regularizers (``loss``, ``logits`` None), the batch's real tokens (all
    processes) and the task's logged terms."""
    if trainee.reference is not None and REFERENCE not in batch:
        batch[REFERENCE] = trainee.reference.scores(batch)
    result = trainee.own_loss.training_loss(model, batch)
    return result.loss, SimpleNamespace(loss=result.loss.detach(), logits=None), result.tokens * world, dict(result.terms)


def _label_position_loss(model: torch.nn.Module, head: torch.nn.Module | None, batch: dict[str, torch.Tensor],
                         accelerator: Any, real_tokens: int) -> tuple[torch.Tensor, Any, int]:
    """The training loss with logits at the label positions only (core/loss.py): the mean
    over the global batch's label tokens. In a data-parallel run each process divides its
    sum by the global count (times the process count, since DDP averages gradients), so the
    gradient equals a single process's on the whole batch. Returns the loss, an outputs
    object for regularizers (``loss`` = the global mean, ``logits`` None) and the global
    batch's real tokens."""
    token_losses, _ = label_token_losses(model, batch, head)
    local_sum = token_losses.sum()
    world = accelerator.num_processes
    # built on the device: one sync (tolist) per micro-batch rather than one per count
    counts = torch.stack([local_sum.new_tensor(float(token_losses.numel()), dtype=torch.float32),
                          local_sum.detach().float(), local_sum.new_tensor(float(real_tokens), dtype=torch.float32)])
    if world > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    label_tokens, global_sum, real_tokens = counts.tolist()
    loss = local_sum * world / max(label_tokens, 1.0)
    return loss, SimpleNamespace(loss=torch.tensor(global_sum / max(label_tokens, 1.0)), logits=None), int(real_tokens)


def comparison_table(columns: dict[str, dict[str, float]], title: str = "",
                     directions: MetricDirections | None = None) -> Table:
    """A rich table with one row per metric and one column per model/adapter; with exactly
    two columns a third shows the change, green when it is an improvement and red when not,
    by the direction the metric's evaluator declares (``directions``); uncoloured for a
    metric without a declared direction."""
    directions = directions or MetricDirections()
    table = Table(title=title or None)
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    names = list(columns)
    if len(names) == 2:
        table.add_column("change", justify="right")
    metrics = sorted({m for values in columns.values() for m in values})
    for metric in metrics:
        values = [columns[n].get(metric) for n in names]
        cells = [f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in values]
        if len(names) == 2 and all(isinstance(v, (int, float)) for v in values):
            delta = values[1] - values[0]
            better = directions.improved(metric, values[1], values[0])
            colour = "" if better is None or not delta else ("green" if better else "red")
            cells.append(f"[{colour}]{delta:+.4f}[/]" if colour else f"{delta:+.4f}")
        table.add_row(metric, *cells)
    return table
