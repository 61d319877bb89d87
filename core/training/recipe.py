"""Recipes: YAML -> a validated :class:`Recipe`, with every problem reported at once.

Validation happens in four passes, all before any model is loaded:

1. the recipe's own shape (top-level keys, task, training, output) against pydantic models;
2. every component name resolved in the plugin registry (with a did-you-mean) and its
   ``options`` block bound to the component's ``Options``;
3. the data source opened cheaply (a header, a schema) to check the columns the task uses;
4. components that can (``check_model``) checked against the base model's outline: its
   config and module names, read without weights, when the model is already local.

Problems from all passes are collected into one :class:`~plugtune.kernel.errors.RecipeError`, one
line per problem, each starting with its field path (``training.batch_size: ...``).

Relative paths inside a recipe (data files) are resolved against the recipe file's folder,
so a recipe and its data can move together. The output directory is relative to the
current directory (default ``adapters/<name>``).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from plugtune.kernel.bounds import MAX_DEPTH, MAX_NODES, read_json_file
from plugtune.kernel.components import DataPath, MetricDirections, _path_exists, missing_requirement
from plugtune.kernel.errors import DataError, PlugtuneError, RecipeError
from plugtune.kernel.faults import guarded
from plugtune.kernel.registry import Component, PluginSystem, did_you_mean, get_plugin_system, unknown_name_message
from plugtune.data.mixture import Mix, MixedData, MixedLoader, Source, carve_validation, load_data, path_options
from plugtune.data.tasks import Task, make_task, template_fields
from plugtune.training.budget import Budget, parse_budget


# --------------------------------------------------------------------------------------------
# The recipe's own schema
# --------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentBlock(_Strict):
    """``{name: lora, options: {...}}``; a bare string is accepted as ``{name: ...}``."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("options", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


MAX_COUNT = 10**9  # steps, epochs' worth of batches, sizes: far past any real run, short of overflow
MAX_EPOCHS = 1e6
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit


