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
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo

from plugtune.kernel.errors import DataError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from plugtune.artifacts.adapters import Adapter
    from plugtune.artifacts.outline import ModelOutline


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


_NOT_REGULAR = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def not_regular(path: Path, mode: int | None = None) -> str | None:
    """What ``path`` is when it is not a regular file ("a FIFO (named pipe)", "a folder",
    ...), None for a regular file or a symlink to one. Looked up with ``os.stat`` only:
    opening a FIFO for reading blocks until a writer comes, and ``/dev/zero`` never ends."""
    mode = os.stat(path).st_mode if mode is None else mode
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _NOT_REGULAR if test(mode)), "not a regular file")


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = Path((info.context or {}).get("base_dir", "."))
    path = value if value.is_absolute() else base / value
    if not _path_exists(path):
        raise ValueError(f"file not found: {path} (paths are relative to the recipe's folder)")
    return path


def _existing_path(value: Path, info: ValidationInfo) -> Path:
    path = _resolve(value, info)
    what = not_regular(path)
    if what is not None:
        raise ValueError(f"{path} is {what}, not a regular file")
    return path


def _existing_file_or_folder(value: Path, info: ValidationInfo) -> Path:
    path = _resolve(value, info)
    what = not_regular(path)
    if what is not None and what != "a folder":
        raise ValueError(f"{path} is {what}, not a regular file or a folder")
    return path


DataPath = Annotated[Path, AfterValidator(_existing_path)]
"""A path option naming an existing regular file (a symlink to one is fine); relative paths
resolve against the recipe's folder. A folder, FIFO, device or socket is refused by name at
validation, without being opened."""

