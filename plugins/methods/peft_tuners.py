"""Every peft tuner as a tuning method: a generic ``peft`` method and named entries.

    method:
      name: peft                 # any peft tuner type, options = that config's fields
      options: {type: LOHA, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}

    method:
      name: loha                 # the same, by name
      options: {r: 8, alpha: 16, target_modules: [q_proj, v_proj]}

The options of each are the fields of peft's config dataclass for that type (``LoHaConfig``,
``OFTConfig``, ...), read from the dataclass itself, so a recipe validates against the peft
that is installed: an unknown key gets a did-you-mean, a wrong type one line, and the config's
own checks (``OFTConfig`` refusing ``r`` and ``oft_block_size`` together) run at
``plugtune validate``; with the base on disk, peft also builds the adapter's layers on the
model's meta-device outline there, so a target that matches nothing is caught before any
weights load. Fields plugtune sets itself are not options: ``task_type`` (from the task),
``modules_to_save`` (a classification head is trained and saved by the task's rule),
``inference_mode``, ``total_step`` (AdaLoRA: the run's step count) and peft's bookkeeping.
Named entries rename a few fields for readability (``dropout`` for ``boft_dropout``) and fix
the ones that make the entry what it is (``dora`` is ``LORA`` with ``use_dora: true``).

Adapters are peft's own (``PeftModel.from_pretrained`` loads them) and are hosted by
:class:`PeftHandler` (:mod:`plugtune.plugins.methods.peft_hosting`): resident beside every
other method's adapters, switched by one attribute write, rows of one batch on different
adapters (DoRA, LoHa, LoRA and bare-base rows together), folded into the base and back.

AdaLoRA reallocates its ranks while it trains: the method's ``on_step`` calls peft's
``update_and_allocate`` after each optimizer step, before the gradients are zeroed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import typing
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import ConfigDict, Field, TypeAdapter, create_model, field_validator, model_validator

from plugtune import hookimpl
from plugtune.plugins.methods.lora import peft_adapter_off
from plugtune.sdk import Combined, ComponentOptions, PrepareContext, RecipeError, Task

if TYPE_CHECKING:
    import torch

    from plugtune.plugins.methods.peft_hosting import PeftLayers
    from plugtune.sdk import Adapter, ModelOutline

# peft fields plugtune sets, never options (see the module docs)
MANAGED = frozenset({"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                     "inference_mode", "modules_to_save", "total_step", "megatron_config", "megatron_core"})
# peft types trained and hosted elsewhere: prompt learning has methods of its own
ELSEWHERE = {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning", "PREFIX_TUNING": "prefix",
             "MULTITASK_PROMPT_TUNING": None, "ADAPTION_PROMPT": None, "CPT": None, "XLORA": None, "POLY": None,
             "SHADOW": None}


@dataclasses.dataclass(frozen=True)
class Entry:
    """A named entry: the peft type, the options renamed (friendly name -> peft field), the
    fields it fixes, and the fields it does not offer (beyond :data:`MANAGED`)."""

    peft_type: str
    renames: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    hidden: frozenset[str] = frozenset()
    reference_rate: float = 2e-3  # AdamW's rate at a 512-wide model, 16 rows per step (core/training/rates.py)


# LoRA variants other methods (or no host) implement: not offered by the dora entry
_LORA_VARIANTS = frozenset({"use_qalora", "qalora_group_size", "lora_bias", "target_parameters", "use_bdlora", "arrow_config",
                            "kasa_config", "alora_invocation_tokens", "velora_config", "monteclora_config", "eva_config",
                            "corda_config", "lora_ga_config", "loftq_config", "layer_replication", "trainable_token_indices",
                            "runtime_config", "ensure_weight_tying", "use_dora"})
ENTRIES: dict[str, Entry] = {
    "dora": Entry("LORA", {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"},
                  {"use_dora": True}, _LORA_VARIANTS),
    "ia3": Entry("IA3", {"init": "init_ia3_weights"}, reference_rate=2e-2),
    "loha": Entry("LOHA", {"init": "init_weights"}, reference_rate=6e-3),
    "lokr": Entry("LOKR", {"init": "init_weights"}, reference_rate=6e-3),
    "vera": Entry("VERA", {"dropout": "vera_dropout", "init": "init_weights"}, reference_rate=2e-2),
    "oft": Entry("OFT", {"block_size": "oft_block_size", "dropout": "module_dropout", "init": "init_weights"}),
    "boft": Entry("BOFT", {"block_size": "boft_block_size", "block_num": "boft_block_num",
                           "n_butterfly_factor": "boft_n_butterfly_factor", "dropout": "boft_dropout", "init": "init_weights"}),
    "adalora": Entry("ADALORA", {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"}, {},
                     _LORA_VARIANTS - {"use_dora"} | {"r", "use_dora"}, reference_rate=6e-3),
    "ln_tuning": Entry("LN_TUNING", reference_rate=6e-3),
}


@functools.cache
def peft_types() -> tuple[str, ...]:
    """The peft tuner types the generic method trains (prompt learning has its own methods)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from peft import PromptLearningConfig

    return tuple(sorted(getattr(t, "value", t) for t, config in PEFT_TYPE_TO_CONFIG_MAPPING.items()
                  if getattr(t, "value", t) not in ELSEWHERE and not issubclass(config, PromptLearningConfig)))