class SourceBlock(_Strict):
    """One source of a mixture (``data.sources[i]``); see core/data/mixture.py."""

    loader: str
    options: dict[str, Any] = Field(default_factory=dict)
    weight: float | None = Field(None, gt=0, allow_inf_nan=False, description="its share of the mixed training rows (mix: sample)")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="default: the loader and its file")
    task: dict[str, Any] | None = Field(None, description="task options for this source's rows only (normalize), e.g. format")
    max_rows: int | None = Field(None, gt=0, le=MAX_COUNT, description="a seeded subset of at most this many training rows")

    @field_validator("options", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


class DataBlock(_Strict):
    """``data: {loader, options}`` (one source) or ``data: {sources: [...], mix, seed, size}``."""

    loader: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    sources: list[SourceBlock] | None = Field(None, min_length=1)
    mix: Literal["concat", "sample"] = "concat"
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="the mixture's seed (default: training.seed)")
    size: int | None = Field(None, gt=0, le=MAX_COUNT, description="mix: sample: the mixed training rows (default: all sources' together)")
    validation: float | None = Field(
        None, gt=0, le=MAX_COUNT, allow_inf_nan=False,
        description="evaluate on this fraction (below 1) or number of training rows, carved out with the seed, instead of "
                    "the test split (for choosing between runs without reading the test split)")

    @field_validator("options", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _one_or_many(self) -> DataBlock:
        if self.loader is None and self.sources is None:
            raise ValueError("give a loader (one source: {loader, options}) or sources (a mixture: {sources: [...]})")
        if self.loader is not None and self.sources is not None:
            raise ValueError("give either loader (one source) or sources (a mixture), not both")
        given = sorted(k for k in ("mix", "seed", "size") if k in self.model_fields_set)  # validation: either way
        if self.sources is None and given:
            raise ValueError(f"{', '.join(given)} apply to a mixture (data.sources); a single loader takes none")
        if self.sources is not None and self.options:
            raise ValueError("options belong to each source (data.sources[i].options) in a mixture")
        return self


class TaskBlock(BaseModel):
    """``task: {type: NAME, <options>}``: the type is a registered task; the other keys are
    that task's ``Options``, validated against it in the registry pass."""

    model_config = ConfigDict(extra="allow")

    type: str


class TrainingBlock(_Strict):
    """``training:``. Every number is bounded at validation, before any folder is created:
    counts are whole numbers up to ``MAX_COUNT``, epochs and rates finite (``.inf``, ``.nan``
    and ``1e308`` are refused here, not after the output folder exists), the seed is one
    numpy accepts."""

    epochs: float = Field(1.0, gt=0, le=MAX_EPOCHS, allow_inf_nan=False)
    max_steps: int | None = Field(None, gt=0, le=MAX_COUNT)
    budget: str | float | None = Field(
        None, description="train for a time (10m, 90s, 1h30m) or a number of tokens (2M tokens) instead of epochs or "
                          "max_steps: the run times its first steps and chooses the steps and the schedule to fit "
                          "(core/training/budget.py); max_steps and explicit epochs cap it")
    batch_size: int = Field(8, gt=0, le=MAX_COUNT)
    grad_accum: int = Field(1, gt=0, le=MAX_COUNT)
    learning_rate: float | Literal["auto"] = Field(
        "auto", description="AdamW's rate, or auto: the method's reference rate scaled to the model's width and the "
                            "rows per step, a new classification head at a fresh layer's rate (core/training/rates.py)")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(0, ge=0, le=MAX_COUNT)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    eval_every: int = Field(0, ge=0, le=MAX_COUNT, description="evaluate every N steps (0: only before and after)")
    eval_before: bool = Field(True, description="evaluate the untrained model first, for the before/after table")
    eval_train_examples: int | None = Field(None, gt=0, le=MAX_COUNT, description="after training, also evaluate on this many training rows (overfitting gap)")
    max_new_tokens: int = Field(32, gt=0, le=MAX_COUNT, description="generation length for evaluators that generate (at most the model's context)")
    max_eval_examples: int | None = Field(None, gt=0, le=MAX_COUNT)
    eval_batch_size: int | None = Field(None, gt=0, le=MAX_COUNT)
    max_length: int = Field(256, gt=0, le=MAX_COUNT)
    max_grad_norm: float | None = Field(None, gt=0, allow_inf_nan=False)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="a run of several processes (--nproc, torchrun, accelerate launch): ddp keeps the whole model "
                           "in every process; fsdp shards its parameters, gradients and optimizer state over them "
                           "(torch FSDP2, one unit per decoder layer; core/training/sharding.py). One process trains "
                           "unsharded either way")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    base_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="dtype the frozen base is loaded in; auto: fp32 on CPU, bf16 on a GPU unless the method trains base weights")
    log_every: int = Field(1, gt=0, le=MAX_COUNT)
    checkpoint_every: int = Field(100, ge=0, le=MAX_COUNT, description="save a checkpoint every N steps (0: only on Ctrl-C)")
    checkpoint_keep: int = Field(2, gt=0, le=MAX_COUNT, description="how many of the newest checkpoints to keep")
    overlong: Literal["truncate", "drop", "refuse"] = Field(
        "truncate", description="rows longer than max_length (or the model's context): cut, leave out, or stop with an error")
    # compute savers and hardware defaults (core/batching.py, core/loss.py, core/tokenized_cache.py, core/runtime.py)
    group_by_length: bool = Field(True, description="batch rows of similar length together (less padding); the order stays a function of seed and epoch")
    logits_on_labels_only: bool = Field(True, description="causal LM: apply the LM head and loss only where labels are")
    packing: bool | Literal["auto"] = Field(
        "auto", description="causal LM and chat tasks: lay each step's batch_size examples into as few rows of at most "
                            "max(max_length, the longest example) positions as fit, each example with its own positions and "
                            "attention (core/data/packing.py); the examples and the loss stay those of the unpacked step. "
                            "true: pack (refused where a task, method or attention cannot); false: one example per row; "
                            "auto: pack on a CPU wherever true would not be refused (measured faster than length grouping, or equal: BENCHMARKS.md, Packing), not on a GPU (not measured there)")
    cache_tokenized: bool = Field(True, description="reuse tokenized splits across runs (under $PLUGTUNE_HOME/tokenized)")
    threads: int | None = Field(None, gt=0, le=4096, description="CPU threads per process; default: physical cores / processes on this host")
    attention: Literal["auto", "sdpa", "eager"] = Field("auto", description="attention implementation; auto: sdpa on GPUs, the library default on CPUs (with grouped-query SDPA); sdpa/eager: transformers' own, unchanged")
    malloc_mmap_threshold: Literal["auto"] | int | None = Field(
        "auto",
        description="CPU runs on Linux/glibc: where freed tensor memory goes. auto: kept in the process for the next step "
                    "(mmap threshold 32 MiB, no trim: half the page faults of glibc's defaults in fp32, same peak RSS: BENCHMARKS.md); "
                    "N bytes: tensors of at least N get their own mapping, given back to the OS when freed (1048576: "
                    "the memory saver, about 7-12% lower peak RSS, slower steps); 0 or null: glibc's defaults")

    @field_validator("malloc_mmap_threshold", mode="before")
    @classmethod
    def _threshold_or_auto(cls, value: Any) -> Any:
        """One message for any bad setting (a union would report each branch)."""
        if value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 32 << 20):
            return value
        raise ValueError(f"must be auto, null, or a byte count from 0 to {32 << 20} (glibc's largest mmap threshold), got {value!r}")

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _rate_or_auto(cls, value: Any) -> Any:
        """One message for any bad rate (a union would report each branch)."""
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            rate = float(value) if not isinstance(value, bool) else float("nan")
        except (TypeError, ValueError):
            rate = float("nan")
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"Input should be a finite number above 0 such as 1e-3, or auto (got {value!r})")
        return rate

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_parses(cls, value: Any) -> Any:
        if value is not None:
            parse_budget(value)  # its ValueError names the accepted forms
        return value

    def parsed_budget(self) -> Budget | None:
        """The budget as a :class:`~plugtune.training.budget.Budget`, or None."""
        return None if self.budget is None else parse_budget(self.budget)


class OutputBlock(_Strict):
    dir: str | None = None
    overwrite: bool = False


