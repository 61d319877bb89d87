"""The protocols a component of each kind follows.

Components are plain classes registered by name (see :mod:`plugtune.kernel.hookspecs`). Each has an
``Options`` class, a pydantic model with ``extra="forbid"`` describing the recipe block it
accepts; the core validates that block before anything heavy is loaded and passes the bound
options to the constructor. Derive ``Options`` from :class:`ComponentOptions` to get the
strict defaults.

Protocols, not base classes: a component implements the methods it needs. Optional methods
of a regularizer are looked up with ``getattr`` and skipped when absent.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo

if TYPE_CHECKING:
    import torch
    from torch import nn

    from plugtune.data.tasks import Task


class ComponentOptions(BaseModel):
    """Base for every component's ``Options``: unknown keys are errors, values are checked
    on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class NoOptions(ComponentOptions):
    """``Options`` for a component that takes none."""


Example = Mapping[str, Any]


def _path_exists(path: Path) -> bool:
    """``path.exists()``, but a name the OS cannot even look up (too long, a NUL byte) is
    simply not there rather than an exception."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _existing_path(value: Path, info: ValidationInfo) -> Path:
    base = Path((info.context or {}).get("base_dir", "."))
    path = value if value.is_absolute() else base / value
    if not _path_exists(path):
        raise ValueError(f"file not found: {path} (paths are relative to the recipe's folder)")
    return path


DataPath = Annotated[Path, AfterValidator(_existing_path)]
"""A path option that must exist; relative paths resolve against the recipe's folder."""


@runtime_checkable
class DataLoader(Protocol):
    """Reads examples for a recipe. Examples are flat dicts; the task's templates refer to
    their keys."""

    Options: ClassVar[type[ComponentOptions]]

    def __init__(self, options: Any) -> None: ...

    def columns(self) -> list[str]:
        """The keys every example will have, read cheaply (a header, a schema) so that a
        recipe naming a missing column fails at validation, before any model loads."""
        ...

    def load(self, seed: int) -> dict[str, list[dict[str, Any]]]:
        """Return the splits: ``{"train": [...], "test": [...]}`` (``test`` may be
        derived deterministically from ``seed`` when the source has no held-out split)."""
        ...