DataFileOrFolder = Annotated[Path, AfterValidator(_existing_file_or_folder)]
"""As :data:`DataPath`, but a folder is accepted too (a loader reading every file under it
checks each with :func:`not_regular`)."""


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading in binary, refused with :class:`DataError` unless it is a
    regular file *when opened*: the check is on the open descriptor (``O_NONBLOCK``, so a FIFO
    swapped in after validation cannot block the open), never on a name that may change."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    what = not_regular(path, os.fstat(fd).st_mode)
    if what is not None:
        os.close(fd)
        raise DataError(f"{path} is {what}, not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


@runtime_checkable
class RowStream(Protocol):
    """A training split read lazily, for data larger than memory. A loader's ``load`` may
    return one as ``train`` instead of a list (``test`` stays a list: it is evaluated again
    and again, so the loader bounds it, e.g. to its first rows).

    The core then never holds the split: it reads it through a seeded shuffle buffer of
    ``shuffle_buffer`` rows (instead of grouping batches by length, which needs every
    length), calls the task's ``normalize`` on each row, checks its fields, tokenizes it on
    the fly and cuts batches as the loop asks for them (core/data/streaming.py). An epoch
    is one pass; the run needs ``training.max_steps`` (there is no length to count epochs
    in). ``--resume`` reads the epoch again from its first row and skips the rows of the
    batches consumed before the checkpoint without tokenizing them.
    """

    shuffle_buffer: int  # rows the core's shuffle buffer holds (memory ~ this many raw rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One pass over the training rows, flat dicts with the keys ``columns()`` names, in
        the source's own order; every call starts again from the first row and yields the
        same rows in the same order (the shuffle and a resume depend on it)."""
        ...


@runtime_checkable
class DataLoader(Protocol):
    """Reads examples for a recipe. Examples are flat dicts; the task's templates refer to
    their keys.

    Optional: ``streams: bool`` (attribute or property): True when ``load`` returns the
    training split as a :class:`RowStream`; validation then requires ``training.max_steps``
    and refuses regularizers that rewrite the training rows in memory
    (``augment_examples``).
    """

    Options: ClassVar[type[ComponentOptions]]

    def __init__(self, options: Any) -> None: ...

    def columns(self) -> list[str]:
        """The keys every example will have, read cheaply (a header, a schema) so that a
        recipe naming a missing column fails at validation, before any model loads."""
        ...

    def load(self, seed: int) -> dict[str, list[dict[str, Any]] | RowStream]:
        """Return the splits: ``{"train": [...], "test": [...]}`` (``test`` may be
        derived deterministically from ``seed`` when the source has no held-out split);
        ``train`` may be a :class:`RowStream` when the loader ``streams``."""
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

    Optional members, each called by the core when present:

    * ``for_raw_prompts(name)`` (classmethod) -> a task of this type that serves plain text
      prompts, for ``plugtune generate/serve --base MODEL`` with no adapter (the core asks the
      registry for a task with this capability, never for a name);
    * ``normalize(example) -> example``: the canonical form of one raw row, called on every
      loaded row right after loading, before the empty-field check, ``setup`` and ``encode``
      (the chat task maps OpenAI, ShareGPT and Alpaca rows to one ``messages`` shape here);
      raise :class:`~plugtune.kernel.errors.DataError` for a row that fits no shape (the core
      adds the split and row number);
    * ``notes() -> list[str]``: lines worth printing once the rows are normalized (which
      format was detected, how many rows of each);
    * ``bind_tokenizer(tokenizer)``: once the base tokenizer is known, before any ``encode``,
      in training, evaluation, ``plugtune preview`` and on hosts (the chat task resolves its
      chat template here, and records the template's text in :meth:`to_dict`);
    * ``check_columns(columns) -> list[str]``: problems with the loader's columns at
      validation, for a task whose fields depend on the data (``required_fields`` covers the
      rest);
    * encoded rows may carry ``turns_cut: [n]`` besides ``input_ids``/``labels``: how many whole
      turns were left out to fit ``max_length`` (the core reports the total per split).

    A task that renders conversations for hosts and servers implements :class:`RendersChat`;
    one whose classifier head outputs a score (a reward model), :class:`ScoresTexts`.
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
class RendersChat(Protocol):
    """A task that renders chat requests exactly as it rendered its training conversations:
    ``AdapterHost.chat`` and the server's ``/v1/chat/completions`` use it for an adapter
    whose task has it, so what the model sees at inference is, token for token, the prefix it
    saw in training before an answer.

    ``encode_chat(messages, tokenizer)``: the prompt ids for ``messages`` (a list of
    ``{"role", "content"}``), ending with the assistant's opening; a
    :class:`~plugtune.kernel.errors.DataError` for messages it cannot render.
    ``end_of_turn_ids(tokenizer)``: token ids that end an assistant turn besides the
    tokenizer's end-of-sequence (``<|im_end|>`` for a chatml template on a base whose EOS
    differs); generation stops at them."""

    def encode_chat(self, messages: list[dict[str, str]], tokenizer: Any) -> list[int]: ...

    def end_of_turn_ids(self, tokenizer: Any) -> set[int]: ...


@runtime_checkable
class ScoresTexts(Protocol):
    """A task whose classifier head has one output, a score (a reward model), not class
    logits: ``AdapterHost.score``/``classify``, ``plugtune classify`` and the server's
    ``/v1/classify`` return that number per input for its adapters instead of softmaxed
    class probabilities.

    ``encode_scored(item, tokenizer, max_length)``: the ids to score for one input (a text,
    or a list of ``{"role", "content"}`` messages ending with the answer), encoded exactly as
    training encoded a scored sequence, at most ``max_length`` long; a
    :class:`~plugtune.kernel.errors.DataError` for an input it cannot score."""

    def encode_scored(self, item: Any, tokenizer: Any, max_length: int) -> list[int]: ...


@dataclass(frozen=True)
class PrepareContext:
    """What :meth:`TuningMethod.prepare` gets besides the model and the task, passed as an
    argument (never as attributes set on the model).

    ``new_parameters``: names of the parameters the loader freshly initialised rather than
    read from the pretrained weights (a sequence-classification head); a method trains them
    and saves them by value, since the base's fingerprint does not cover them. ``tokenizer``:
    the base's tokenizer. ``seed``: the run's seed (already applied with ``set_seed``).
    ``device``: where training will run (``"cpu"``, ``"cuda:0"``); the model may still be on
    the CPU when ``prepare`` is called. ``total_steps``: the optimizer steps the run will
    take (for schedules inside a method, such as AdaLoRA's rank budget); None when unknown."""

    new_parameters: frozenset[str] = frozenset()
    tokenizer: Any = None
    seed: int = 0
    device: str | None = None
    total_steps: int | None = None


@dataclass(frozen=True)
class BaseLoading:
    """What :meth:`TuningMethod.base_loading` is told, before the base's weights load.

    ``device``: where the base will be trained (``"cpu"``, ``"cuda:0"``): a method that loads
    the base quantized puts it there directly (``device_map``). ``dtype``: the dtype the core
    loads the base's full-precision tensors in (``"float32"``, ``"bfloat16"``; from
    ``training.base_dtype``). ``head``: the task's head (``"lm"``, ``"classifier"``).
    ``head_modules``: dotted names of the top-level modules outside the pretrained backbone
    (transformers' ``base_model_prefix`` submodule): the output head (``lm_head``), and the
    layers a task head adds (``classifier``, ``score``, ``pre_classifier``), found on the
    model class built on the ``meta`` device; a quantizing method keeps them in full
    precision."""

    device: str = "cpu"
    dtype: str = "float32"
    head: Head = "lm"
    head_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class MemoryHints:
    """What :meth:`TuningMethod.memory_hints` tells ``plugtune estimate`` about a method that
    stores the base or its optimizer state in another form than the loaded dtype; every field
    None means "as loaded" (the estimate counts the meta model's parameters by dtype).

    ``linear_bytes_per_param``: bytes per weight of the base's ``nn.Linear`` layers outside
    the head modules (:attr:`BaseLoading.head_modules`), the layers a quantizing load converts,
    scales included (8-bit with one fp32 scale per row: about 1; 4-bit in blocks of 64 with
    double-quantized scales: about 0.52). ``optimizer_bytes_per_param``: optimizer state per
    trainable parameter (torch's AdamW: two moments in the parameter's dtype, 8 for fp32;
    an 8-bit AdamW: 2). ``host_bytes_per_trainable_param``: host memory the method keeps per
    trainable parameter besides the optimizer (full fine-tuning's copy of the initial weights,
    4 for fp32), counted in a CPU run's peak."""

    linear_bytes_per_param: float | None = None
    optimizer_bytes_per_param: float | None = None
    host_bytes_per_trainable_param: float | None = None


@runtime_checkable
class TuningMethod(Protocol):
    """The training side of a tuning method: turns a base model into a trainable one and
    saves what it trained as an adapter. Its host side is a separate :class:`AdapterHandler`
    named by ``handler``.

    The adapter is always the pair (``adapter_state``, ``adapter_config``): a flat dict of
    tensors (saved as safetensors) and a JSON-able dict (saved as ``adapter_config.json``).
    Methods built on peft use peft's names for both, so plain peft loads their adapters.

    Optional members (looked up with ``getattr``; absent means the default):

    * ``handler: ClassVar[type[AdapterHandler]]`` -- the class that hosts this method's
      adapters (several methods may share one: int8 training produces LoRA adapters, hosted
      by LoRA's handler). Absent: the method class itself is the handler (the pre-split
      layout, still accepted). ``hosted_by = OtherMethod`` is read as a deprecated alias:
      the handler of ``OtherMethod``.
    * ``trains_base_weights: ClassVar[bool] = False`` -- True keeps the base in fp32 on GPUs
      (the default there is bf16 for a frozen base).
    * ``preflight(self) -> str | None`` -- called while the recipe is validated, before any
      model loads: a one-line reason the method cannot run on this machine, or None.
    * ``optimizer(self, param_groups, lr) -> torch.optim.Optimizer`` -- called once after
      ``prepare`` with the trainable parameters' groups; default torch's AdamW. A group may
      carry its own ``lr`` (a new classification head's, under ``learning_rate: auto``): keep it.
    * ``reference_learning_rate(self) -> float`` -- AdamW's rate for this method (with these
      options) on a 512-wide model with 16 rows per optimizer step; ``learning_rate: auto``
      scales it to the model's width and the batch (:mod:`plugtune.training.rates`). Absent:
      1e-3, and the run says it assumed it.
    * ``check_task(task) -> str | None`` (classmethod) -- called at validation: a reason the
      method cannot train this task (e.g. language-model heads only), or None.
    * ``cannot_pack: ClassVar[str]`` -- why rows of several examples (``training.packing``,
      :mod:`plugtune.data.packing`) would mix examples under this method, e.g. it prepends
      virtual tokens or key/values every position attends to; ``training.packing: true`` is
      refused with it at validation, and ``auto`` leaves packing off. Absent: packing works
      (the method changes weights only, and the base keeps each example's attention apart).
    * ``on_step(self, model, step) -> None`` -- called by the training loop after every
      optimizer step and before the gradients are zeroed (``step`` counts from 1), with the
      model ``prepare`` returned (unwrapped from any distributed wrapper): for methods that
      change their structure while training (AdaLoRA's rank allocation reads the gradients).
    * ``base_loading(self, context) -> dict`` -- called by the training run before the base's
      weights load, with a :class:`BaseLoading`: extra keyword arguments for transformers'
      ``from_pretrained`` (``quantization_config``, ``device_map``), so a method can have the
      base loaded already quantized, never as a full-precision copy first; ``{}`` or absent:
      the ordinary load. A base that loads with extra arguments records the fingerprint of
      its ordinary load (read from the checkpoint for layers that no longer hold the
      checkpoint's values), so its adapters are hosted on the full-precision base. Not
      called by the adapter host, which always loads the full-precision base; a recipe whose
      ``base_model`` is an adapter folder (merged in full precision) is refused for such a
      method at validation.
    * ``base_loaded(self, model) -> None`` -- called right after a base loaded with
      ``base_loading``'s arguments, before anything runs it (the "before" evaluation): to
      set what ``from_pretrained`` cannot (a quantized layer's kernel choice).
    * ``memory_hints(self, context) -> MemoryHints`` -- called by ``plugtune estimate`` (and
      ``validate``'s estimate line) with the :class:`BaseLoading` a run would pass
      ``base_loading``, before any weight loads: how this method stores the base's linear
      weights and its optimizer state (:class:`MemoryHints`). Absent: as loaded, AdamW. The
      estimate also calls ``prepare`` on the base built on the ``meta`` device (no storage):
      a method that checks the loaded layers (a quantized base) accepts a ``meta`` model
      there, so its trainable parameters are counted as a run's.
    * ``adapter_disabled(self, model) -> ContextManager`` -- the training side's
      activate-none: while the block runs, the model ``prepare`` returned computes exactly
      what the base computed before ``prepare`` (its adapter switched off, nothing copied);
      afterwards the adapter is back, its weights and gradients untouched. A task with a
      reference (:class:`ComputesLoss`, preference objectives) takes its reference scores
      from the resident base this way instead of from a second model. Absent (full
      fine-tuning changes the base's own weights): such tasks precompute the reference
      before ``prepare`` or keep a copy (:data:`ReferenceMode`).
    """

    Options: ClassVar[type[ComponentOptions]]

    def __init__(self, options: Any) -> None: ...

    def prepare(self, model: nn.Module, task: Task, context: PrepareContext) -> nn.Module:
        """Called once per run, after the base is loaded and the "before" evaluation ran:
        freeze, inject, and return the model to train (it may be a wrapper). A method
        written against the older ``prepare(model, task)`` still works: the core calls it
        through :func:`call_prepare`, which looks at the signature."""
        ...

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Called after training (and for each checkpoint) with the model ``prepare``
        returned: the tensors that make up the trained adapter, on CPU."""
        ...

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        """Called right after ``adapter_state``: the JSON-able config written beside the
        tensors (``adapter_config.json``); the handler's ``attach`` receives it back."""
        ...


def call_prepare(method: Any, model: nn.Module, task: Task, context: PrepareContext) -> nn.Module:
    """``method.prepare(model, task, context)``, or ``prepare(model, task)`` for a method
    whose ``prepare`` takes two arguments (written before :class:`PrepareContext`)."""
    import inspect

    try:
        params = inspect.signature(method.prepare).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: assume the current protocol
        return method.prepare(model, task, context)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_more = any(p.kind == p.VAR_POSITIONAL for p in params) or len(positional) >= 3
    return method.prepare(model, task, context) if takes_more else method.prepare(model, task)


def handler_class(method: type) -> type:
    """The :class:`AdapterHandler` class that hosts adapters of tuning method ``method``:
    its ``handler``, else (deprecated) the handler of its ``hosted_by``, else the method
    class itself (methods written before the two sides were split)."""
    seen: set[type] = set()
    while method not in seen:
        seen.add(method)
        handler = getattr(method, "handler", None)
        if handler is not None:
            return handler
        hosted_by = getattr(method, "hosted_by", None)
        if hosted_by is None or hosted_by is method:
            return method
        method = hosted_by
    return method


@runtime_checkable
class AdapterHandler(Protocol):
    """The host side of a tuning method: attaches saved adapters to a resident base model
    and switches between them (:class:`plugtune.serving.host.AdapterHost`, ``plugtune
    merge``, a recipe whose ``base_model`` is an adapter folder, ``plugtune combine``).

    A host makes **one instance per handler class** (built with the first adapter's method
    options, validated against ``Options``) and routes every adapter of that handler through
    it, so the instance may keep state shared by those adapters (a peft wrapper, the base
    values a full-weight delta overwrote). ``model`` is always the bare base model the host
    loaded (with any layer wrappers resident handlers installed in it).

    What a handler may add is declared by the capabilities below, each documented once:
    ``attach_reads_base_weights`` (a flag) and the protocols :class:`MixesRows`,
    :class:`Folds`, :class:`Merges`, :class:`StartsDecoding`, :class:`ReportsResidentBytes`,
    :class:`Combines` and :class:`ExportsLora`. The core asks ``isinstance(handler, Folds)``, never a name.

    Layer wrappers must compose with other handlers' wrappers, in any load order: a wrapper
    keeps the module it wraps as ``base_layer`` (peft's convention), finds the layer it
    adapts with :func:`original_module`, swaps modules with :func:`replace_module`, and when
    it leaves, splices itself out of the stack with :func:`remove_wrapper`. peft's tuner
    layers follow the same convention, so a handler may build one around whatever sits at a
    path (``peft.tuners.ia3.layer.Linear(model.get_submodule(path), name, config=...)``, even
    over LoRA's hosted layer) and put it there with :func:`replace_module`.
    """

    Options: ClassVar[type[ComponentOptions]]

    attach_reads_base_weights: ClassVar[bool] = True
    """True (default): ``attach`` may read the base's weights, so the host takes the active
    adapter off (``activate(model, None)`` on every handler) for the attach and restores it
    afterwards, and refuses while an adapter is merged. False: ``attach`` only stores
    tensors; the host attaches without switching."""

    def __init__(self, options: Any) -> None: ...

    def attach(
        self, model: nn.Module, name: str, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> nn.Module:
        """Called by the host's ``load``: attach a saved adapter under ``name`` without
        activating it; return the module that runs it (``model`` itself, or a wrapper around
        it). Must be strict and check everything before touching the model: missing or
        unexpected tensors, or wrong shapes, raise :class:`plugtune.kernel.errors.AdapterError`."""
        ...

    def activate(self, model: nn.Module, name: str | None) -> None:
        """Called on every switch: make ``name`` this handler's active adapter, or
        (``None``) leave the base exactly as loaded. The host calls ``activate(model,
        None)`` on every other handler first, so at most one adapter is active."""
        ...

    def detach(self, model: nn.Module, name: str) -> None:
        """Called by the host's ``unload`` (never on the active adapter): remove adapter
        ``name`` and free its memory; the last adapter off a layer takes its wrapper out."""
        ...


@runtime_checkable
class MixesRows(Protocol):
    """Capability: rows of one forward may run different adapters of this handler.

    The host builds one forward through the bare base for the rows of every mixing handler
    (and rows on the bare base), and enters ``mixed_rows`` of each handler present, telling
    each **only its own rows**: ``names[i]`` is this handler's adapter for row ``i`` or
    ``None`` (the bare base as far as this handler is concerned, because another handler's
    adapter or none runs that row). Each row must come out exactly as its adapter alone gives
    it (the handlers' wrappers compose, and a wrapper adds nothing for a ``None`` row). A
    handler may set ``supports_mixed_batches = False`` to opt out despite the method."""

    def mixed_rows(self, model: nn.Module, names: list[str | None]) -> AbstractContextManager[None]:
        """Route each row of the forwards run inside the context to its adapter."""
        ...


@runtime_checkable
class Folds(Protocol):
    """Capability: fold the active adapter into the base weights and back, exactly (host
    ``merge``/``unmerge``: inference at the bare base's cost while one adapter serves)."""

    def fold(self, model: nn.Module, name: str) -> None:
        """Called with ``name`` active: write it into the base's weights, keeping what is
        needed for :meth:`unfold`."""
        ...

    def unfold(self, model: nn.Module) -> None:
        """Undo :meth:`fold` bit for bit (copy kept originals back, never subtract)."""
        ...


@runtime_checkable
class Merges(Protocol):
    """Capability: make an adapter part of the base for good (``plugtune merge``, a recipe
    whose ``base_model`` is an adapter folder)."""

    def merge(self, model: nn.Module, name: str) -> nn.Module:
        """Called after ``attach(model, name, ...)``: fold the adapter in permanently, take
        every wrapper of this handler out, and return the plain model."""
        ...


@runtime_checkable
class StartsDecoding(Protocol):
    """Capability: an adapter that decodes from a start of its own (prefix-like methods)
    rather than through the wrapped base."""

    def decode_parts(self, model: nn.Module, name: str) -> tuple[nn.Module, Any]:
        """For the host's KV-cached decode loop: the module to decode with, and
        ``start(batch_size) -> (initial cache, its length in tokens)``."""
        ...


@runtime_checkable
class ReportsResidentBytes(Protocol):
    """Capability: tell how much memory an attached adapter takes on the host."""

    def resident_bytes(self, model: nn.Module, name: str) -> int:
        """Bytes of device memory adapter ``name``'s tensors take (``AdapterHost.list``)."""
        ...


@dataclass
class Combined:
    """What :meth:`Combines.combine` returns: the new adapter's tensors and config, the
    method options its manifest records, a JSON-able description of the combination, and
    (optionally) the tuning method class the result counts as (default: the first parent's)."""

    state: dict[str, Any]
    config: dict[str, Any]
    options: dict[str, Any]
    record: dict[str, Any]
    method: type | None = None


@runtime_checkable
class Combines(Protocol):
    """Capability: combine several adapters of this handler into a new one (``plugtune
    combine``). The core checks that the parents share base, task and handler, loads the
    base once, and saves the result with a manifest recording every parent."""

    def combine(self, model: nn.Module, parents: Sequence[Adapter], weights: Sequence[float],
                options: Mapping[str, Any]) -> Combined:
        """``model`` is the bare base (fp32); ``parents`` the adapters as read from disk;
        ``options`` the combination's settings from the caller (``method``, ``density``,
        ...), which the handler validates, raising :class:`AdapterError` with a fix."""
        ...


@dataclass
class PlainLora:
    """What :meth:`ExportsLora.plain_lora` returns: the adapter as plain LoRA, the one form
    llama.cpp, Ollama, vLLM and LoRAX apply (``W x + scaling * B (A x)`` on linear layers).

    ``pairs`` maps each adapted linear module's dotted path in the base (``model.layers.0.
    self_attn.q_proj``, no peft prefix) to ``(A, B, scaling)``: ``A`` (r, in_features),
    ``B`` (out_features, r), the float the product is multiplied by (rsLoRA's
    ``alpha / sqrt(r)`` and per-module ``alpha_pattern`` already worked out). ``whole``
    holds modules the adapter saves whole (peft's ``modules_to_save``, a classification
    head): module path -> {parameter name: value}; each target decides whether it can carry
    them. ``task_type`` is peft's (``CAUSAL_LM``, ``SEQ_CLS``)."""

    pairs: dict[str, tuple[Any, Any, float]]
    whole: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_type: str | None = None


@runtime_checkable
class ExportsLora(Protocol):
    """Capability: give an adapter of this handler as plain LoRA factors (``plugtune
    export``: llama.cpp GGUF, Ollama, vLLM). Only an exact form counts: an adapter whose
    update is not ``scaling * B A`` added to linear weights (DoRA renormalises the columns,
    other tuners multiply or rotate) is refused with that reason, never approximated."""

    def plain_lora(self, adapter: Adapter) -> PlainLora:
        """``adapter`` as read from disk (tensors, config, manifest); no model is loaded.
        Raise :class:`~plugtune.kernel.errors.AdapterError` naming why it has no exact
        plain-LoRA form."""
        ...


def mixes_rows(handler: Any) -> bool:
    """Whether ``handler`` can run rows of different adapters in one forward."""
    return isinstance(handler, MixesRows) and bool(getattr(handler, "supports_mixed_batches", True))


def original_module(module: nn.Module) -> nn.Module:
    """The module at the bottom of a stack of layer wrappers: follows ``base_layer`` (peft's
    convention for wrapped layers) and ``original_module`` (peft's, for modules saved whole)
    down to a module that wraps nothing. Check shapes and types on this, never on the top."""
    while True:
        inner = getattr(module, "base_layer", None)
        if inner is None or not hasattr(inner, "forward"):
            inner = getattr(module, "original_module", None)
        if inner is None or not hasattr(inner, "forward") or inner is module:
            return module
        module = inner


def replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted ``path`` of ``model`` (the top of whatever stack is there);
    returns the module that was there."""
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def remove_wrapper(model: nn.Module, path: str, wrapper: nn.Module) -> None:
    """Take ``wrapper`` out of the stack at ``path`` wherever it sits in it: at the top, the
    module it wraps takes its place; in the middle, the wrapper above it wraps what it
    wrapped. A wrapper not in the stack is left alone."""
    inner = _inner(wrapper)
    above: nn.Module | None = None
    current = model.get_submodule(path)
    while current is not None and current is not wrapper:
        above, current = current, _inner(current)
    if current is None or inner is None:
        return
    if above is None:
        replace_module(model, path, inner)
    else:
        setattr(above, _inner_name(above), inner)


@contextmanager
def beneath_wrappers(model: nn.Module, paths: Iterable[str],
                     keep: Callable[[nn.Module], bool] = lambda module: False) -> Iterator[None]:
    """Run the block with the wrappers above each of ``paths`` lifted off (down to the bare
    module, or to the first module ``keep`` accepts); afterwards the lifted wrappers go back on
    top of whatever the block left at the path. For a handler that lets a library wrap modules
    itself (peft's ``ModulesToSaveWrapper`` around a classification head): the library then
    wraps the module, not another handler's wrapper of it, and the other wrappers stay on top."""
    lifted: dict[str, tuple[nn.Module, nn.Module]] = {}
    for path in paths:
        top = model.get_submodule(path)
        lowest_lifted = None
        current: nn.Module | None = top
        while current is not None and current is not original_module(current) and not keep(current):
            lowest_lifted, current = current, _inner(current)
        if lowest_lifted is not None and current is not None:
            lifted[path] = (top, lowest_lifted)
            replace_module(model, path, current)
    try:
        yield
    finally:
        for path, (top, lowest) in lifted.items():
            setattr(lowest, _inner_name(lowest), model.get_submodule(path))
            replace_module(model, path, top)


def _inner_name(module: nn.Module) -> str:
    inner = getattr(module, "base_layer", None)
    return "base_layer" if inner is not None and hasattr(inner, "forward") else "original_module"


def _inner(module: nn.Module) -> nn.Module | None:
    inner = getattr(module, _inner_name(module), None)
    return inner if inner is not None and hasattr(inner, "forward") and inner is not module else None


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
    values: dict[str, list[float]] = field(default_factory=dict)  # named per-example values a task reports (chosen_logp, chosen_reward, ...)


ReferenceMode = Literal["none", "auto", "adapter_off", "precomputed", "copy"]
"""Where a task with a reference (:class:`ComputesLoss`) gets its reference scores:
``"adapter_off"``: from the model being trained with its adapter switched off (the method's
``adapter_disabled``), in every step, no second model; ``"precomputed"``: once, from the
base before ``prepare``, over every training row, kept on the rows (no second model, one
extra pass; not for a streamed split or a regularizer that rewrites batches); ``"copy"``: a
frozen copy of the base kept beside the trained model (a second model's memory: for full
fine-tuning on a stream); ``"auto"``: ``adapter_off`` when the method has
``adapter_disabled``, else ``precomputed``, else ``copy``; ``"none"``: the objective needs no
reference (ORPO, SimPO, reward models). Evaluation rows always get theirs from the base,
before training (the base is the reference)."""


@dataclass
class TaskLoss:
    """What :meth:`ComputesLoss.training_loss` returns: the loss to minimise for the batch (a scalar
    tensor with its graph), the batch's real tokens (for tokens/s) and terms to log for the
    step (``rewards/margin``, ``sft/loss``), each a float."""

    loss: torch.Tensor
    tokens: int
    terms: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class ComputesLoss(Protocol):
    """Optional on a task: it computes its own training loss and evaluation batch from the
    model, instead of the core's cross-entropy over ``labels`` (preference objectives such
    as DPO compare two answers' log-probabilities; a reward model compares two scores).

    ``reference``: a :data:`ReferenceMode`. When it is not ``"none"`` the core gives the task
    reference scores: ``reference_scores(model, batch)`` is called under ``torch.no_grad`` with
    the reference model (the trained model with its adapter off, the base before ``prepare``
    or a copy of it) and returns a float tensor ``(B, k)``, one row per example of the batch;
    the core stores precomputed rows' scores and hands them back as ``batch["reference"]``.

    ``training_loss(model, batch)`` runs the trainable model on a training batch (``batch["reference"]``
    present when the task has a reference) and returns a :class:`TaskLoss`;
    ``evaluate_batch(model, batch)`` returns the :class:`EvalBatch` of an evaluation batch
    (called under ``torch.no_grad``), with per-example ``values`` evaluators read. The batch
    is what :meth:`Task.collate` made; it need not follow the core's format, but must hold
    ``input_ids`` and ``attention_mask`` (regularizers and the token count read them)."""

    reference: ReferenceMode

    def reference_scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def training_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TaskLoss: ...

    def evaluate_batch(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> EvalBatch: ...


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
    one; ``metrics.direction(name)`` reads the declared :data:`Direction` (or None).
    ``details``: the evaluators' structured results (``Evaluator.details()``), by name, kept
    apart from the float metrics (shapes in core/training/metrics_log.py)."""

    def __init__(self, metrics: Mapping[str, float], directions: MetricDirections | None = None,
                 details: Mapping[str, Any] | None = None) -> None:
        super().__init__(metrics)
        self.directions = directions or MetricDirections()
        self.details: dict[str, Any] = dict(details or {})

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
    a reason the evaluator cannot serve this task; ``details() -> dict[str, dict]``, called
    after ``compute``: structured results that are no single number (a confusion matrix),
    JSON-serializable, logged in the evaluation record's ``details`` and never seen by early
    stopping or trackers' scalars (shapes in core/training/metrics_log.py).
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
    * ``check_task(task) -> str | None`` (classmethod): at validation, a reason the
      regularizer cannot serve this task, or None.
    * ``cannot_pack: ClassVar[str]``: why it would act differently on rows holding several
      examples (``training.packing``), e.g. a scale computed from the row's width;
      ``packing: true`` is refused with it and ``auto`` leaves packing off.
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


# --------------------------------------------------------------------------------------------
# Experiment trackers
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Tracker(Protocol):
    """Sends a run's parameters, metrics and adapter to an experiment tracker (TensorBoard,
    MLflow, W&B...). Registered with ``register_trackers`` and chosen by name in a recipe's
    ``tracking:`` list (``tracking: [name, {name: other, options: {...}}]``).

    When: ``plugtune run`` builds one instance per ``tracking`` entry, ``Tracker(options)``,
    on the main process only (a data-parallel run logs once), after the model is prepared;
    it registers each instance as a pluggy plugin for the run's duration and unregisters it
    at the end. So a tracker is a lifecycle plugin: its methods marked with
    :data:`plugtune.hookimpl` receive ``on_train_start``, ``on_step_end``, ``on_evaluate``,
    ``on_train_end`` and ``on_train_failed`` (a failed or interrupted run; a tracker closes
    its run there) exactly like a module-level plugin (see :mod:`plugtune.kernel.hookspecs`).
    Import the tracking library inside those methods, never at module level: the plugin
    must import (and register its name) where the library is absent, so that validation can
    say which extra installs it.

    Class attributes:

    * ``requires``: the modules the tracker imports (checked at validation with
      ``importlib.util.find_spec``, without importing them);
    * ``install``: how to install them, e.g. ``"pip install 'plugtune[mlflow]'"``; a recipe
      naming the tracker where one is missing fails validation with
      ``tracking[i]: NAME needs the 'MODULE' package: INSTALL``.

    Metrics arrive as the run logs them (strings and counters among them, NaN possible):
    send them through a :class:`FiniteScalars` so only finite numbers reach the tracker, and
    :func:`flatten_params` gives the recipe as dotted keys. ``run.resumed`` is True when
    ``--resume`` continues a run: keep the tracker's run id in ``run.output_dir`` to
    continue the same tracker run where the library allows.
    """

    Options: ClassVar[type[ComponentOptions]]
    requires: ClassVar[tuple[str, ...]]
    install: ClassVar[str]

    def __init__(self, options: Any) -> None: ...


def missing_requirement(tracker: type) -> str | None:
    """``"needs the 'mlflow' package: pip install ..."`` when a module in ``tracker.requires``
    cannot be found (looked up, not imported: validation stays cheap), else None."""
    import importlib.util

    for module in getattr(tracker, "requires", ()) or ():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module without a spec
            found = False
        if not found:
            install = getattr(tracker, "install", "") or f"pip install {module}"
            return f"needs the {module!r} package: {install}"
    return None


def flatten_params(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested recipe as ``{"training.batch_size": 8, "regularizers.0.name": ...}``: lists
    are indexed, values are kept as they are (str, int, float, bool, None). Trackers take
    flat parameters; the dotted keys read as the recipe's own field paths."""
    if isinstance(tree, Mapping):
        items: Iterable[tuple[Any, Any]] = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix or "value": tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (Mapping, list, tuple)) and value:
            flat.update(flatten_params(value, name))
        else:
            flat[name] = value if not isinstance(value, (Mapping, list, tuple)) else str(value)
    return flat


class FiniteScalars:
    """Keeps the finite numbers of a metrics record for a tracker: strings and booleans are
    dropped quietly (``event: train``), NaN and infinities are dropped with one warning per
    metric name on stderr, so a diverging run never crashes its tracker nor fills its log.
    One instance per tracker instance (the warnings are per tracker)."""

    def __init__(self, tracker: str) -> None:
        self.tracker = tracker
        self.warned: set[str] = set()

    def __call__(self, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
        import math
        import sys

        kept: dict[str, float] = {}
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                kept[str(name)] = float(value)
            elif name not in self.warned:
                self.warned.add(name)
                where = f" at step {step}" if step is not None else ""
                print(f"warning: {self.tracker}: metric {name!r} is {value}{where}; not sent (trackers get finite "
                      f"numbers only; later non-finite values of it are skipped silently)", file=sys.stderr)
        return kept


# --------------------------------------------------------------------------------------------
# Checking a recipe against the base model, before its weights load
# --------------------------------------------------------------------------------------------


@runtime_checkable
class ChecksModel(Protocol):
    """Optional on any component a recipe binds: a tuning method, regularizer, evaluator or
    task. Lets ``plugtune validate`` refuse options that cannot fit the base model (a
    ``target_modules`` that matches no layer) instead of failing after the weights loaded.

    When: at recipe validation, after the component's block bound without problems, and
    only when the base model's outline can be had offline (a local folder, a ``.gguf``
    file, an alias whose weights are already here, an adapter folder whose base is local;
    never a hub id). The core builds the component as training does (a method or
    regularizer from its options, an evaluator from its options and the task; the task is
    itself) and calls ``check_model(outline, task)``.

    With: ``outline``, a :class:`~plugtune.artifacts.outline.ModelOutline`: ``config`` (the
    transformers config, read from ``config.json`` or GGUF metadata) and, built on first use
    on the ``meta`` device, ``module_names()``, ``linear_names()``, ``parameter_shapes()``
    of the model class the task's head loads; no weights are read. ``task``: the recipe's
    task (``head``, ``labels``).

    Returns: problems, one line each, starting with a field path relative to the component's
    block (``"options.target_modules: ..."``; a task's options sit at the top of its block:
    ``"label: ..."``); the core prefixes the block's path (``method.``, ``regularizers[0].``,
    ``evaluators[1].``, ``task.``). An empty list: nothing to say.
    """

    def check_model(self, outline: ModelOutline, task: Task) -> list[str]:
        """Problems of this component's options on the base model ``outline`` describes."""
        ...


class BaseModelAlias(Protocol):
    """A short name for a base model that can be found offline.

    Optional: ``local() -> Path | None``: where the model already is on this machine, or
    None, never fetching; validation reads the model's outline (:class:`ChecksModel`) from
    there. Without it, an alias's model is not checked before it loads."""

    description: str

    def locate(self) -> Path:
        """Return a local directory (or ``.gguf`` file) holding the model, fetching it
        first if this alias knows how to. Raise :class:`plugtune.kernel.errors.ModelError` with a
        fix when it cannot."""
        ...
