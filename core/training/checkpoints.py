"""Training checkpoints: what a run needs to continue exactly where it stopped.

A checkpoint is a folder ``<output>/checkpoints/step-N/``::

    trainable.safetensors   every trainable parameter of the prepared model, by name
    best.safetensors        the weights a regularizer (early stopping) marked best, if any
    training_state.pt       optimizer and scheduler state (under training.distributed: fsdp
                            gathered whole, keyed by parameter name), torch/python/numpy(/CUDA) RNG
                            states, each regularizer's state (read back with weights_only);
                            in a data-parallel run these last two for every process
                            (``processes``, by rank), since each draws its own random numbers
    checkpoint.json         step, data position (epoch, next batch), the recipe it was
                            made from, the length of metrics.jsonl, metrics before training,
                            the best-so-far step and metrics, seconds trained, step history

Written atomically: the files go into a hidden sibling folder, each is fsynced, the folder is
renamed to ``step-N`` and the parent fsynced; the oldest are removed (renamed away first)
so that the last ``keep`` stay. A ``step-N`` folder therefore is either complete or absent,
whenever the process dies.

Resume needs only the contract of :func:`plugtune.data.batching.epoch_batches` (the batch order is
a pure function of seed and epoch): the run rebuilds the model as an uninterrupted run would,
loads these states over it, restores the RNGs last, and skips the batches of the current
epoch the checkpoint had consumed. On the CPU the result is bit-identical to an uninterrupted
run, with one process or several (tests/test_checkpoints.py checks both with a SIGKILL).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from plugtune.artifacts.outputs import fsync_dir, fsync_write
from plugtune.kernel.bounds import read_json_file
from plugtune.kernel.errors import RecipeError, TrainingError

CHECKPOINTS_DIR = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
BEST_FILE = "best.safetensors"
STATE_FILE = "training_state.pt"
META_FILE = "checkpoint.json"
FORMAT_VERSION = 1

# Recipe keys that do not change what is trained: a resume may differ in these.
NOT_TRAINING = {
    ("name",), ("description",), ("output",),
    ("training", "log_every"), ("training", "eval_batch_size"),
    ("training", "checkpoint_every"), ("training", "checkpoint_keep"),
    ("training", "malloc_mmap_threshold"),  # where freed memory goes, not what is computed
    ("tracking",),  # where the run is reported, not what it computes: a resume may add or drop a tracker
}


# -- where they live --------------------------------------------------------------------------


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-") or not name[5:].isdigit():
        return None
    return int(name[5:])


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (half-written ones never have the name)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := _step_of(p)) is not None and (p / META_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def clear_checkpoints(output_dir: Path) -> None:
    """Remove a run's checkpoints (a fresh run with ``--overwrite``, or a finished one)."""
    root = checkpoints_dir(output_dir)
    if root.exists():
        _discard(root)


# -- recipe comparison ------------------------------------------------------------------------


def _flatten(value: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(value, dict):
        out: dict[tuple[str, ...], Any] = {}
        for key, child in value.items():
            out.update(_flatten(child, prefix + (str(key),)))
        return out or {prefix: {}}
    return {prefix: value}


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two raw recipes, ignoring keys that do not
    change training (output, name, logging and checkpoint cadence)."""
    a, b = _flatten(saved), _flatten(json.loads(json.dumps(current, default=str)))  # as the checkpoint stored it

    def relevant(key: tuple[str, ...]) -> bool:
        return not any(key[: len(skip)] == skip for skip in NOT_TRAINING)

    return sorted(".".join(k) for k in set(a) | set(b) if relevant(k) and a.get(k, None) != b.get(k, None))


# -- RNG --------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from: torch (CPU and CUDA), python, numpy."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- component state --------------------------------------------------------------------------


def component_state(component: Any) -> dict[str, Any]:
    """A regularizer's state: its own ``state_dict()`` when it has one, else the states of any
    ``torch.Generator`` attributes it holds (so a third-party augmenter resumes exactly)."""
    if hasattr(component, "state_dict"):
        return {"state_dict": component.state_dict()}
    generators = {k: v.get_state() for k, v in vars(component).items() if isinstance(v, torch.Generator)}
    return {"generators": generators} if generators else {}


def load_component_state(component: Any, state: dict[str, Any]) -> None:
    if "state_dict" in state and hasattr(component, "load_state_dict"):
        component.load_state_dict(state["state_dict"])
    for name, value in state.get("generators", {}).items():
        getattr(component, name).set_state(value)


# -- writing ----------------------------------------------------------------------------------


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def write_checkpoint(output_dir: Path, step: int, *, trainable: dict[str, torch.Tensor],
                     best: dict[str, torch.Tensor] | None, training_state: dict[str, Any],
                     meta: dict[str, Any], keep: int) -> Path:
    """Write ``step-N`` atomically, then drop all but the newest ``keep`` checkpoints."""
    from safetensors.torch import save

    root = checkpoints_dir(output_dir)
    buffer = io.BytesIO()
    torch.save(training_state, buffer)
    blobs = {TRAINABLE_FILE: save(_cpu(trainable)), STATE_FILE: buffer.getvalue()}
    if best:
        blobs[BEST_FILE] = save(_cpu(best))
    blobs[META_FILE] = json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=1, default=str).encode()
    target = root / f"step-{step}"
    previous = latest_checkpoint(output_dir)
    staging: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step}.tmp-"))
        for name, data in blobs.items():  # the manifest last: a folder with it is complete
            fsync_write(staging / name, data)
        if target.exists():  # the same step again (a resumed run): replace it
            _discard(target)
        staging.rename(target)
        fsync_dir(root)
    except OSError as exc:  # a full disk, a quota, a folder gone read-only: the earlier checkpoints stay whole
        kept = (f"the last good checkpoint ({previous}) is intact; free space, then continue with --resume" if previous
                else "there is no earlier checkpoint; free space and run again")
        raise TrainingError(f"could not write checkpoint {target} ({exc.strerror or exc}); {kept}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    for old in list_checkpoints(output_dir)[:-keep]:
        _discard(old)
    for leftover in root.glob(".step-*"):  # staging or trash of a process killed mid-write
        shutil.rmtree(leftover, ignore_errors=True)
    return target


def _discard(path: Path) -> None:
    trash = path.parent / f".{path.name}.old-{os.getpid()}"
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


# -- reading ----------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint read back: what :func:`resume_point` hands the training loop."""

    path: Path
    meta: dict[str, Any]
    trainable: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor]
    training_state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