def _config_class(peft_type: str) -> type:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]


def _annotation(hint: Any) -> Any:
    """The field's type for pydantic, or ``Any`` where pydantic cannot check it."""
    try:
        TypeAdapter(hint)
    except Exception:  # noqa: BLE001 - an exotic annotation: left to peft's own checks
        return Any
    return hint


@functools.cache
def options_model(peft_type: str, entry_name: str | None = None, generic: bool = False) -> type[ComponentOptions]:
    """The ``Options`` model of ``peft_type``'s config dataclass (renamed, fixed and hidden
    fields per the named entry ``entry_name``); ``generic``: the ``peft`` method's, with a
    ``type`` field first. Validation also builds the peft config once, so the config's own
    checks run."""
    config_cls = _config_class(peft_type)
    hints = typing.get_type_hints(config_cls)
    entry = ENTRIES[entry_name] if entry_name else Entry(peft_type)
    friendly = {peft: mine for mine, peft in entry.renames.items()}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if f.name in MANAGED or f.name in entry.hidden or f.name in entry.fixed:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = " ".join(str((f.metadata or {}).get("help", "")).split())[:200] or None
        fields[friendly.get(f.name, f.name)] = (_annotation(hints.get(f.name, Any)), Field(default, description=help_text))
    model = create_model(f"{config_cls.__name__.removesuffix('Config')}Options",
                         __base__=_GenericBase if generic else _NamedBase, **fields)
    model._entry = entry  # type: ignore[attr-defined]
    return model


class _NamedBase(ComponentOptions):
    """Base of every generated options model: builds the peft config once at validation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False, arbitrary_types_allowed=True)
    _entry: ClassVar[Entry]

    @model_validator(mode="after")
    def _peft_accepts(self) -> _NamedBase:
        try:
            with _quiet():
                peft_config(self, task_type="CAUSAL_LM", total_steps=1000)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"peft refuses this {self._entry.peft_type} config: {_first_line(exc)}") from None
        return self


class _GenericBase(_NamedBase):
    type: str = Field(description="the peft tuner type (LOHA, OFT, ...)")


class PeftOptions(ComponentOptions):
    """The generic method's options: ``type`` picks the peft config whose fields the rest
    are (see :meth:`options_model_for`)."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="the peft tuner type: LOHA, LOKR, OFT, BOFT, VERA, IA3, ADALORA, LN_TUNING, LORA, ...")

    @field_validator("type")
    @classmethod
    def _known(cls, value: str) -> str:
        from plugtune.sdk import did_you_mean

        known = peft_types()
        upper = value.upper()
        if upper in known:
            return upper
        if upper in ELSEWHERE:
            named = ELSEWHERE[upper]
            raise ValueError(f"{value!r} is prompt learning; use method {named!r}" if named else
                             f"{value!r} is not offered by plugtune's peft method")
        raise ValueError(f"unknown peft type {value!r}{did_you_mean(value, list(known))}")

    @classmethod
    def options_model_for(cls, raw: Mapping[str, Any]) -> type[ComponentOptions]:
        """The model that validates ``raw``: ``type``'s config fields when ``type`` names a
        peft tuner, else this class (whose ``type`` check says what is wrong)."""
        kind = raw.get("type") if isinstance(raw, Mapping) else None
        if not isinstance(kind, str) or kind.upper() not in peft_types():
            return cls
        return options_model(kind.upper(), None, True)