class RecipeSpec(_Strict):
    """The recipe as written. Component ``options`` stay raw here; see :class:`Recipe`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    base_model: str
    task: TaskBlock
    data: DataBlock
    method: ComponentBlock
    regularizers: list[ComponentBlock] = Field(default_factory=list)
    evaluators: list[ComponentBlock] | None = Field(
        None, description="default: every installed evaluator that declares itself a default (see default_evaluators)")
    training: TrainingBlock = Field(default_factory=TrainingBlock)
    output: OutputBlock = Field(default_factory=OutputBlock)
    tracking: list[ComponentBlock] = Field(
        default_factory=list, description="experiment trackers that receive the run (names of registered trackers)")


# --------------------------------------------------------------------------------------------
# The validated recipe
# --------------------------------------------------------------------------------------------


@dataclass
class Bound:
    """A component resolved from the registry with its validated options."""

    name: str
    component: Component
    options: Any

    def build(self, *args: Any) -> Any:
        return self.component.obj(self.options, *args)

    def options_dict(self) -> dict[str, Any]:
        return self.options.model_dump(mode="json") if self.options is not None else {}


@dataclass
class Recipe:
    """A fully validated recipe: spec, task, and bound components."""

    spec: RecipeSpec
    raw: dict[str, Any]
    source: Path | None
    base_dir: Path
    task: Task
    loader: Bound | MixedLoader  # a mixture's stand-in when data has sources (core/data/mixture.py)
    method: Bound
    regularizers: list[Bound]
    evaluators: list[Bound]
    sources: list[Source] = field(default_factory=list)  # every source, the single one too
    trackers: list[Bound] = field(default_factory=list)  # the recipe's tracking: entries, built per run
    mix: Mix | None = None  # None: one loader, no mixture

    @property
    def is_mixture(self) -> bool:
        return self.mix is not None

    def load_data(self, seed: int | None = None, task: Task | None = None) -> MixedData:
        """Every source loaded, its rows normalized, mixed as ``data`` says; with each
        source's counts and the normalizers' notes (core/data/mixture.py). ``task``: the
        caller's copy of the recipe's task, which normalizes a single source's rows (and keeps
        what it noted); default a fresh copy. ``seed``: default ``training.seed``."""
        task = task if task is not None else copy.deepcopy(self.task)
        seed = self.training.seed if seed is None else seed
        data = load_data(self.sources, task, seed, self.mix)
        if self.spec.data.validation is not None:
            data = carve_validation(data, self.spec.data.validation, seed)
        return data

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def training(self) -> TrainingBlock:
        return self.spec.training

    @property
    def output_dir(self) -> Path:
        return Path(self.spec.output.dir or f"adapters/{self.spec.name}")

    def metric_directions(self) -> MetricDirections:
        """Which way each metric of this recipe's evaluators improves, as they declare."""
        return MetricDirections.of(b.component.obj for b in self.evaluators)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class YamlBoundError(yaml.YAMLError):
    """A recipe's YAML is well formed but refused: a duplicated key, nesting past
    :data:`~plugtune.kernel.bounds.MAX_DEPTH`, or aliases that expand past
    :data:`~plugtune.kernel.bounds.MAX_NODES` nodes. ``line`` is 1-based."""

    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.message = message
        self.line = mark.line + 1 if mark is not None else None


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2 floats without a dot (``1e-3``, ``5E4``), and
    bounded: a key may appear once per mapping (a second ``training:`` block would silently
    replace the first), nesting stops at ``MAX_DEPTH`` while the document is composed (before
    the recursive composer can overflow the stack), and the composed graph may expand, every
    alias followed, to at most ``MAX_NODES`` nodes (counted once per distinct node, so the
    count itself is linear in the document)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            return super().compose_node(parent, index)  # a scalar or an alias: no deeper
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlBoundError(f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        _check_expansion(node)
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *base" entries may be overridden by the keys beside them
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base constructor says so
                    continue
                if first is not None:
                    raise YamlBoundError(f"key {str(key)[:80]!r} appears twice (first on line {first}); keep one",
                                         key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: Any) -> None:
    """Refuse a composed YAML graph that expands past ``MAX_NODES`` nodes or nests past
    ``MAX_DEPTH`` once aliases are followed, or that contains itself (``&a [*a]``). Sizes are
    memoized per node, without recursion."""
    if root is None:
        return
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _yaml_children(node)
        if done:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = int(not isinstance(node, yaml.ScalarNode)) + max((depth[id(c)] for c in children), default=0)
            if size[key] > MAX_NODES:
                raise YamlBoundError(f"aliases expand to more than {MAX_NODES:,} values; "
                                     f"write the values out, or use fewer aliases", root.start_mark)
            if depth[key] > MAX_DEPTH:
                raise YamlBoundError(f"nested more than {MAX_DEPTH} levels deep once aliases are followed", node.start_mark)
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise YamlBoundError("an alias refers to the block that contains it", node.start_mark)
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def _yaml_children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """``["training.max_steps=10", "method.options.r=4"]`` -> paths and YAML-typed values."""
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError([f"override {item!r}: expected key.sub=value"])
        try:
            typed = yaml.load(value, Loader=_YamlLoader) if value.strip() else ""
        except YamlBoundError as exc:
            raise RecipeError([f"override {key.strip()[:80]}: {exc.message}"]) from None
        except yaml.YAMLError:
            typed = value
        parsed.append((key.strip().split("."), typed))
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for path, value in parse_overrides(overrides):
        node = raw
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError([f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not an index of the list"])
                node = node[int(part)]
                continue
            child = node.get(part)
            if isinstance(child, str) and part in {"method"} | {"regularizers", "evaluators", "tracking"}:
                child = node[part] = {"name": child}
            if child is None:
                child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise RecipeError([f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is a value, not a section"])
            node = child
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise RecipeError([f"override {'.'.join(path)}: {last} is not an index of the list"])
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path}"])
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)
    except UnicodeDecodeError as exc:
        raise RecipeError([f"not UTF-8 text ({exc.reason} at byte {exc.start})"], str(path)) from None
    except YamlBoundError as exc:
        raise RecipeError([f"line {exc.line}: {exc.message}" if exc.line else exc.message], str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"malformed YAML: {where}{problem}"], str(path)) from None
    if not isinstance(raw, dict):
        raise RecipeError(["a recipe is a YAML mapping (key: value lines)"], str(path))
    return raw


def load_recipe(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    raw: dict[str, Any] | None = None,
    base_dir: str | Path | None = None,
    plugins: PluginSystem | None = None,
    check_data: bool = True,
) -> Recipe:
    """Read, override and validate a recipe. Raises :class:`RecipeError` listing every
    problem. Pass ``raw`` (a dict) instead of ``path`` to validate a recipe built in code."""
    if raw is None:
        if path is None:
            raise TypeError("load_recipe needs a path or raw=")
        raw = read_recipe_file(path)
    else:
        raw = copy.deepcopy(raw)
    source = Path(path) if path is not None else None
    base = Path(base_dir) if base_dir is not None else (source.parent if source else Path.cwd())
    raw = apply_overrides(raw, overrides or [])
    return validate(raw, source=source, base_dir=base, plugins=plugins or get_plugin_system(), check_data=check_data)


def validate(
    raw: dict[str, Any], *, source: Path | None, base_dir: Path, plugins: PluginSystem, check_data: bool = True
) -> Recipe:
    problems: list[str] = []
    where = str(source) if source else None
    try:
        spec = RecipeSpec.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_format_errors(exc, RecipeSpec, prefix=()))
        spec = None
    # Component blocks are checked even when the recipe's shape has problems elsewhere, so
    # that one run shows everything.
    context = {"base_dir": base_dir}
    method = _bind(plugins, "method", raw.get("method"), ("method",), context, problems)
    loader = _bind(plugins, "loader", _data_as_block(raw.get("data")), ("data",), context, problems, name_key="loader")
    regularizers = [
        _bind(plugins, "regularizer", block, ("regularizers", i), context, problems)
        for i, block in enumerate(_as_list(raw.get("regularizers")))
    ]
    evaluator_blocks = raw["evaluators"] if raw.get("evaluators") is not None else default_evaluators(plugins)
    evaluators = [
        _bind(plugins, "evaluator", block, ("evaluators", i), context, problems)
        for i, block in enumerate(_as_list(evaluator_blocks))
    ]
    trackers = _bind_trackers(plugins, raw.get("tracking"), context, problems)
    if method is not None and hasattr(method.component.obj, "preflight"):
        reason = method.build().preflight()
        if reason:
            problems.append(f"method.name: {reason}")
    base_model = raw.get("base_model")
    problems.extend(_check_hub_base(base_model))
    problems.extend(_check_merged_base(plugins, base_model, method))
    if isinstance(base_model, str) and not _looks_like_path_or_hub_id(base_model) and not plugins.find("model", base_model):
        problems.append(
            "base_model: " + unknown_name_message("model", base_model, plugins.names("model"))
            + "; or give a local model folder, a .gguf file or a hub id (org/name)"
        )

    sources, overrides = _bind_sources(plugins, raw.get("data"), context, problems)
    task = _bind_task(plugins, raw.get("task"), context, problems)
    if task is not None:
        unbound = _bind_source_tasks(plugins, raw.get("task"), task, sources, overrides, context, problems)
        if loader is not None and check_data:
            problems.extend(_check_columns(loader, task, spec))
        if check_data:
            for source in sources:
                if source.loader is not None and source.where not in unbound:  # its task is not known
                    problems.extend(_check_columns(source.loader, source.task or task, spec, source))
        problems.extend(_check_task(task, method, regularizers, evaluators))
        if spec is not None:
            problems.extend(_check_packing(spec.training, task, method, regularizers))
    problems.extend(_check_streaming(loader, sources, spec, regularizers))
    problems.extend(_check_distributed(spec, method, regularizers))
    if task is not None and method is not None:
        problems.extend(_check_reference(task, method, loader, regularizers))
    problems.extend(_check_metric_directions(regularizers, evaluators))
    problems.extend(_check_model(plugins, raw.get("base_model"), task, method, regularizers, evaluators))
    if spec is not None and task is not None:
        problems.extend(_check_generation_length(plugins, spec, task))
    if problems or spec is None or task is None or method is None or (loader is None and not sources):
        raise RecipeError(problems or ["invalid recipe"], where)
    mix = Mix(spec.data.mix, spec.data.seed, spec.data.size) if sources else None
    return Recipe(
        spec=spec,
        raw=raw,
        source=source,
        base_dir=base_dir,
        task=task,
        loader=loader if loader is not None else MixedLoader(sources, mix, task),
        method=method,
        regularizers=[r for r in regularizers if r is not None],
        evaluators=[e for e in evaluators if e is not None],
        sources=sources or [Source(loader.name, loader)],
        mix=mix,
        trackers=trackers,
    )


def default_evaluators(plugins: PluginSystem) -> list[str]:
    """The evaluators of a recipe that lists none: every registered evaluator whose class
    declares ``default = True`` (the built-in ``loss`` does). The core names none itself, so a
    plugin may add to the defaults or a distribution without the built-ins provide its own."""
    return [name for name in plugins.names("evaluator") if getattr(plugins.get("evaluator", name).obj, "default", False) is True]


# Hooks of a regularizer that read or rewrite parameters or gradients: under fsdp those are
# each process's shards (DTensors), which code written for whole tensors cannot use.
PARAMETER_HOOKS = ("loss_term", "after_backward")


def _check_distributed(spec: RecipeSpec | None, method: Bound | None, regularizers: list[Bound | None]) -> list[str]:
    """Why ``training.distributed: fsdp`` cannot train this recipe, before any weight loads: a
    method that loads its base quantized (int8/4-bit weights cannot be split into DTensor
    shards), a regularizer with a hook over parameters or gradients (:data:`PARAMETER_HOOKS`)."""
    if spec is None or spec.training.distributed != "fsdp":
        return []
    problems = []
    if method is not None and hasattr(method.component.obj, "base_loading"):
        problems.append(f"training.distributed: fsdp cannot shard the quantized base that {method.name} loads; "
                        f"use training.distributed: ddp, or a method on an unquantized base")
    for i, bound in enumerate(regularizers):
        hooks = [h for h in PARAMETER_HOOKS if bound is not None and hasattr(bound.component.obj, h)]
        if hooks:
            problems.append(f"regularizers[{i}]: {bound.name}'s {hooks[0]} reads parameters or gradients, which under "
                            f"training.distributed: fsdp are per-process shards; drop it or use training.distributed: ddp")
    return problems


def _check_metric_directions(regularizers: list[Bound | None], evaluators: list[Bound | None]) -> list[str]:
    """Regularizers that select on a metric (``check_metrics``) against the directions the
    recipe's evaluators declare; a problem is reported under ``regularizers[i].``."""
    try:
        directions = MetricDirections.of(b.component.obj for b in evaluators if b is not None)
    except ValueError as exc:  # an evaluator declared something other than min/max
        return [f"evaluators: {exc}"]
    problems = []
    for i, bound in enumerate(regularizers):
        check = getattr(bound.component.obj, "check_metrics", None) if bound is not None else None
        for problem in (check(bound.options, directions) if check else None) or []:
            problems.append(f"regularizers[{i}].{problem}")
    return problems


def _check_hub_base(base_model: Any) -> list[str]:
    """An ``hf://org/name`` base is an adapter in the local Hugging Face cache: resolved
    without network (core/artifacts/hub.py); not cached, or not an adapter, is one problem."""
    from plugtune.artifacts.adapters import read_manifest
    from plugtune.artifacts.hub import is_hub_ref

    if not is_hub_ref(base_model):
        return []
    try:
        read_manifest(base_model)
    except PlugtuneError as exc:
        return [f"base_model: {exc}"]
    return []


def _check_merged_base(plugins: PluginSystem, base_model: Any, method: Bound | None) -> list[str]:
    """An adapter folder as ``base_model`` is merged into its base in full precision; a
    method that loads its base itself (``base_loading`` returns extra arguments: quantized)
    cannot train on it. Checked on the local folder only, before anything loads."""
    if method is None or not isinstance(base_model, str) or not hasattr(method.component.obj, "base_loading"):
        return []
    from plugtune.artifacts.adapters import is_adapter_dir
    from plugtune.artifacts.models import local_location, merged_base_refusal
    from plugtune.kernel.components import BaseLoading

    location = local_location(base_model, plugins)
    if location is None or not is_adapter_dir(location):
        return []
    if not guarded(method.build(), method.component).base_loading(BaseLoading()):
        return []
    return [f"base_model: {merged_base_refusal(base_model)}"]


def _check_model(
    plugins: PluginSystem, base_model: Any, task: Task | None, method: Bound | None,
    regularizers: list[Bound | None], evaluators: list[Bound | None],
) -> list[str]:
    """Components against the base model's outline (config and module names, no weights;
    see :class:`~plugtune.kernel.components.ChecksModel`): each bound component with a
    ``check_model`` reports problems relative to its block, prefixed here with the block's
    path. Skipped when no component checks, or when the model has no local outline (a hub
    id, an alias not fetched yet): validation never fetches or loads weights."""
    if task is None or not isinstance(base_model, str):
        return []
    blocks = [("method", method, ())] if method is not None else []
    blocks += [(f"regularizers[{i}]", b, ()) for i, b in enumerate(regularizers) if b is not None]
    blocks += [(f"evaluators[{i}]", b, (task,)) for i, b in enumerate(evaluators) if b is not None]
    checks = [(path, guarded(b.build(*args), b.component)) for path, b, args in blocks
              if hasattr(b.component.obj, "check_model")]  # a plugin's failure names the plugin
    if hasattr(task, "check_model"):
        checks.append(("task", task))
    if not checks:
        return []
    from plugtune.artifacts.outline import OutlineUnavailable, outline_for

    outline = outline_for(base_model, task, plugins)
    if outline is None:
        return []
    try:
        return [f"{path}.{problem}" for path, component in checks for problem in component.check_model(outline, task) or []]
    except OutlineUnavailable:  # the model cannot be outlined: loading it will say why
        return []


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _check_generation_length(plugins: PluginSystem, spec: RecipeSpec, task: Task) -> list[str]:
    """``training.max_new_tokens`` past the base model's context is refused at validation
    (generating evaluators would otherwise run a model past its positions, or for hours). The
    context is read from the local ``config.json`` (a small JSON file, bounded); a model that
    is not local, or whose config names no context length, is not checked."""
    from plugtune.artifacts.outline import outline_for

    outline = outline_for(spec.base_model, task, plugins)
    config = outline.location / "config.json" if outline is not None and outline.location.is_dir() else None
    if config is None or not config.is_file():
        return []
    try:
        data = read_json_file(config, ValueError)
    except ValueError:
        return []  # loading the model reports an unreadable config
    context = next((data[k] for k in CONTEXT_KEYS if isinstance(data.get(k), int) and not isinstance(data.get(k), bool)), None)
    wanted = spec.training.max_new_tokens
    if context is None or context <= 0 or wanted < context:
        return []
    return [f"training.max_new_tokens: {wanted} tokens is past the context of {spec.base_model} "
            f"({context} tokens, prompt included); use at most {context - 1}"]


def _check_task(task: Task, method: Bound | None, regularizers: list[Bound | None],
                evaluators: list[Bound | None]) -> list[str]:
    """Components that cannot serve the recipe's task say so at validation: each bound
    component's class may have ``check_task(task) -> str | None`` (a classmethod: a reason,
    e.g. ROUGE on a classification task, or a method that trains language-model heads only).
    The problem is reported at the block's ``name``."""
    blocks = [("method", method)] + [(f"regularizers[{i}]", b) for i, b in enumerate(regularizers)]
    blocks += [(f"evaluators[{i}]", b) for i, b in enumerate(evaluators)]
    problems = []
    for path, bound in blocks:
        check = getattr(bound.component.obj, "check_task", None) if bound is not None else None
        if check is None:
            continue
        try:
            reason = check(task)
        except Exception as exc:  # noqa: BLE001 - a plugin failure names the plugin
            reason = f"{bound.component.plugin.describe()} failed in check_task: {type(exc).__name__}: {exc}"
        if reason:
            problems.append(f"{path}.name: {reason}")
    return problems


def _valid_or_none(model: type[BaseModel], value: Any) -> Any:
    """``value`` validated as ``model``, or None when invalid (its errors are reported elsewhere)."""
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


def _looks_like_path_or_hub_id(value: str) -> bool:
    return "/" in value or value.endswith(".gguf") or _path_exists(Path(value))


def _data_as_block(data: Any) -> Any:
    if isinstance(data, dict) and "loader" in data and "sources" not in data:  # a mixture binds each source
        return {"name": data["loader"], "options": data.get("options") or {}}
    return None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _bind(
    plugins: PluginSystem,
    kind: str,
    block: Any,
    path: tuple[Any, ...],
    context: dict[str, Any],
    problems: list[str],
    name_key: str = "name",
) -> Bound | None:
    if isinstance(block, str):
        block = {"name": block}
    if not isinstance(block, dict) or not isinstance(block.get("name"), str):
        return None  # the shape error is reported by RecipeSpec
    name = block["name"]
    component = plugins.find(kind, name)
    if component is None:
        problems.append(f"{_path(path + (name_key,))}: " + plugins.unknown_message(kind, name))
        return None
    options_model = component.options_model
    options = block.get("options") or {}
    if options_model is None:
        return Bound(name, component, None)
    if not isinstance(options, dict):
        problems.append(f"{_path(path + ('options',))}: expected a mapping of options, got {type(options).__name__}")
        return None
    chooser = getattr(options_model, "options_model_for", None)  # fields that depend on a value in the block
    if chooser is not None:
        options_model = chooser(options)
    try:
        bound = options_model.model_validate(options, context=context)
    except ValidationError as exc:
        problems.extend(_format_errors(exc, options_model, prefix=path + ("options",)))
        return None
    return Bound(name, component, bound)


def _bind_trackers(plugins: PluginSystem, blocks: Any, context: dict[str, Any], problems: list[str]) -> list[Bound]:
    """The recipe's ``tracking:`` entries bound like any component block (unknown names get a
    did-you-mean, options are checked at ``tracking[i].options``), and each tracker's library
    looked up without importing it, so a missing one is a validation problem naming the
    extra that installs it rather than an ImportError after the weights loaded."""
    bound = []
    for i, block in enumerate(_as_list(blocks)):
        tracker = _bind(plugins, "tracker", block, ("tracking", i), context, problems)
        if tracker is None:
            continue
        missing = missing_requirement(tracker.component.obj)
        if missing:
            problems.append(f"tracking[{i}]: {tracker.name} {missing}")
            continue
        bound.append(tracker)
    return bound


def _bind_task(plugins: PluginSystem, block: Any, context: dict[str, Any], problems: list[str]) -> Task | None:
    """The recipe's task, built through the registry: ``task.type`` resolved with a
    did-you-mean, the rest of the block validated as that task's ``Options``."""
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        return None  # the shape error is reported by RecipeSpec
    component = plugins.find("task", block["type"])
    if component is None:
        problems.append("task.type: " + unknown_name_message("task", block["type"], plugins.names("task")))
        return None
    options_model = component.options_model
    try:
        options = options_model.model_validate({k: v for k, v in block.items() if k != "type"}, context=context)
    except ValidationError as exc:
        problems.extend(_format_errors(exc, options_model, prefix=("task",)))
        return None
    return make_task(component, options)


def _check_columns(loader: Bound, task: Task, spec: RecipeSpec, source: Source | None = None) -> list[str]:
    """The loader's columns (after its column mapping) against what the task reads: a
    single source's at ``data``, a mixture's each at ``data.sources[i]`` with its own task."""
    where = source.where if source is not None else "data"
    try:
        columns = loader.build().columns()
    except DataError as exc:
        return [f"{where}.options: {exc}"]
    check = getattr(task, "check_columns", None)
    if check is not None:  # a task whose fields depend on the data (the chat task's formats)
        problems = [f"task.{p}" for p in check(list(columns)) or []]
        if problems and source is not None:  # whose columns, and where to rename them
            problems = [f"{where}: {p.replace('data.options.', where + '.options.')}" for p in problems]
        if problems:
            return problems
    normalized = getattr(task, "normalize", None) is not None
    missing = [] if normalized and check is not None else sorted(task.required_fields() - set(columns))
    if not missing:
        return []
    problems = []
    data = f" of {where} ({source.name})" if source is not None else ""
    for column in missing:
        hint = did_you_mean(column, columns)
        field = f"task.{_option_naming(task, column)}"
        problems.append(
            f"{field}: column {column!r} is not in the data{data}{hint} (columns: {', '.join(columns)}); "
            f"rename it with {where}.options.columns"
        )
    return problems


def _bind_sources(plugins: PluginSystem, data: Any, context: dict[str, Any],
                  problems: list[str]) -> tuple[list[Source], list[tuple[int, Any]]]:
    """A mixture's sources (``data.sources``), each loader resolved and its options bound
    at ``data.sources[i]``; names defaulted (``loader:file``) and checked unique; weights
    required when sampling. Empty for a single loader (or a shape RecipeSpec refuses).
    Also returns each source's raw ``task`` override with its index, for
    :func:`_bind_source_tasks`."""
    blocks = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(blocks, list):
        return [], []
    sampling = data.get("mix") == "sample"
    sources: list[Source] = []
    overrides: list[tuple[int, Any]] = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or not isinstance(block.get("loader"), str):
            continue  # the shape error is reported by RecipeSpec
        path = ("data", "sources", i)
        where = _path(path)
        options = block.get("options") or {}
        loader = _bind(plugins, "loader", {"name": block["loader"], "options": options}, path, context, problems,
                       name_key="loader") if isinstance(options, dict) else None  # else RecipeSpec says so
        weight = block.get("weight")
        if sampling and weight is None:
            problems.append(f"{where}.weight: mix: sample draws each source by its weight; give every source a "
                            f"weight (a positive number; they need not add up to 1)")
        elif not sampling and weight is not None:
            problems.append(f"{where}.weight: weights apply to mix: sample; remove it, or set data.mix: sample")
        name = block.get("name") if isinstance(block.get("name"), str) else _default_name(block["loader"], loader)
        max_rows = block.get("max_rows") if isinstance(block.get("max_rows"), int) else None
        sources.append(Source(name, loader, where, weight if isinstance(weight, (int, float)) else None, None, max_rows))
        overrides.append((i, block.get("task")))
    if not sampling and isinstance(data.get("size"), int):
        problems.append("data.size: size applies to mix: sample (concat keeps every row); remove it, or set data.mix: sample")
    seen: dict[str, Source] = {}
    for i, source in enumerate(sources):
        if source.name in seen:
            explicit = isinstance(blocks[i], dict) and "name" in blocks[i]
            if explicit:
                problems.append(f"{source.where}.name: {source.name!r} is also the name of {seen[source.name].where}; "
                                f"give each source its own name")
                continue
            source.name = f"{source.name}#{i}"
        seen[source.name] = source
    return sources, overrides


def _default_name(loader_name: str, loader: Bound | None) -> str:
    """``table:tickets.csv``: the loader and the first file its options name."""
    paths = path_options(loader.options) if loader is not None and loader.options is not None else []
    return f"{loader_name}:{paths[0][1].name}" if paths else loader_name


def _bind_source_tasks(plugins: PluginSystem, block: Any, task: Task, sources: list[Source],
                       overrides: list[tuple[int, Any]], context: dict[str, Any], problems: list[str]) -> set[str]:
    """``data.sources[i].task``: options of the recipe's task for that source's rows only,
    built into a task of the same type that normalizes them. Refused: another type, a key
    the task does not have, a task without ``normalize`` (the override would change
    nothing), and ``template`` (one adapter has one chat template, recorded in its manifest
    and used at inference). Returns the sources (by field path) whose options were refused."""
    component = plugins.find("task", task.type)
    if component is None or not isinstance(block, dict):
        return set()
    unbound: set[str] = set()
    for source, (index, override) in zip(sources, overrides):
        if override is None:
            continue
        unbound.add(source.where)  # until its task is built
        where = f"{source.where}.task"
        if not isinstance(override, dict):
            continue  # the shape error is reported by RecipeSpec
        if "type" in override and override["type"] != task.type:
            problems.append(f"{where}.type: a source's task is the recipe's ({task.type}) with other options; "
                            f"remove type, or train on the other task in a recipe of its own")
            continue
        if not all(isinstance(k, str) for k in override):
            continue  # the shape error is reported by RecipeSpec
        keys = [k for k in override if k != "type"]
        allowed = list(component.options_model.model_fields) if component.options_model is not None else []
        bad = [k for k in keys if k not in allowed and k != "template"]
        for key in bad:
            hint = did_you_mean(str(key), allowed)
            problems.append(f"{_path(('data', 'sources', index, 'task', str(key)))}: unknown key"
                            f"{hint or ' (allowed: ' + ', '.join(allowed) + ')'}")
        if "template" in keys:
            problems.append(f"{where}.template: one adapter has one chat template (recorded in its manifest and used "
                            f"at inference); set task.template for the whole recipe")
            continue
        if bad:
            continue
        if getattr(task, "normalize", None) is None:
            problems.append(f"{where}: task {task.type} does not normalize rows, so options for one source change "
                            f"nothing; remove {where}")
            continue
        merged = {k: v for k, v in {**block, **override}.items() if k != "type"}
        try:
            options = component.options_model.model_validate(merged, context=context)
        except ValidationError as exc:
            problems.extend(_format_errors(exc, component.options_model, prefix=("data", "sources", index, "task")))
            continue
        source.task = make_task(component, options)
        unbound.discard(source.where)
    return unbound


def _check_packing(training: TrainingBlock, task: Task, method: Bound | None,
                   regularizers: list[Bound | None]) -> list[str]:
    """``training.packing: true`` where rows of several examples cannot keep them apart: a
    classifier task (one label per row), a task computing its own loss over whole rows, a
    method or regularizer that declares ``cannot_pack``. ``auto`` is never refused (it packs
    only where it can)."""
    if training.packing is not True:
        return []
    from plugtune.data.packing import packing_problem

    named = [(r.name, r.component.obj) for r in regularizers if r is not None]
    reason = packing_problem(task, method.component.obj if method is not None else None, method.name if method else "", named)
    return [f"training.packing: {reason}; set training.packing: false (or auto)"] if reason else []


def _check_streaming(loader: Bound | None, sources: list[Source], spec: RecipeSpec | None,
                     regularizers: list[Bound | None]) -> list[str]:
    """A loader that ``streams`` its training split (a :class:`RowStream`) needs
    ``training.max_steps`` (a stream has no length to count epochs in), no regularizer
    that rewrites the training rows in memory (``augment_examples``), and no mixture (mixing
    draws from whole splits)."""
    if sources:
        return [f"{s.where}.options.streaming: a mixture's sources are read whole, so one cannot stream; "
                f"stream a single source (data.loader), or set streaming: false"
                for s in sources if s.loader is not None and getattr(s.loader.build(), "streams", False)]
    if loader is None or not getattr(loader.build(), "streams", False):
        return []
    problems = []
    if spec is not None and spec.training.max_steps is None and spec.training.budget is None:
        problems.append("training.max_steps: the data loader streams the training split, which has no length to "
                        "count epochs in; set training.max_steps or training.budget")
    if spec is not None and spec.data.validation is not None:
        problems.append("data.validation: the data loader streams the training split, which is never all in memory to "
                        "carve rows from; give the loader a test split, or stop streaming")
    for i, bound in enumerate(regularizers):
        if bound is not None and hasattr(bound.component.obj, "augment_examples"):
            problems.append(f"regularizers[{i}]: {bound.name} rewrites the training rows in memory, which a streamed "
                            f"training split never is; drop it or stop streaming")
    return problems


def _check_reference(task: Task, method: Bound, loader: Bound | None, regularizers: list[Bound | None]) -> list[str]:
    """A task with a reference model (preference objectives) can get its scores the way
    ``task.reference`` asks with this method and data (core/training/reference.py)."""
    from plugtune.training.reference import choose_mode, has_reference, mode_problems

    if not has_reference(task):
        return []
    streamed = loader is not None and bool(getattr(loader.build(), "streams", False))
    rewrites = [b.name for b in regularizers if b is not None and hasattr(b.component.obj, "transform_batch")]
    mode = choose_mode(task.reference, method.component.obj, streamed=streamed, rewrites_batches=bool(rewrites))
    return mode_problems(mode, method.component.obj, method.name, streamed=streamed, rewrites_batches=rewrites)


def _option_naming(task: Task, column: str) -> str:
    """The task option that names ``column``: a template using it, else an option whose
    value is the column itself (``label: sentiment``), for the error's field path."""
    options = {k: v for k, v in task.to_dict().items() if k != "type" and isinstance(v, str)}
    exact = [k for k, v in options.items() if v == column]
    templates = [k for k, v in options.items() if column in _fields_or_none(v)]
    return (exact or templates or ["type"])[0]


def _fields_or_none(value: str) -> set[str]:
    """The fields of ``value`` read as a template; none when it is not one (an option naming
    a column, such as ``label: "{"``, is a plain string)."""
    try:
        return template_fields(value)
    except ValueError:
        return set()


def _path(parts: tuple[Any, ...]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, str) and not re.fullmatch(r"[\w.-]+", p):
            p = repr(p[:60])  # a key with spaces, newlines or brackets: quoted, so the message stays one line
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _format_errors(exc: ValidationError, model: type[BaseModel], prefix: tuple[Any, ...]) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))  # drop union tags
        if err["type"] == "extra_forbidden":  # the last part is the user's own key, whatever it looks like
            loc = tuple(p for p in err["loc"][:-1] if not (isinstance(p, str) and "[" in p)) + tuple(err["loc"][-1:])
        where = _path(prefix + loc) or "recipe"
        if err["type"] == "extra_forbidden":
            siblings = _field_names(model, loc[:-1])
            hint = did_you_mean(str(loc[-1]), siblings)
            allowed = f" (allowed: {', '.join(siblings)})" if siblings and not hint else ""
            lines.append(f"{where}: unknown key{hint}{allowed}")
            continue
        message = err["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        got = err.get("input")
        if err["type"] not in {"missing", "value_error"} and not isinstance(got, (dict, list)):
            message += f" (got {got!r})"
        if err["type"] == "literal_error" and isinstance(got, str):  # a choice misspelt: the closest one
            message += did_you_mean(got, re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", ""))))
        lines.append(f"{where}: {message}")
    return lines


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The allowed keys at ``loc`` inside ``model`` (for did-you-mean on unknown keys)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def dump_recipe(raw: dict[str, Any]) -> str:
    return yaml.safe_dump(raw, sort_keys=False)


__all__ = ["Recipe", "RecipeSpec", "DataPath", "load_recipe"]