MAX_COUNTER = 2**53  # steps, epochs, rows, bytes: exact in a JSON number, far past any run


class _Best(BaseModel):
    step: int = Field(ge=0, le=MAX_COUNTER)
    metrics: dict[str, float]
    train: dict[str, float] = {}


class CheckpointMeta(BaseModel):
    """The shape of ``checkpoint.json`` that resuming relies on: a hand-edited or damaged
    file fails here, naming the file and the field, instead of deep in the training loop."""

    model_config = ConfigDict(extra="allow", strict=True)

    format_version: int = Field(FORMAT_VERSION, ge=1, le=FORMAT_VERSION)
    step: int = Field(ge=0, le=MAX_COUNTER)
    epoch: int = Field(ge=0, le=MAX_COUNTER)
    batch: int = Field(ge=0, le=MAX_COUNTER)
    recipe: dict[str, Any]
    train_rows: int = Field(ge=0, le=MAX_COUNTER)
    metrics_bytes: int = Field(ge=0, le=MAX_COUNTER)
    before: dict[str, Any] = {}
    train_seconds: float = Field(0.0, ge=0, allow_inf_nan=False)
    history: list[dict[str, Any]] = []
    best: _Best | dict[str, Any] = {}
    finished: bool = False

    @field_validator("best", mode="before")
    @classmethod
    def _empty_or_best(cls, value: Any) -> Any:
        return value if value == {} else _Best.model_validate(value, strict=False)


def _meta_problem(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and "[" in p))[:80] or "(top level)"
    got = err.get("input")
    shown = "" if err["type"] == "missing" or isinstance(got, (dict, list)) else f" (got {repr(got)[:40]})"
    return f"field {where}: {err['msg']}{shown}"


def _read_meta(path: Path) -> dict[str, Any]:
    """``checkpoint.json`` read with the shared JSON bounds and checked against
    :class:`CheckpointMeta`; problems raise ValueError with one line."""
    data = read_json_file(path, ValueError, what="checkpoint metadata (a JSON object)")
    try:
        CheckpointMeta.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{path}: {_meta_problem(exc)}") from None
    return data


def read_checkpoint(path: Path) -> Checkpoint:
    from safetensors.torch import load_file

    try:
        meta = _read_meta(path / META_FILE)
    except ValueError as exc:
        raise TrainingError(f"checkpoint {exc}; remove {path} to resume from an earlier checkpoint, "
                            f"or start over with --overwrite") from None
    try:
        trainable = load_file(path / TRAINABLE_FILE)
        best = load_file(path / BEST_FILE) if (path / BEST_FILE).is_file() else {}
        training_state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise TrainingError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {first}); "
                            f"remove it to resume from an earlier one, or start over with --overwrite") from None
    missing = [k for k in ("optimizer", "scheduler", "rng") if not isinstance(training_state, dict) or k not in training_state]
    if missing:
        raise TrainingError(f"checkpoint {path / STATE_FILE} lacks {', '.join(missing)}; "
                            f"remove {path} to resume from an earlier checkpoint, or start over with --overwrite")
    return Checkpoint(path, meta, trainable, best, training_state)


