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

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo

if TYPE_CHECKING:
    import torch
    from torch import nn


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


Head = Literal["lm", "classifier"]
"""Which head a task trains: ``"lm"`` loads ``AutoModelForCausalLM`` (peft ``CAUSAL_LM``),
``"classifier"`` loads ``AutoModelForSequenceClassification`` with ``num_labels``/``id2label``
from the task's ``labels`` (peft ``SEQ_CLS``)."""


@runtime_checkable
class Task(Protocol):
    """How examples become model inputs and labels, and how outputs become predictions.

    Registered with ``register_tasks`` and chosen by a recipe's ``task`` block:
    ``task: {type: NAME, <options>}``. ``Options`` validates the block minus ``type`` (errors
    read ``task.<field>: ...``), at recipe validation, before any model loads; the core then
    builds ``Task(options, name)`` with the name it was registered under. Adapters record
    :meth:`to_dict` in their manifest, and hosts, ``plugtune eval``/``merge``/``combine`` and
    the server rebuild the task from that dict (:func:`plugtune.data.tasks.build_task`).

    Called, in order: ``required_fields()`` at validation (the columns the data must have);
    ``setup(train)`` once on the raw training examples (e.g. infer the label names);
    ``encode`` per example; ``collate`` per batch; ``eval_batch`` per evaluation batch.

    **The training batch** (what :meth:`collate` returns; what tuning methods, regularizers
    and the loss see):

    * ``input_ids`` ``(B, T)`` long, right-padded with the tokenizer's pad id;
    * ``attention_mask`` ``(B, T)`` long, 1 on real tokens, 0 on padding;
    * ``labels``: for ``head == "lm"`` ``(B, T)`` long, the token id at each position and
      :data:`~plugtune.data.labels.IGNORE_INDEX` (``-100``) where no loss is taken; the
      logits at position ``t`` predict ``labels[:, t + 1]`` (the loss shifts). For
      ``head == "classifier"`` ``(B,)`` long class indices into ``labels``.

    Prompt-learning methods (prefix tuning, prompt tuning) prepend ``V`` virtual tokens
    inside the model: its logits are then ``(B, V + T, vocab)``, and the last ``T``
    positions line up with ``labels`` (``logits[:, -T:]``); the virtual ones predict nothing.

    Optional: ``for_raw_prompts(name)`` (classmethod) -> a task of this type that serves plain
    text prompts, for ``plugtune generate/serve --base MODEL`` with no adapter (the core asks
    the registry for a task with this capability, never for a name).
    """

    Options: ClassVar[type[ComponentOptions]]
    type: str  # the name the task is registered under, as recorded in manifests
    head: Head  # which model head it trains (see Head)
    labels: list[str] | None  # class names for a classifier head (set by setup); None otherwise
    generates: bool  # it has a prompt to generate from and a reference text to compare with

    def __init__(self, options: Any, name: str) -> None: ...

    @property
    def is_classification(self) -> bool:
        """``head == "classifier"``: one class per example instead of tokens."""
        return self.head == "classifier"

    def required_fields(self) -> set[str]:
        """The example keys (columns) the task reads; checked against the loader's columns
        at validation, and rows with these fields empty are refused before training."""
        ...

    def setup(self, train: list[Example]) -> None:
        """Once, on the raw training examples, before anything is encoded (e.g. infer the
        label names when the recipe lists none, so they are fixed for evaluation)."""
        ...

    def encode(self, example: Example, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
        """One example's ``input_ids`` and ``labels`` (lists of ints; ``labels`` as in the
        batch format, one class index for a classifier), at most ``max_length`` tokens.
        Raise ``KeyError(field)`` for a missing field and
        :class:`~plugtune.kernel.errors.DataError` for a bad value (the core adds the row)."""
        ...

    def collate(self, rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
        """Pad encoded rows into one training batch (the format above)."""
        ...

    def eval_batch(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> EvalBatch:
        """Per-example predictions, references, scores and the summed loss of one batch from
        the model's full logits (``(B, T, V)`` or ``(B, V + T, V)`` for an lm head, ``(B, C)``
        for a classifier)."""
        ...

    def encode_prompt(self, example: Example, tokenizer: Any) -> list[int]:
        """The ids generation starts from for ``example`` (evaluators that generate)."""
        ...

    def reference_text(self, example: Example) -> str | None:
        """The text a generation for ``example`` is compared with (ROUGE, BLEU), or None."""
        ...

    def format_prompt(self, text: str) -> str | None:
        """The prompt for one raw input ``text`` on a host or server (a one-field template
        filled with it), or None when the task has no such template (the text is used as
        it is)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{"type": name, <options>, "labels": ...}`` for the adapter manifest;
        building the task again from it gives the same task."""
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


@runtime_checkable
class Evaluator(Protocol):
    """Accumulates over a split's evaluation batches and returns named metrics.

    Optional: ``needs_generation = True`` (class attribute) to receive greedy generations in
    ``EvalBatch.generated``; ``compute_with(context: EvalContext) -> dict`` to run the model
    on examples of its own after the pass; ``check_task(task) -> str | None`` (classmethod),
    called at validation: a reason the evaluator cannot serve this task.
    """

    Options: ClassVar[type[ComponentOptions]]

    def __init__(self, options: Any, task: Task) -> None: ...

    def reset(self) -> None: ...

    def update(self, batch: EvalBatch) -> None: ...

    def compute(self) -> dict[str, float]: ...


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
