"""``plugtune run``: the training loop.

One flat loop, readable top to bottom::

    data -> base model -> method.prepare -> evaluate (before)
    for each step: batch -> regularizers.transform_batch -> forward -> loss + loss terms
                   -> backward -> regularizers.after_backward -> optimizer/scheduler step
                   -> log (JSONL + progress bar) -> on_step_end -> evaluate at the cadence
    evaluate (after) -> save the adapter (atomically) -> on_train_end

Devices and mixed precision go through accelerate: the CPU in fp32 by default (bf16 is slow
on CPUs without AVX-512/AMX), a CUDA GPU in bf16 autocast when one is present.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from plugtune import __version__
from plugtune.artifacts.adapters import WEIGHTS_FILE, save_adapter
from plugtune.data.batching import epoch_batches, shard
from plugtune.training.checkpoints import Checkpointer, clear_checkpoints, interrupted_run_message, restore_rng, resume_point, truncate_log
from plugtune.kernel.components import Decision, PrepareContext, call_prepare
from plugtune.data.datacheck import check_empty_fields, fit_to_context, prepare_split, report_overlong
from plugtune.training.evaluation import evaluate
from plugtune.kernel.errors import DataError, RecipeError, TrainingError
from plugtune.kernel.faults import guarded
from plugtune.training.loss import label_token_losses, output_head, supports_label_positions
from plugtune.artifacts.models import BaseInfo, load_base
from plugtune.kernel.registry import PluginSystem, get_plugin_system
from plugtune.training.recipe import Recipe
from plugtune.training.runtime import (
    choose_attention,
    choose_precision,
    choose_threads,
    grouped_query_sdpa,
    set_mmap_threshold,
    uses_cuda,
)
from plugtune.training.signals import Interrupted, StopRequest, resume_command
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


def base_dtype(requested: str, on_cuda: bool, trains_base_weights: bool) -> torch.dtype:
    """The dtype to load the base in. Frozen bases go to bf16 on GPUs (half the memory; the
    adapter weights stay fp32); a method that trains base weights keeps fp32 master weights.
    CPUs without AVX-512/AMX are slow in bf16, so the CPU default is fp32."""
    if requested == "auto":
        return torch.bfloat16 if on_cuda and not trains_base_weights and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]


def check_output_dir(path: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse an output folder this run may not use, before anything is loaded or written:
    not a folder, holding another run (or an interrupted one) without --overwrite/--resume."""
    if path.exists() and not path.is_dir():
        raise RecipeError([f"output.dir: {path} exists and is not a folder"])
    if not resume and path.is_dir() and any(path.iterdir()) and not overwrite:
        raise RecipeError([interrupted_run_message(path)
                           or f"output.dir: {path} already holds a run; pass --overwrite or set output.overwrite: true"])
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RecipeError([f"output.dir: cannot write to {path} ({ancestor} is not a folder)"])


PREVIOUS_LOG = "metrics.previous.jsonl"


def prepare_output_dir(path: Path, overwrite: bool, resume: bool = False) -> None:
    """Create the output folder and check it is writable; a fresh run starts a new log and
    drops the checkpoints of an earlier one (``--overwrite``).

    The adapter already in the folder stays until the new one replaces it, and so does its
    log: ``metrics.jsonl`` is renamed to ``metrics.previous.jsonl``, which the run deletes
    once its adapter is saved. If the new run fails, the folder still holds the old adapter
    with its log beside it. While ``metrics.previous.jsonl`` exists it is the adapter's log
    (an earlier overwrite failed), so the ``metrics.jsonl`` of that failed run is dropped
    instead of replacing it."""
    check_output_dir(path, overwrite, resume)
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
    with grouped_query_sdpa(not uses_cuda(t.device) and t.attention == "auto"):
        return _run(recipe, plugins=plugins, console=console, overwrite=overwrite, show_progress=show_progress, resume=resume)