def resume_point(output_dir: Path, raw_recipe: dict[str, Any], source: str) -> Checkpoint:
    """The last complete checkpoint of the run in ``output_dir``, checked against the recipe.

    Refuses (one line) when there is none, or when the recipe differs from the one the run
    was started with in a key that changes training."""
    latest = latest_checkpoint(output_dir)
    if latest is None:
        raise RecipeError([(f"--resume: no checkpoint in {checkpoints_dir(output_dir)}; "
                            f"run without --resume to start (training.checkpoint_every sets the cadence)")])
    checkpoint = read_checkpoint(latest)
    changed = recipe_differences(checkpoint.meta.get("recipe", {}), raw_recipe)
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise RecipeError([(f"--resume: {source} differs from the recipe the run in {output_dir} was started with "
                            f"({shown}); resume with the same recipe, or start over with --overwrite")])
    return checkpoint


def interrupted_run_message(output_dir: Path) -> str | None:
    """The one-line refusal for ``run`` on a folder that holds an interrupted run, or None."""
    latest = latest_checkpoint(output_dir)
    if latest is None:
        return None
    return (f"output.dir: {output_dir} holds an interrupted run (last checkpoint: {latest.name}); "
            f"pass --resume to continue it or --overwrite to start over")


@dataclass
class BestWeights:
    """The weights a regularizer (early stopping) marked best, kept while training goes on:
    the step they are from, the evaluation that made them best, the method's adapter tensors
    (a copy, on the CPU) and their score on training rows (``training.eval_train_examples``,
    else empty). The run saves these instead of the last weights when they differ."""

    step: int
    metrics: dict[str, float]
    state: dict[str, torch.Tensor]
    train: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What a checkpoint's meta keeps of them (the tensors go to ``best.safetensors``)."""
        return {"step": self.step, "metrics": self.metrics, "train": self.train}

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> BestWeights | None:
        """The best weights a checkpoint holds, or None when no evaluation was marked best."""
        summary = checkpoint.meta.get("best")
        if not summary:
            return None
        return cls(step=int(summary["step"]), metrics=dict(summary["metrics"]), state=dict(checkpoint.best),
                   train=dict(summary.get("train") or {}))