@runtime_checkable
class TuningMethod(Protocol):
    """Turns a base model into a trainable one, saves what it trained as an adapter, and
    attaches saved adapters to a resident base for inference.

    The adapter is always the pair (``adapter_state``, ``adapter_config``): a flat dict of
    tensors (saved as safetensors) and a JSON-able dict (saved as ``adapter_config.json``).
    Methods built on peft use peft's names for both, so plain peft loads their adapters.
    """

    Options: ClassVar[type[ComponentOptions]]

    def __init__(self, options: Any) -> None: ...

    def prepare(self, model: nn.Module, task: Task) -> nn.Module:
        """Freeze, inject and return the model to train (it may be a wrapper)."""
        ...

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors that make up the trained adapter, on CPU."""
        ...

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        """The JSON-able config written beside the tensors."""
        ...

    # Optional, training side:
    #   optimizer(param_groups, lr) -> torch.optim.Optimizer   (default: torch AdamW)
    #   preflight() -> str | None   called while the recipe is validated, before any model
    #                               loads: a reason the method cannot run here, or None.
    #   trains_base_weights = True  class attribute: keep the base in fp32 on GPUs (default
    #                               there is bf16 for a frozen base).
    #
    # Host side. The adapter host makes one instance per method class (with the first
    # adapter's options) and routes every adapter of that method through it, so the instance
    # may keep state shared by those adapters (a peft wrapper, the base values it overwrote).
    # A method whose adapters another method can host sets ``hosted_by = ThatMethod``.
    # ``model`` is always the bare base model the host loaded.

    def attach(
        self, model: nn.Module, name: str, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> nn.Module:
        """Attach a saved adapter under ``name`` without activating it; return the module
        that runs it (``model`` itself, or a wrapper around it). Must be strict: missing or
        unexpected tensors, or wrong shapes, raise :class:`plugtune.kernel.errors.AdapterError`."""
        ...

    def activate(self, model: nn.Module, name: str | None) -> None:
        """Make ``name`` this method's active adapter, or (``None``) leave the base exactly
        as loaded. The host calls ``activate(model, None)`` on every other method first."""
        ...

    def detach(self, model: nn.Module, name: str) -> None:
        """Remove adapter ``name`` (never the active one) and free its memory."""
        ...


@dataclass
class EvalBatch:
    """What the core hands every evaluator for one evaluation batch.

    ``predictions``/``references`` are hashable per-example values: class indices for
    sequence classification, tuples of token ids of the greedy continuation vs the reference
    response for causal LMs (so accuracy there is exact match under greedy decoding).
    ``loss_sum``/``n_targets`` sum the cross-entropy over target tokens (or examples).
    """

    predictions: list[Any]
    references: list[Any]
    loss_sum: float
    n_targets: int
    examples: list[Example] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # probability of the predicted class, or mean log-prob of the greedy response
    losses: list[float] = field(default_factory=list)  # per example: cross-entropy of the reference (mean over its tokens)
    generated: list[str] | None = None  # greedy generations (only for evaluators with needs_generation)
    reference_texts: list[str] | None = None  # the filled response template, as text


@dataclass
class EvalContext:
    """Given to an evaluator's optional ``compute_with(context)`` after the evaluation pass:
    the split's raw examples, the task, and ``predict(examples) -> EvalBatch`` to run the
    model on examples the evaluator builds (rewrites, perturbations)."""

    examples: list[Example]
    task: Any
    predict: Any


@dataclass
class Decision:
    """What a regularizer's optional ``after_evaluate`` returns: stop training now, and/or
    the current weights are the best so far (the saved adapter will be the best ones)."""

    stop: bool = False
    best: bool = False


Direction = Literal["min", "max"]
"""Which way a metric improves: ``"min"`` (losses, error rates, bias gaps) or ``"max"``."""


class MetricDirections:
    """Which way each metric improves, as the recipe's evaluators declare it.

    Built from evaluator classes (or instances) with :meth:`of`; each evaluator's
    ``directions`` maps metric names or :mod:`fnmatch` patterns (``"f1/*"``) to a
    :data:`Direction`, the first evaluator and pattern that match win. A metric no evaluator
    declares has no direction (:meth:`direction` returns None): the before/after table shows
    its change uncoloured, and selecting weights on it (early stopping) is refused at
    validation unless the recipe gives the direction itself. That is a deliberate choice over
    a default: a guessed direction is how ``counterfactual/flip_rate`` came to be maximised.
    """

    def __init__(self, declared: Iterable[tuple[str, Direction]] = ()) -> None:
        self.declared: list[tuple[str, Direction]] = list(declared)

    @classmethod
    def of(cls, evaluators: Iterable[Any]) -> MetricDirections:
        """The directions every evaluator in ``evaluators`` declares, in order."""
        declared: list[tuple[str, Direction]] = []
        for evaluator in evaluators:
            for pattern, direction in (getattr(evaluator, "directions", None) or {}).items():
                if direction not in ("min", "max"):
                    raise ValueError(f"{type(evaluator).__name__}.directions[{pattern!r}] is {direction!r}; "
                                     f"use 'min' or 'max'")
                declared.append((pattern, direction))
        return cls(declared)

    def direction(self, metric: str) -> Direction | None:
        """``"min"``, ``"max"``, or None when no evaluator declares ``metric``."""
        for pattern, direction in self.declared:
            if pattern == metric or fnmatch.fnmatchcase(metric, pattern):
                return direction
        return None

    def improved(self, metric: str, new: float, old: float) -> bool | None:
        """Whether ``new`` is better than ``old`` for ``metric`` (None: no declared direction)."""
        direction = self.direction(metric)
        if direction is None or new == old:
            return None if direction is None else False
        return new < old if direction == "min" else new > old


class EvalMetrics(dict[str, float]):
    """One evaluation's metrics (a plain ``dict`` of name -> value) that also knows which
    way each improves. Regularizers' ``after_evaluate`` and the ``on_evaluate`` hook receive
    one; ``metrics.direction(name)`` reads the declared :data:`Direction` (or None)."""

    def __init__(self, metrics: Mapping[str, float], directions: MetricDirections | None = None) -> None:
        super().__init__(metrics)
        self.directions = directions or MetricDirections()

    def direction(self, metric: str) -> Direction | None:
        return self.directions.direction(metric)


@runtime_checkable
class Evaluator(Protocol):
    """Accumulates over a split's evaluation batches and returns named metrics.

    ``directions`` (class attribute): which way each metric it returns improves, keyed by
    metric name or :mod:`fnmatch` pattern (``{"loss": "min"}``, ``{"f1": "max", "f1/*":
    "max"}``). Early stopping, the best-weights selection and the before/after table read
    these and never guess from a name (see :class:`MetricDirections` for undeclared metrics).

    Optional: ``default = True`` (class attribute) to be used when a recipe lists no
    ``evaluators``; ``needs_generation = True``
    (class attribute) to receive greedy generations in ``EvalBatch.generated``;
    ``compute_with(context: EvalContext) -> dict`` to run the model on examples of its own
    after the pass; ``check_task(task) -> str | None`` (classmethod), called at validation:
    a reason the evaluator cannot serve this task.
    """

    Options: ClassVar[type[ComponentOptions]]
    directions: ClassVar[Mapping[str, Direction]]

    def __init__(self, options: Any, task: Task) -> None: ...

    def reset(self) -> None:
        """Called before each evaluation pass: forget the previous pass."""
        ...

    def update(self, batch: EvalBatch) -> None:
        """Called once per evaluation batch of the pass."""
        ...

    def compute(self) -> dict[str, float]:
        """Called after the pass: the metrics, by name (each covered by ``directions``)."""
        ...


class Regularizer(Protocol):
    """Acts at any of several points of a training step; every method is optional.

    * ``param_groups(named_params) -> list[dict] | None``: split the trainable parameters
      into optimizer groups (e.g. no decay on biases and norms).
    * ``transform_batch(batch, step) -> batch``: change a training batch (augmentation);
      never called on evaluation batches.
    * ``loss_term(model, batch, outputs, step) -> Tensor | None``: a term added to the loss.
      A regularizer with a ``loss_term`` and no ``needs_logits = False`` class attribute gets
      ``outputs.logits`` over every position; with ``needs_logits = False`` the core may
      compute logits at the label positions only (``outputs.logits`` is then None).
    * ``after_backward(model, step) -> dict | None``: act on gradients.
    * ``report(model) -> dict[str, float]``: what it did this step, logged as
      ``<name>/<key>``.
    * ``setup(model, task, tokenizer)``: once, after the method prepared the model (install
      forward hooks, change dropout, read special token ids).
    * ``augment_examples(rows, task) -> rows``: once, on the raw training examples before
      tokenization (never on evaluation data).
    * ``after_evaluate(metrics, step) -> Decision | None``: after every evaluation during and
      after training; may stop training and/or mark the current weights as the best.
      ``metrics`` is an :class:`EvalMetrics`: ``metrics.direction(name)`` says which way a
      metric improves, as its evaluator declares.
    * ``check_metrics(options, directions) -> list[str]`` (classmethod): at validation, with
      the :class:`MetricDirections` of the recipe's evaluators; problems such as a metric no
      evaluator declares, each starting with its field path inside the block
      (``options.metric: ...``).
    * ``state_dict() -> dict`` / ``load_state_dict(state)``: state that changes while training
      (random generators, counters, kept weights), saved in checkpoints so ``--resume``
      continues exactly. Without them, the states of any ``torch.Generator`` attributes are
      saved; other state would restart from ``setup``.
    """

    Options: ClassVar[type[ComponentOptions]]

    def __init__(self, options: Any) -> None: ...


class BaseModelAlias(Protocol):
    """A short name for a base model that can be found offline."""

    description: str

    def locate(self) -> Path:
        """Return a local directory (or ``.gguf`` file) holding the model, fetching it
        first if this alias knows how to. Raise :class:`plugtune.kernel.errors.ModelError` with a
        fix when it cannot."""
        ...