def _run(recipe: Recipe, *, plugins: PluginSystem | None, console: Console | None, overwrite: bool | None,
         show_progress: bool, resume: bool) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from transformers import get_scheduler

    plugins = plugins or get_plugin_system()
    console = console or Console(stderr=True)
    t = recipe.training
    out = recipe.output_dir
    if resume and overwrite:
        raise RecipeError(["--resume continues the run in output.dir and --overwrite replaces it; pass one of them"])
    overwrite = (recipe.spec.output.overwrite if overwrite is None else overwrite) and not resume
    check_output_dir(out, overwrite, resume)  # nothing is written before the data and model load
    resuming = resume_point(out, recipe.raw, str(recipe.source or "the recipe")) if resume else None
    on_cuda = uses_cuda(t.device)
    if not on_cuda:
        torch.set_num_threads(choose_threads(t.threads, local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    set_mmap_threshold(t.malloc_mmap_threshold)  # opt-in; before the model and activations are allocated
    # In a data-parallel run (plugtune run --nproc, accelerate launch, torchrun) every process
    # runs this function; only the main one writes, logs, evaluates and checkpoints (see core/launch.py).
    accelerator = Accelerator(
        cpu=not on_cuda,
        mixed_precision=choose_precision(t.precision, on_cuda),
        gradient_accumulation_steps=t.grad_accum,
        # batch_size is the global batch, split among the processes: the scheduler steps once per step
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if not main:
        console, show_progress = Console(quiet=True), False
    metrics_log = out / "metrics.jsonl"

    def log(record: dict[str, Any]) -> None:
        if not main:
            return
        with open(metrics_log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def on_main(compute: Any) -> Any:
        """``compute()`` on the main process, its result shared with the others."""
        if world == 1:
            return compute()
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([compute() if main else None], from_process=0)[0]

    # -- data and model ---------------------------------------------------------------
    set_seed(t.seed)
    splits = recipe.loader.build().load(t.seed)
    check_empty_fields(splits, recipe.task)
    task = copy.deepcopy(recipe.task)
    task.setup(splits["train"])
    dtype = base_dtype(t.base_dtype, on_cuda, getattr(recipe.method.component.obj, "trains_base_weights", False))
    with console.status(f"loading {recipe.spec.base_model} ({str(dtype).replace('torch.', '')})"):
        base = load_base(recipe.spec.base_model, task, seed=t.seed, plugins=plugins, dtype=dtype,
                         attn_implementation=choose_attention(t.attention, on_cuda))
    tokenizer = base.tokenizer
    t = t.model_copy(update={"max_length": fit_to_context(t.max_length, base.model, console)})
    regularizers = [(b.name, guarded(b.build(), b.component)) for b in recipe.regularizers]
    train_examples = splits["train"]
    for name, reg in regularizers:
        if hasattr(reg, "augment_examples"):
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
        if hit:
            hits.append(split)
    for split in hits:
        console.print(f"{split}: tokenized rows from the cache")
    (train_rows, train_cut), (test_rows, test_cut) = encoded["train"], encoded["test"]
    if t.max_eval_examples:
        test_rows = test_rows[: t.max_eval_examples]
    if not train_rows:
        raise DataError("no training rows left after encoding (check the templates and training.max_length)")
    if train_cut or test_cut:
        console.print(f"[yellow]{train_cut} train and {test_cut} test rows exceed max_length={t.max_length} and were truncated or dropped[/]")
    if main:
        prepare_output_dir(out, overwrite, resume)  # the first write of the run
        if resuming:
            truncate_log(metrics_log, int(resuming.meta["metrics_bytes"]))
    accelerator.wait_for_everyone()

    device = accelerator.device
    pad_id = tokenizer.pad_token_id
    eval_bs = t.eval_batch_size or t.batch_size * 2
    evaluators = [guarded(b.build(task), b.component) for b in recipe.evaluators]
    eval_kwargs = dict(batch_size=eval_bs, pad_id=pad_id, device=device, tokenizer=tokenizer,
                       max_new_tokens=t.max_new_tokens, max_length=t.max_length, logits_on_labels_only=t.logits_on_labels_only)

    # "before" is the base model itself, evaluated before the method touches it (a prefix or
    # a new head starts random; that is not the base's score).
    before: dict[str, float] = dict(resuming.meta["before"]) if resuming else {}
    if t.eval_before and not resuming:
        with console.status("evaluating the base model"), accelerator.autocast():
            before = on_main(lambda: evaluate(base.model.to(device), test_rows, task, evaluators, **eval_kwargs))

    set_seed(t.seed)
    method = recipe.method.build()
    context = PrepareContext(new_parameters=base.new_parameters, tokenizer=tokenizer, seed=t.seed, device=str(accelerator.device))
    model = call_prepare(method, base.model, task, context)
    trainable, total = count_parameters(model)
    for _, reg in regularizers:
        if hasattr(reg, "setup"):
            reg.setup(model, task, tokenizer)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": [p for _, p in named]}]
    for _, reg in regularizers:
        if hasattr(reg, "param_groups"):
            groups = reg.param_groups(named)
    for group in groups:
        group.setdefault("weight_decay", 0.0)
    make_optimizer = getattr(method, "optimizer", None)
    optimizer = make_optimizer(groups, t.learning_rate) if make_optimizer else torch.optim.AdamW(groups, lr=t.learning_rate)
    batches_per_epoch = math.ceil(len(train_rows) / t.batch_size)  # what epoch_batches cuts, grouped or not
    steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped_model = accelerator.unwrap_model(model)  # evaluation runs on the main process, outside DDP
    lengths = [len(r["input_ids"]) for r in train_rows] if t.group_by_length else None
    head = output_head(unwrapped_model)
    label_only = (t.logits_on_labels_only and not task.is_classification
                  and supports_label_positions(unwrapped_model, [reg for _, reg in regularizers]))

    state = RunState(recipe, task, model, tokenizer, base.info, out, total_steps)
    best: dict[str, Any] = {}  # the weights a regularizer (early stopping) marked best, and their metrics
    checkpointer = Checkpointer(out, recipe.raw, every=t.checkpoint_every, keep=t.checkpoint_keep, model=model,
                                optimizer=optimizer, scheduler=scheduler, regularizers=regularizers,
                                unwrap=accelerator.unwrap_model, rank=rank, world=world)
    if resuming:
        note = checkpointer.restore(resuming, state, best, len(train_rows))
        console.print(f"resuming from {resuming.path} (step {state.step} of {total_steps})")
        if note:
            console.print(f"[yellow]{note}[/]")
    plugins.call_lifecycle("on_train_start", run=state)

    def log_eval(tag: str, metrics: dict[str, float]) -> dict[str, float]:
        log({"event": "eval", "split": "test", "step": state.step, "when": tag, **metrics})
        plugins.call_lifecycle("on_evaluate", run=state, split="test", step=state.step, metrics=metrics)
        return metrics

    stop = False

    def score_train(tag: str = "after") -> dict[str, float]:
        """The evaluators on the first ``eval_train_examples`` training rows (train-dev gap)."""
        if not t.eval_train_examples:
            return {}
        with console.status("evaluating on training rows"), accelerator.autocast():
            metrics = on_main(lambda: evaluate(unwrapped_model, train_rows[: t.eval_train_examples], task, evaluators, **eval_kwargs))
        log({"event": "eval", "split": "train", "step": state.step, "when": tag, **metrics})
        return metrics

    def run_eval(tag: str) -> dict[str, float]:
        nonlocal stop
        with accelerator.autocast():
            metrics = log_eval(tag, on_main(lambda: evaluate(unwrapped_model, test_rows, task, evaluators, **eval_kwargs)))
        for name, reg in regularizers:
            decision: Decision | None = reg.after_evaluate(metrics, state.step) if hasattr(reg, "after_evaluate") else None
            if decision is None:
                continue
            if decision.best:  # a copy: on the CPU adapter_state's tensors share the live weights' storage
                best.update(step=state.step, metrics=dict(metrics),
                            state={k: v.clone() for k, v in method.adapter_state(unwrapped_model).items()},
                            train=score_train("best"))  # scored now: these weights may not be the last
            if decision.stop:
                stop = True
                console.print(f"{name}: stopping at step {state.step}")
        return metrics

    if t.eval_before and not resuming:
        log_eval("before", before)

    # -- the loop -----------------------------------------------------------------------
    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not show_progress,
    )
    bar = progress.add_task("train", total=total_steps, completed=state.step, loss=float("nan"), lr=t.learning_rate, tps=0.0)
    model.train()
    earlier_seconds = float(resuming.meta["train_seconds"]) if resuming else 0.0
    started = time.perf_counter()
    window_tokens, window_start, window_loss, window_micro = 0, time.perf_counter(), 0.0, 0
    window_cpu = time.process_time()  # CPU seconds of all threads: the step's work, whatever else shares the cores
    if resuming:
        restore_rng(checkpointer.own_state(resuming)[0]["rng"])  # last: everything before drew from the RNGs as the first run did
    with progress, StopRequest() as interrupt:
        while state.step < total_steps:
            order = epoch_batches(len(train_rows), t.batch_size, seed=t.seed, epoch=state.epoch, lengths=lengths)
            for batch_index, indices in enumerate(order):
                if batch_index < state.batch:  # consumed before the checkpoint this run resumed from
                    continue
                if world > 1:  # t.batch_size is the global batch; each process takes its rows of it
                    if len(indices) < world:
                        continue  # a tail batch too small to give every process a row: all skip it
                    indices = shard(indices, rank, world)
                batch = task.collate([train_rows[i] for i in indices], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                for _, reg in regularizers:
                    if hasattr(reg, "transform_batch"):
                        batch = reg.transform_batch(batch, state.step)
                with accelerator.accumulate(model):
                    if label_only:
                        loss, outputs, batch_tokens = _label_position_loss(model, head, batch, accelerator)
                    else:
                        outputs = model(**batch)
                        loss, batch_tokens = outputs.loss, int(batch["attention_mask"].sum()) * world
                    terms: dict[str, float] = {}
                    for name, reg in regularizers:
                        term = reg.loss_term(model, batch, outputs, state.step) if hasattr(reg, "loss_term") else None
                        if term is not None:
                            loss = loss + term
                            terms[f"{name}/loss"] = float(term.detach())
                    if not torch.isfinite(loss):
                        raise TrainingError(f"loss became {float(loss.detach())} at step {state.step + 1}; lower training.learning_rate or check the data")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        if t.max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                        for name, reg in regularizers:
                            if hasattr(reg, "after_backward"):
                                terms.update({f"{name}/{k}": v for k, v in (reg.after_backward(model, state.step) or {}).items()})
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                    if accelerator.sync_gradients and hasattr(method, "on_step"):
                        method.on_step(unwrapped_model, state.step + 1)
                window_tokens += batch_tokens
                window_loss += float(outputs.loss.detach())
                window_micro += 1
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                state.batch = batch_index + 1
                elapsed = time.perf_counter() - window_start
                record = {
                    "event": "train", "step": state.step, "loss": window_loss / window_micro,
                    "lr": scheduler.get_last_lr()[0], "tokens_per_s": window_tokens / elapsed if elapsed else 0.0,
                    "tokens": window_tokens, "step_seconds": elapsed, "step_cpu_seconds": time.process_time() - window_cpu,
                    **terms,
                }
                for name, reg in regularizers:
                    if hasattr(reg, "report"):
                        record.update({f"{name}/{k}": v for k, v in reg.report(model).items()})
                window_tokens, window_start, window_loss, window_micro = 0, time.perf_counter(), 0.0, 0
                window_cpu = time.process_time()
                state.history.append(record)
                if state.step % t.log_every == 0 or state.step == total_steps:
                    log(record)
                progress.update(bar, advance=1, loss=record["loss"], lr=record["lr"], tps=record["tokens_per_s"])
                plugins.call_lifecycle("on_step_end", run=state, step=state.step, metrics=record)
                if t.eval_every and state.step % t.eval_every == 0 and state.step < total_steps:
                    run_eval("during")
                stopping = interrupt.requested
                if world > 1:
                    # Ctrl-C (forwarded by the launcher) may reach the processes at different steps;
                    # all must agree before the checkpoint, a collective, or one would wait forever.
                    stopping = bool(accelerator.reduce(torch.tensor([int(stopping)], device=device), reduction="sum").item())
                if (checkpointer.due(state.step) and state.step < total_steps and not stop) or stopping:
                    saved = checkpointer.save(state, best=best, before=before, metrics_log=metrics_log, train_rows=len(train_rows),
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
    train_seconds = earlier_seconds + time.perf_counter() - started

    with console.status("evaluating the adapter"):
        after = run_eval("after")

    # -- the artifact -------------------------------------------------------------------
    if best and best["step"] != state.step:
        console.print(f"keeping the best weights, from step {best['step']}")
        adapter_state, after, train_metrics = best["state"], best["metrics"], best["train"]
        log({"event": "best", "step": best["step"], **after})
    else:
        adapter_state, train_metrics = method.adapter_state(unwrapped_model), best.get("train") or score_train()
    component = recipe.method.component
    manifest = {
        "name": recipe.name,
        "plugtune_version": __version__,
        "method": {
            "name": recipe.method.name,
            "options": recipe.method.options_dict(),
            "plugin": component.plugin.name,
            "distribution": component.plugin.distribution,
            "version": component.plugin.version,
        },
        "base_model": base.info.to_dict(),
        "task": task.to_dict(),
        "recipe": recipe.raw,
        "recipe_dir": str(recipe.base_dir.resolve()),  # relative data paths in the recipe resolve here
        "metrics": {"before": before, "after": after, **({"train": train_metrics} if train_metrics else {})},
        "training": {
            "steps": state.step, "train_seconds": round(train_seconds, 2), "best_step": best.get("step", state.step),
            "trainable_parameters": trainable, "total_parameters": total,
            "train_rows": len(train_rows), "test_rows": len(test_rows),
        },
    }
    if main:
        save_adapter(out, state=adapter_state, config=method.adapter_config(unwrapped_model), manifest=manifest)
        clear_checkpoints(out)  # the adapter is whole: the run is finished
        (out / PREVIOUS_LOG).unlink(missing_ok=True)  # the replaced adapter's log (--overwrite)
    accelerator.wait_for_everyone()
    plugins.call_lifecycle("on_train_end", run=state, adapter_dir=str(out), metrics=after)
    return RunResult(out, before, after, state.step, train_seconds, trainable, total, train_metrics)


def _label_position_loss(model: torch.nn.Module, head: torch.nn.Module | None, batch: dict[str, torch.Tensor],
                         accelerator: Any) -> tuple[torch.Tensor, Any, int]:
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
                          local_sum.detach().float(), batch["attention_mask"].sum().float()])
    if world > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    label_tokens, global_sum, real_tokens = counts.tolist()
    loss = local_sum * world / max(label_tokens, 1.0)
    return loss, SimpleNamespace(loss=torch.tensor(global_sum / max(label_tokens, 1.0)), logits=None), int(real_tokens)


def lower_is_better(metric: str) -> bool:
    """Losses, perplexities and bias measures improve downwards; everything else upwards."""
    return metric.split("/")[-1] in {"loss", "perplexity"} or metric.startswith("counterfactual/")


def comparison_table(columns: dict[str, dict[str, float]], title: str = "") -> Table:
    """A rich table with one row per metric and one column per model/adapter; with exactly
    two columns a third shows the change."""
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
            better = delta < 0 if lower_is_better(metric) else delta > 0
            colour = "green" if better else ("red" if delta else "")
            cells.append(f"[{colour}]{delta:+.4f}[/]" if colour else f"{delta:+.4f}")
        table.add_row(metric, *cells)
    return table