class Checkpointer:
    """Saves and restores the training loop's state; the loop calls :meth:`save` at the
    cadence (and on Ctrl-C) and :meth:`restore` once before its first step when resuming.

    In a data-parallel run (``world`` > 1) every process calls :meth:`save` at the same steps:
    the processes share the weights, optimizer and data position, but each draws its own
    random numbers (LoRA dropout masks, augmentation) for rows of its own shapes, so their RNG
    and regularizer states drift apart. :meth:`save` gathers them to the main process, which
    alone writes; on resume each process restores its own (:meth:`own_state`)."""

    def __init__(self, output_dir: Path, recipe_raw: dict[str, Any], *, every: int, keep: int, model: Any,
                 optimizer: Any, scheduler: Any, regularizers: list[tuple[str, Any]], unwrap: Any,
                 rank: int = 0, world: int = 1, sharded: bool = False) -> None:
        self.output_dir = Path(output_dir)
        self.recipe_raw = recipe_raw
        self.every, self.keep = every, keep
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.regularizers = regularizers
        self.unwrap = unwrap
        self.rank, self.world = rank, world
        self.is_main = rank == 0
        self.sharded = sharded  # FSDP: weights and optimizer state are gathered whole to write (see save)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.unwrap(self.model).named_parameters() if p.requires_grad}

    def _process_state(self) -> dict[str, Any]:
        """What differs from process to process: the RNGs and the regularizers' states."""
        return {"rng": rng_state(),
                "regularizers": {f"{i}:{name}": component_state(reg) for i, (name, reg) in enumerate(self.regularizers)}}

    def _gather(self, value: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Every process's ``value`` in rank order on the main process, None on the others.
        A collective: every process must call it at the same step (the cadence is the same
        for all, and the loop agrees on a Ctrl-C before calling :meth:`save`)."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def save(self, state: Any, *, before: dict[str, float], train_seconds: float,
             metrics_log: Path, train_rows: int, metrics_bytes: int | None = None, finished: bool = False) -> Path:
        """Write a checkpoint of ``state.step`` (with ``state.best``, the :class:`BestWeights`
        or None); returns its folder (the one the main process wrote, on every process).
        Called by every process of a data-parallel run (see the class docstring).
        ``metrics_bytes``: the length of the log a resume cuts it back to (default: all of it).
        ``finished``: training is over (saving the adapter failed); a resume only evaluates and
        saves."""
        processes = self._gather(self._process_state())
        trainable, optimizer = self._whole_state()
        if not self.is_main:
            return checkpoints_dir(self.output_dir) / f"step-{state.step}"
        training_state = {
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            **processes[0],  # "rng" and "regularizers": the main process's, as single-process checkpoints hold them
        }
        if self.world > 1:
            training_state["processes"] = processes
        meta = {
            "step": state.step, "epoch": state.epoch, "batch": state.batch, "total_steps": state.total_steps,
            "recipe": self.recipe_raw, "train_rows": train_rows,
            "metrics_bytes": metrics_bytes if metrics_bytes is not None else (metrics_log.stat().st_size if metrics_log.exists() else 0),
            "before": before, "train_seconds": train_seconds, "history": state.history,
            "best": state.best.summary() if state.best else {},
            **({"finished": True} if finished else {}),
        }
        return write_checkpoint(self.output_dir, state.step, trainable=trainable,
                                best=state.best.state if state.best else None, training_state=training_state,
                                meta=meta, keep=self.keep)

    def _whole_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The trainable weights and the optimizer state, whole. A sharded model's are gathered
        to the main process (collectives, every process calls this): the weights by name, the
        optimizer state keyed by parameter name (torch's full optimizer state dict), so a
        checkpoint is the same set of files, written atomically by the main process alone."""
        if not self.sharded:
            return self._trainable(), (self.optimizer.state_dict() if self.is_main else {})
        from plugtune.training.sharding import full_optimizer_state, full_tensors

        return full_tensors(self._trainable()), full_optimizer_state(self.model, self.optimizer)

    def own_state(self, checkpoint: Checkpoint) -> tuple[dict[str, Any], str | None]:
        """This process's RNG and regularizer states in ``checkpoint``, and a note when they
        are not its own: a checkpoint of a single-process run (or one written before states
        were kept per process) resumed by several processes, or one made by another number
        of processes. Then every process takes the main process's states: the run continues
        correctly, but its random draws differ from those of an uninterrupted run."""
        saved = checkpoint.training_state
        processes = saved.get("processes") or [{"rng": saved["rng"], "regularizers": saved.get("regularizers", {})}]
        if len(processes) == self.world:
            return processes[self.rank], None
        return processes[0], (f"{checkpoint.path} holds the random state of {len(processes)} process(es) and this "
                              f"run has {self.world}: every process continues from the main process's random state, "
                              f"so random draws (dropout, augmentation) differ from an uninterrupted run")

    def restore(self, checkpoint: Checkpoint, state: Any, train_rows: int) -> str | None:
        """Load a checkpoint over the freshly prepared model, optimizer, scheduler and
        regularizers, and set the loop's counters and ``state.best``. RNGs are left to :func:`restore_rng` (with
        :meth:`own_state`), to be called last, just before the first resumed step. Returns the
        note of :meth:`own_state`, if any, for the console."""
        meta = checkpoint.meta
        if meta.get("train_rows") != train_rows:
            raise TrainingError(f"--resume: the training data changed since {checkpoint.path} "
                                f"({meta.get('train_rows')} rows then, {train_rows} now); start over with --overwrite")
        params = self._trainable()
        if set(params) != set(checkpoint.trainable):
            raise TrainingError(f"--resume: {checkpoint.path} holds other trainable weights than the prepared model; "
                                f"start over with --overwrite")
        if self.sharded:  # every process read the whole checkpoint; each keeps its shards
            from plugtune.training.sharding import load_full_optimizer_state, load_full_parameters

            load_full_parameters(params, checkpoint.trainable)
            load_full_optimizer_state(self.model, self.optimizer, checkpoint.training_state["optimizer"])
        else:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(checkpoint.trainable[name])
            self.optimizer.load_state_dict(checkpoint.training_state["optimizer"])
        self.scheduler.load_state_dict(checkpoint.training_state["scheduler"])
        own, note = self.own_state(checkpoint)
        for i, (name, reg) in enumerate(self.regularizers):
            load_component_state(reg, own["regularizers"].get(f"{i}:{name}", {}))
        state.step, state.epoch, state.batch = int(meta["step"]), int(meta["epoch"]), int(meta["batch"])
        state.history[:] = meta.get("history", [])
        state.best = BestWeights.from_checkpoint(checkpoint)
        return note


def truncate_log(metrics_log: Path, length: int) -> None:
    """Cut ``metrics.jsonl`` back to what it held at the checkpoint, so resumed steps are not
    logged twice."""
    if metrics_log.exists() and metrics_log.stat().st_size > length:
        with open(metrics_log, "r+b") as fh:
            fh.truncate(length)
            fh.flush()
            os.fsync(fh.fileno())


__all__ = [
    "BestWeights", "Checkpoint", "Checkpointer", "checkpoints_dir", "clear_checkpoints", "component_state",
    "interrupted_run_message", "latest_checkpoint", "list_checkpoints", "load_component_state", "read_checkpoint",
    "recipe_differences", "restore_rng", "resume_point", "rng_state", "truncate_log", "write_checkpoint",
]
