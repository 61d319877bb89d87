"""``prompt_tuning`` and ``p_tuning``: soft prompts on peft, and the host side every peft
prompt-learning method shares (``prefix`` too).

Both learn ``num_virtual_tokens`` input embeddings that peft prepends to every row's token
embeddings; the base stays frozen and unmodified (a classification head, when the task
needs one, is trained alongside).

    method:
      name: prompt_tuning          # Lester et al., 2021 (peft PromptTuningConfig)
      options:
        num_virtual_tokens: 20
        init: text                 # random | text | sample_vocab
        init_text: "Classify the sentiment of this review:"   # required for init: text

    method:
      name: p_tuning               # Liu et al., 2021 (peft PromptEncoderConfig)
      options:
        num_virtual_tokens: 20
        encoder: mlp               # mlp | lstm: the prompt encoder trained with the prompts
        encoder_hidden: null       # its width (null: the model's hidden size)
        encoder_layers: 2          # lstm only (peft's MLP always has 2 hidden layers)
        encoder_dropout: 0.0       # lstm only

``init: text`` takes the ids of ``init_text`` from the base's own tokenizer
(``PrepareContext.tokenizer``), repeated or cut to the number of virtual tokens, as peft does;
peft's own text init would load a tokenizer by name, from the hub. The saved
``adapter_config.json`` records the init as peft would, so plain peft loads it.

Both save in peft's format with ``inference_mode: true``: ``prompt_embeddings`` is the
``(num_virtual_tokens, hidden)`` matrix the model reads; for p-tuning that is the prompt
encoder's *output* (the encoder itself is dropped, as peft does when it saves), so a saved
p-tuning adapter is as small as a prompt-tuning one and plain ``PeftModel.from_pretrained``
gives the trained logits.

Tasks: causal-lm and chat (decoders), and sequence classification on encoders whose head
reads the first position (BERT-style). A decoder's classification head reads the last
non-pad *token id*; peft feeds such a model embeddings only, so it would read the last
position, a pad in every padded batch: refused at validation (``check_model``).

The host side, :class:`PromptLearningHandler`, keeps one peft wrapper per prompt-learning
type on a base (peft cannot mix types in one wrapper) with every resident adapter of that
type in it. Each adapter's rows run as a group of its own; for decoding, its virtual tokens
run once through the bare base and the resulting KV cache is where generation starts, so a
generation equals one over ``[virtual tokens + prompt]``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from plugtune import hookimpl
from plugtune.plugins.methods.lora import peft_adapter_off
from plugtune.sdk import AdapterError, ComponentOptions, NoOptions, beneath_wrappers, remove_wrapper

if TYPE_CHECKING:
    import torch

    from plugtune.sdk import ModelOutline, PrepareContext, Task

PROMPT_LEARNING_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")
EMBEDDING_TYPES = ("PROMPT_TUNING", "P_TUNING")  # virtual tokens prepended to the input embeddings


# -- peft wrappers --------------------------------------------------------------------------


def peft_model(model: torch.nn.Module, config: Any, adapter_name: str = "default") -> Any:
    """``get_peft_model``, except for prefix tuning on sequence classification, where peft
    0.21 decides that a model cannot take prefixes by looking for ``past_key_values`` in its
    forward signature. transformers 5 renamed that parameter ``cache`` (still accepting the
    old keyword), so the check fails for every model; the subclass made below skips it."""
    from peft import get_peft_model

    if _peft_type(config) == "PREFIX_TUNING" and str(config.task_type) in {"SEQ_CLS", "TaskType.SEQ_CLS"}:
        return _prefix_sequence_classification_class()(model, config, adapter_name=adapter_name)
    return get_peft_model(model, config, adapter_name=adapter_name)


@functools.cache
def _prefix_sequence_classification_class() -> type:
    from peft import PeftModelForSequenceClassification

    class PrefixSequenceClassification(PeftModelForSequenceClassification):
        def _prefix_tuning_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                                   output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
            batch_size = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
            kwargs.update(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                          output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                          return_dict=return_dict, past_key_values=self.get_prompt(batch_size))
            return self.base_model(labels=labels, **kwargs)

    return PrefixSequenceClassification


def _peft_type(config: Any) -> str:
    value = getattr(config, "peft_type", None)
    return str(getattr(value, "value", value))


def _auxiliary_modules(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """peft's copies of trainable modules (a classification head) inside ``model``."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [(path, m) for path, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]