class _EntryOptions:
    """``Options`` of a named entry, built on first access: registering the plugin imports
    no peft (``plugtune plugins`` and a recipe naming another method stay fast)."""

    def __get__(self, obj: Any, owner: type) -> type[ComponentOptions]:
        return options_model(owner.entry.peft_type, owner.entry_name)


def _entry_of(options: ComponentOptions) -> Entry:
    entry = getattr(type(options), "_entry", None)
    if entry is not None:
        return entry
    return Entry(str(getattr(options, "type")).upper())


def peft_config(options: ComponentOptions, *, task_type: str, total_steps: int | None) -> Any:
    """peft's config object for validated ``options``."""
    entry = _entry_of(options)
    values = {entry.renames.get(k, k): v for k, v in options.model_dump().items() if k != "type"}
    values.update(entry.fixed)
    if entry.peft_type == "ADALORA":
        values["total_step"] = total_steps
    return _config_class(entry.peft_type)(task_type=task_type, **values)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


@contextlib.contextmanager
def _quiet() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class PeftHandlerOptions(ComponentOptions):
    """The handler takes no options: everything it needs is in each adapter's config."""

    model_config = ConfigDict(extra="ignore")


class PeftHandler:
    """The host side of every peft tuner method (see :mod:`plugtune.plugins.methods.peft_hosting`).

    Capabilities: mixes rows (each adapter's rows computed by its own peft layers), folds and
    unfolds (peft's ``merge``, originals kept), merges for good, reports resident bytes,
    combines (through an exact conversion to LoRA, where the update is an added matrix)."""

    Options = PeftHandlerOptions

    def __init__(self, options: PeftHandlerOptions) -> None:
        self.options = options
        self._state: PeftLayers | None = None

    def _layers(self, model: torch.nn.Module) -> PeftLayers:
        from plugtune.plugins.methods.peft_hosting import PeftLayers

        if self._state is None or self._state.model is not model:
            self._state = PeftLayers(model)
        return self._state

    def attach(self, model: torch.nn.Module, name: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.nn.Module:
        self._layers(model).attach(name, state, config)
        return model

    def activate(self, model: torch.nn.Module, name: str | None) -> None:
        layers = self._state
        if layers is not None:
            merged = layers.merged is not None and layers.merged[0] == name
            layers.routing.active = None if merged else name

    def detach(self, model: torch.nn.Module, name: str) -> None:
        if self._state is not None and name in self._state.resident:
            self._state.detach(name)

    def mixed_rows(self, model: torch.nn.Module, names: list[str | None]) -> contextlib.AbstractContextManager[None]:
        return self._layers(model).mixed_rows(names)

    def fold(self, model: torch.nn.Module, name: str) -> None:
        self._layers(model).fold(name)

    def unfold(self, model: torch.nn.Module) -> None:
        self._layers(model).unfold()

    def merge(self, model: torch.nn.Module, name: str) -> torch.nn.Module:
        layers = self._layers(model)
        layers.fold(name)
        layers.merged = None  # for good: the kept originals go with the adapters
        for other in list(layers.resident):
            layers.detach(other)
        self._state = None
        return model

    def resident_bytes(self, model: torch.nn.Module, name: str) -> int:
        return self._layers(model).resident[name].nbytes

    def combine(self, model: torch.nn.Module, parents: Sequence[Adapter], weights: Sequence[float],
                options: Mapping[str, Any]) -> Combined:
        """Through LoRA: each parent's update is converted to LoRA factors exactly
        (:func:`~plugtune.plugins.methods.peft_hosting.as_lora`), then LoRA's combination
        (peft's ``add_weighted_adapter``, every method ``plugtune combine`` offers) runs over
        them; the result is a LoRA adapter. A parent whose update is not an added matrix
        (IA3 scales, OFT and BOFT rotate, DoRA renormalises, LN tuning replaces) is refused
        with that reason."""
        import tempfile
        from pathlib import Path
        from types import SimpleNamespace

        from plugtune.plugins.methods.lora import combine_loras
        from plugtune.plugins.methods.peft_hosting import as_lora

        with tempfile.TemporaryDirectory() as tmp:
            converted, ranks = [], {}
            for i, parent in enumerate(parents):
                folder, ranks[str(parent.path)] = as_lora(model, f"parent {parent.path}", parent.state, parent.config,
                                                          Path(tmp) / f"parent{i}")
                converted.append(SimpleNamespace(path=folder))
            combined = combine_loras(model, converted, weights, **dict(options))
        combined.record["converted_to_lora"] = ranks
        return combined

    def plain_lora(self, adapter: Adapter) -> Any:
        """A ``LORA``-type adapter's factors (``plugtune export``); DoRA and every other
        tuner are refused with the reason: their update is not ``scaling * B A`` stored as
        factors (LoHa and LoKr multiply factor products, IA3 scales, OFT and BOFT rotate,
        LN tuning replaces), and a server that applies LoRA cannot reproduce it."""
        from plugtune.plugins.methods.lora_hosting import MERGE_HINT, plain_lora_of
        from plugtune.sdk import AdapterError

        subject = f"adapter {str(adapter.path)!r}"
        peft_type = str(adapter.config.get("peft_type", "")).removeprefix("PeftType.")
        if peft_type != "LORA":
            raise AdapterError(f"{subject} is a {peft_type or 'non-LoRA'} adapter: its update is not LoRA's "
                               f"scaling * B A stored as factors, and llama.cpp, Ollama and vLLM apply only LoRA; "
                               f"{MERGE_HINT}")
        return plain_lora_of(subject, adapter.state, adapter.config)


class PeftTunerMethod:
    """Training through ``peft.get_peft_model`` with the config the options describe."""

    Options: ClassVar[type[ComponentOptions]] = PeftOptions
    handler: ClassVar[type] = PeftHandler
    adapter_disabled = peft_adapter_off

    def __init__(self, options: ComponentOptions) -> None:
        self.options = options

    def reference_learning_rate(self) -> float:
        """AdamW's rate at a 512-wide model with 16 rows per step: the named entry's (from
        bench/methods.py's rate search on MiniLM-L6, moved to that width), LoRA's for the generic
        method; ``learning_rate: auto`` scales it (core/training/rates.py)."""
        entry = getattr(self, "entry", None)
        return entry.reference_rate if entry is not None else 2e-3

    def _config(self, task: Task, total_steps: int | None) -> Any:
        return peft_config(self.options, task_type="SEQ_CLS" if task.is_classification else "CAUSAL_LM",
                           total_steps=total_steps)

    def check_model(self, outline: ModelOutline, task: Task) -> list[str]:
        """At validation, with the base on disk: peft builds this config's layers on the
        model's meta-device outline (no weights), so targets that match nothing, or shapes a
        config cannot take (an OFT block size that does not divide a layer), fail here."""
        import copy

        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

        try:
            skeleton = copy.deepcopy(outline.skeleton)
            config = self._config(task, 1000)
            with _quiet():  # the tuner class itself: peft's inject_adapter_in_model refuses VeRA's shared state
                PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type](skeleton, config, adapter_name="default", low_cpu_mem_usage=True)
        except (ValueError, TypeError, RuntimeError, KeyError, NotImplementedError) as exc:
            return [f"options: peft cannot apply this config to {outline.location.name}: {_first_line(exc)}"]
        return []

    def prepare(self, model: torch.nn.Module, task: Task, context: PrepareContext) -> torch.nn.Module:
        from peft import get_peft_model

        try:
            with _quiet():
                return get_peft_model(model, self._config(task, context.total_steps))
        except (ValueError, TypeError) as exc:
            raise RecipeError([f"method.options: peft cannot apply this config to the model: {_first_line(exc)}"]) from None

    def on_step(self, model: torch.nn.Module, step: int) -> None:
        """AdaLoRA's rank allocation (peft's ``update_and_allocate``), which reads the
        gradients of the step just taken; nothing for the other tuners."""
        allocate = getattr(getattr(model, "base_model", None), "update_and_allocate", None)
        if allocate is not None:
            allocate(step)

    def adapter_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}

    def adapter_config(self, model: torch.nn.Module) -> dict[str, Any]:
        data = model.peft_config[model.active_adapter].to_dict()
        data["inference_mode"] = True
        return data


def named_method(name: str, entry: Entry) -> type[PeftTunerMethod]:
    """The tuning method class of a named entry (its Options from :func:`options_model`)."""
    return type(f"{name.title().replace('_', '')}Method", (PeftTunerMethod,),
                {"Options": _EntryOptions(), "entry": entry, "entry_name": name, "__doc__": f"``{name}``: peft's {entry.peft_type} tuner."})


@hookimpl
def register_tuning_methods(register):
    register("peft", PeftTunerMethod)
    for name, entry in ENTRIES.items():
        register(name, named_method(name, entry))