def _is_auxiliary(module: torch.nn.Module) -> bool:
    from peft.utils.other import AuxiliaryTrainingWrapper

    return isinstance(module, AuxiliaryTrainingWrapper)


def _head_paths(model: torch.nn.Module, config: Any) -> list[str]:
    """The paths peft will wrap in a ``ModulesToSaveWrapper`` for ``config``: its
    ``modules_to_save`` and, for sequence classification, peft's ``classifier``/``score``."""
    names = set(getattr(config, "modules_to_save", None) or [])
    if _peft_type_of_task(config) == "SEQ_CLS":
        names |= {"classifier", "score"}
    paths = []
    for path, _ in model.named_children():
        if path in names:
            paths.append(path)
    return paths


def _peft_type_of_task(config: Any) -> str:
    value = getattr(config, "task_type", None)
    return str(getattr(value, "value", value))


def _enable_auxiliary_modules(model: torch.nn.Module, enabled: bool) -> None:
    """Switch peft's copies of trainable modules (a classification head) on or off."""
    for _, module in _auxiliary_modules(model):
        module.enable_adapters(enabled)


# -- the host side ----------------------------------------------------------------------------


class PromptLearningHandler:
    """The host side of peft's prompt-learning methods (``prefix``, ``prompt_tuning``,
    ``p_tuning``): one peft wrapper per prompt-learning type around the base, holding every
    resident adapter of that type (the base's modules are never changed; a classifier's
    head copy, peft's ``ModulesToSaveWrapper``, leaves with the last adapter).

    Capabilities: a decode start (``StartsDecoding``: a prefix adapter's prefix, or the KV
    cache of a soft prompt's virtual tokens run through the bare base), resident bytes. Its
    rows run as a group per adapter (it does not mix rows), and it does not fold."""

    Options = NoOptions

    def __init__(self, options: ComponentOptions) -> None:
        self.options = options
        self._wrappers: dict[str, Any] = {}  # peft type -> its PeftModel around the base
        self._types: dict[str, str] = {}  # adapter name -> its peft type

    def attach(self, model: torch.nn.Module, name: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.nn.Module:
        from peft import PeftConfig
        from peft.utils import set_peft_model_state_dict

        kind = str(config.get("peft_type"))
        if kind not in PROMPT_LEARNING_TYPES:
            raise AdapterError(f"adapter {name!r}: peft type {kind!r} is not a prompt-learning type this host serves "
                               f"({', '.join(PROMPT_LEARNING_TYPES)})")
        try:
            peft_config = PeftConfig.from_peft_type(**config)
        except Exception as exc:  # noqa: BLE001
            raise AdapterError(f"adapter {name!r}: unreadable {kind.lower()} config ({str(exc).splitlines()[0]})") from None
        peft_config.inference_mode = True  # the saved virtual tokens are final (projected, encoded)
        expected = peft_config.num_virtual_tokens
        prompt = state.get("prompt_embeddings")
        if prompt is None or prompt.dim() != 2 or prompt.shape[0] != expected:
            raise AdapterError(f"adapter {name!r}: prompt_embeddings missing or not {expected} virtual tokens long")
        width = _prompt_width(model, peft_config)
        if width is not None and prompt.shape[1] != width:
            raise AdapterError(f"adapter {name!r} does not fit this base: prompt_embeddings are {prompt.shape[1]} wide, "
                               f"this base takes {width}")
        wrapper = self._wrappers.get(kind)
        # peft wraps and names the head itself: other handlers' wrappers of it are lifted meanwhile
        heads = beneath_wrappers(model, _head_paths(model, peft_config), keep=_is_auxiliary)
        try:
            with heads:
                if wrapper is None:
                    wrapper = self._wrappers[kind] = peft_model(model, peft_config, adapter_name=name)
                else:
                    wrapper.add_adapter(name, peft_config)
                self._types[name] = kind
                result = set_peft_model_state_dict(wrapper, state, adapter_name=name)
        except RuntimeError as exc:  # size mismatch (a head of another shape)
            self.detach(model, name)
            raise AdapterError(f"adapter {name!r} does not fit this base: {str(exc).splitlines()[0]}") from None
        except KeyError as exc:  # peft looks up every tensor the wrapper expects: one is missing
            self.detach(model, name)
            raise AdapterError(f"adapter {name!r} does not fit this base: missing {exc.args[0]!r}") from None
        # peft copies prompt_embeddings into the prompt encoder itself, then reports the key
        # as unexpected to the generic load; anything else unexpected is a real mismatch.
        unexpected = [k for k in result.unexpected_keys if k != "prompt_embeddings"]
        missing = [k for k in result.missing_keys if f".modules_to_save.{name}." in k]
        if unexpected or missing:
            self.detach(model, name)
            what = f"unexpected {unexpected[:3]}" if unexpected else f"missing {missing[:3]}"
            raise AdapterError(f"adapter {name!r} does not fit this base: {what}")
        wrapper.set_adapter(name, inference_mode=True)
        return wrapper

    def activate(self, model: torch.nn.Module, name: str | None) -> None:
        if not self._wrappers:
            return
        if name is None:
            _enable_auxiliary_modules(model, False)
            return
        _enable_auxiliary_modules(model, True)
        self._wrappers[self._types[name]].set_adapter(name, inference_mode=True)

    def decode_parts(self, model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, Any]:
        """For the host's KV-cached decode loop: the bare causal LM, and ``start(batch_size)``
        giving the initial cache and its length. A prefix adapter's cache is its prefix; a
        soft prompt's is its virtual tokens run once through the bare base (positions
        ``0..n-1``, as in ``[virtual tokens + prompt]``), so the prompt then decodes from
        position ``n`` exactly as the trained model saw it. The host calls ``start`` with the
        adapter active (every other handler off)."""
        import torch

        wrapper = self._wrappers[self._types[name]]
        base = wrapper.base_model
        embeds = self._types[name] in EMBEDDING_TYPES

        def start(batch_size: int) -> tuple[Any, int]:
            wrapper.set_adapter(name, inference_mode=True)
            n = wrapper.peft_config[name].num_virtual_tokens
            if not embeds:
                return wrapper.get_prompt(batch_size), n
            prompts = wrapper.get_prompt(batch_size)  # (B, n, H)
            prompts = prompts.to(wrapper.word_embeddings.weight.dtype)  # as peft's forward casts them
            positions = torch.arange(n, device=prompts.device).expand(batch_size, n)
            mask = torch.ones(batch_size, n, dtype=torch.long, device=prompts.device)
            out = base(inputs_embeds=prompts, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
            return out.cache, n

        return base, start

    def resident_bytes(self, model: torch.nn.Module, name: str) -> int:
        """The adapter's virtual tokens (and its classification head's copy, if any)."""
        wrapper = self._wrappers[self._types[name]]
        tensors = list(wrapper.prompt_encoder[name].parameters())
        for _, module in _auxiliary_modules(model):
            copies = getattr(module, "modules_to_save", {})
            if name in copies:
                tensors += list(copies[name].parameters())
        return sum(t.numel() * t.element_size() for t in tensors)

    def detach(self, model: torch.nn.Module, name: str) -> None:
        kind = self._types.pop(name, None)
        wrapper = self._wrappers.get(kind) if kind is not None else None
        if wrapper is None or name not in wrapper.peft_config:
            return
        if len(wrapper.peft_config) == 1:
            _forget_auxiliary(model, name)
            del self._wrappers[kind]  # prompt learning never changed the base's modules
        else:
            if wrapper.active_adapter == name:
                wrapper.set_adapter(next(n for n in wrapper.peft_config if n != name), inference_mode=True)
            wrapper.delete_adapter(name)
        if not self._wrappers:  # the last one off: peft's head copies leave the base too
            for path, module in _auxiliary_modules(model):
                remove_wrapper(model, path, module)


def _prompt_width(model: torch.nn.Module, config: Any) -> int | None:
    """The width of one saved virtual token on this base: the hidden size for soft prompts;
    None for prefixes (their layout varies with the attention's key/value heads: peft's
    load checks the size)."""
    if _peft_type(config) not in EMBEDDING_TYPES:
        return None
    hidden = getattr(model.config, "hidden_size", None)
    return hidden if isinstance(hidden, int) else None


def _forget_auxiliary(model: torch.nn.Module, name: str) -> None:
    """Drop adapter ``name``'s copies from peft's module wrappers (a classification head)."""
    for _, module in _auxiliary_modules(model):
        module.delete_adapter(name, new_active_adapters=None)


# -- the training side ----------------------------------------------------------------------


def _check_prompt_task(method: str, task: Task) -> str | None:
    if task.head not in ("lm", "classifier"):
        return f"{method} trains language-model and classifier heads, not {task.head!r}"
    return None


def _check_prompt_model(method: str, outline: ModelOutline, task: Task, num_virtual_tokens: int) -> list[str]:
    """Problems of soft prompts on this base: a decoder classifier (its head reads the last
    non-pad token *id*, and peft passes only embeddings), more virtual tokens than the
    model's positions."""
    problems = []
    if task.is_classification and "score" in outline.module_names():
        problems.append(f"name: {method} cannot train a classifier on this decoder ({outline.config.model_type}): its "
                        "classification head reads the last non-pad token id, and peft passes the model embeddings "
                        "only, so it would read a pad in every padded batch; use a causal-lm task with label_words, "
                        "an encoder base, or lora/prefix")
    context = getattr(outline.config, "max_position_embeddings", None)
    if isinstance(context, int) and num_virtual_tokens >= context:
        problems.append(f"options.num_virtual_tokens: {num_virtual_tokens} virtual tokens leave no room in this "
                        f"model's {context} positions; use fewer")
    return problems


def _task_type(task: Task) -> str:
    return "SEQ_CLS" if task.is_classification else "CAUSAL_LM"


def _adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


class PromptTuningOptions(ComponentOptions):
    num_virtual_tokens: int = Field(20, gt=0)
    init: Literal["random", "text", "sample_vocab"] = "random"
    init_text: str | None = None

    @model_validator(mode="after")
    def _text_for_text_init(self) -> PromptTuningOptions:
        if self.init == "text" and not (self.init_text or "").strip():
            raise ValueError("init: text needs init_text (the words the virtual tokens start from)")
        if self.init != "text" and self.init_text is not None:
            raise ValueError(f"init_text is used only with init: text (init is {self.init}); drop it or set init: text")
        return self


def text_init_ids(tokenizer: Any, text: str, n: int) -> list[int]:
    """The token ids ``n`` virtual tokens start from: ``text``'s ids, cut or repeated to ``n``
    (peft's rule for ``prompt_tuning_init: TEXT``)."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise AdapterError(f"method.options.init_text: {text!r} has no tokens for this base's tokenizer")
    return (ids * (n // len(ids) + 1))[:n]


class _VirtualTokensMethod:
    """What prompt tuning and p-tuning share: peft's prompt-learning model, hosted by
    :class:`PromptLearningHandler`, switched off by peft's ``disable_adapter``; language-model
    tasks only, the virtual tokens checked against the base's outline; the adapter saved as
    peft saves it, in inference mode (the virtual tokens as they were trained)."""

    handler = PromptLearningHandler
    adapter_disabled = peft_adapter_off
    method_name: ClassVar[str]  # the name errors use
    cannot_pack: ClassVar[str] = ("its virtual tokens are prepended to each row, so in a row of several examples only "
                                  "the first would follow them and the others would attend to them")
    options: Any

    @classmethod
    def check_task(cls, task: Task) -> str | None:
        return _check_prompt_task(cls.method_name, task)

    def check_model(self, outline: ModelOutline, task: Task) -> list[str]:
        return _check_prompt_model(self.method_name, outline, task, self.options.num_virtual_tokens)

    def adapter_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return _adapter_state(model)

    def adapter_config(self, model: torch.nn.Module) -> dict[str, Any]:
        data = model.peft_config[model.active_adapter].to_dict()
        data["inference_mode"] = True
        return data


class PromptTuningMethod(_VirtualTokensMethod):
    """Prompt tuning through peft (``PromptTuningConfig``); hosted by :class:`PromptLearningHandler`."""

    Options = PromptTuningOptions
    method_name = "prompt_tuning"

    def reference_learning_rate(self) -> float:
        """AdamW's rate at a 512-wide model with 16 rows per step (virtual input embeddings move
        slowly: peft's examples train them at 3e-2 and more); ``learning_rate: auto`` scales it to
        the model and batch (core/training/rates.py)."""
        return 3e-2


    def __init__(self, options: PromptTuningOptions) -> None:
        self.options = options
        self._tokenizer_name = ""

    def prepare(self, model: torch.nn.Module, task: Task, context: PrepareContext) -> torch.nn.Module:
        import torch
        from peft import PromptTuningConfig

        o = self.options
        config = PromptTuningConfig(task_type=_task_type(task), num_virtual_tokens=o.num_virtual_tokens,
                                    prompt_tuning_init="SAMPLE_VOCAB" if o.init == "sample_vocab" else "RANDOM")
        wrapped = peft_model(model, config)
        if o.init == "text":  # peft's TEXT init, with the base's tokenizer (peft would load one by name)
            if context.tokenizer is None:
                raise AdapterError("method.options.init: text needs the base's tokenizer, and none was given")
            ids = torch.tensor(text_init_ids(context.tokenizer, o.init_text or "", o.num_virtual_tokens))
            embeddings = wrapped.word_embeddings
            with torch.no_grad():
                start = embeddings(ids.to(embeddings.weight.device)).detach().float()  # (n, H)
                wrapped.prompt_encoder["default"].embedding.weight.copy_(start)
            self._tokenizer_name = str(getattr(context.tokenizer, "name_or_path", "") or "base")
        return wrapped

    def adapter_config(self, model: torch.nn.Module) -> dict[str, Any]:
        data = super().adapter_config(model)
        if self.options.init == "text":  # recorded as peft's own TEXT init (not run again at load: inference mode)
            data.update(prompt_tuning_init="TEXT", prompt_tuning_init_text=self.options.init_text,
                        tokenizer_name_or_path=self._tokenizer_name or "base")
        return data


class PTuningOptions(ComponentOptions):
    num_virtual_tokens: int = Field(20, gt=0)
    encoder: Literal["mlp", "lstm"] = "mlp"
    encoder_hidden: int | None = Field(None, gt=0)
    encoder_layers: int = Field(2, gt=0)
    encoder_dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _lstm_only(self) -> PTuningOptions:
        if self.encoder == "mlp" and self.encoder_layers != 2:
            raise ValueError("encoder_layers applies to encoder: lstm only (peft's mlp encoder always has 2 hidden "
                             "layers); drop it or set encoder: lstm")
        if self.encoder == "mlp" and self.encoder_dropout:
            raise ValueError("encoder_dropout applies to encoder: lstm only (peft's mlp encoder has no dropout); "
                             "drop it or set encoder: lstm")
        if self.encoder == "lstm" and self.encoder_dropout and self.encoder_layers == 1:
            raise ValueError("encoder_dropout acts between LSTM layers, and encoder_layers is 1; use 2 or more, or no dropout")
        return self


class PTuningMethod(_VirtualTokensMethod):
    """P-tuning through peft (``PromptEncoderConfig``): virtual tokens produced by a small
    trained encoder; saved as the encoder's output (peft saves the encoder's output
    embeddings: no encoder at load), hosted by :class:`PromptLearningHandler`."""

    Options = PTuningOptions
    method_name = "p_tuning"

    def reference_learning_rate(self) -> float:
        """AdamW's rate at a 512-wide model with 16 rows per step (an encoder producing the virtual
        tokens: bench/methods.py's centre, 1e-2); ``learning_rate: auto`` scales it to the model and
        batch (core/training/rates.py)."""
        return 1e-2

    def __init__(self, options: PTuningOptions) -> None:
        self.options = options

    def prepare(self, model: torch.nn.Module, task: Task, context: PrepareContext) -> torch.nn.Module:
        from peft import PromptEncoderConfig

        o = self.options
        config = PromptEncoderConfig(task_type=_task_type(task), num_virtual_tokens=o.num_virtual_tokens,
                                     encoder_reparameterization_type=o.encoder.upper(),
                                     encoder_hidden_size=o.encoder_hidden, encoder_num_layers=o.encoder_layers,
                                     encoder_dropout=o.encoder_dropout)
        return peft_model(model, config)


@hookimpl
def register_tuning_methods(register):
    register("prompt_tuning", PromptTuningMethod)
    register("p_tuning", PTuningMethod)
