"""``prefix``: prefix tuning on peft (Li & Liang, 2021).

Learns ``num_virtual_tokens`` key/value vectors per layer that every attention layer attends
to before the real tokens; the base stays frozen and unmodified (a classification head, when
the task needs one, is trained alongside).

    method:
      name: prefix
      options:
        num_virtual_tokens: 20
        projection: true          # reparameterise through an MLP while training (more stable)
        projection_hidden: 512    # that MLP's width

Works for causal-lm and for sequence-classification, on decoders and on BERT-style
encoders (see ``_peft_model`` for the one compatibility gap between peft 0.21 and
transformers 5 this plugin closes).

With ``projection: true`` the saved adapter holds the projected prefixes, so it is as small
as without and loads with plain ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from pydantic import Field

from plugtune import hookimpl
from plugtune.sdk import AdapterError, ComponentOptions

if TYPE_CHECKING:
    import torch

    from plugtune.sdk import Task
    from plugtune.sdk import PrepareContext


class PrefixOptions(ComponentOptions):
    num_virtual_tokens: int = Field(20, gt=0)
    projection: bool = False
    projection_hidden: int = Field(512, gt=0)


def _peft_model(model: torch.nn.Module, config: Any, adapter_name: str = "default") -> Any:
    """``get_peft_model``, except for sequence classification, where peft 0.21 decides that a
    model cannot take prefixes by looking for ``past_key_values`` in its forward signature.
    transformers 5 renamed that parameter ``cache`` (still accepting the old keyword), so the
    check fails for every model; the subclass made below skips it."""
    from peft import get_peft_model

    if str(config.task_type) in {"SEQ_CLS", "TaskType.SEQ_CLS"}:
        return _sequence_classification_class()(model, config, adapter_name=adapter_name)
    return get_peft_model(model, config, adapter_name=adapter_name)


@functools.cache
def _sequence_classification_class() -> type:
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


def _enable_auxiliary_modules(model: torch.nn.Module, enabled: bool) -> None:
    """Switch peft's copies of trainable modules (a classification head) on or off."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            module.enable_adapters(enabled)


class PrefixHandler:
    """The host side of ``prefix``: one peft prompt-learning wrapper for all prefix adapters
    on a base (the base's modules are never changed). Capabilities: a decode start (the
    adapter's prefix as the initial KV cache); its rows run as a group of their own."""

    Options = PrefixOptions

    def __init__(self, options: PrefixOptions) -> None:
        self.options = options
        self._wrapper: Any = None

    def attach(self, model: torch.nn.Module, name: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.nn.Module:
        from peft import PeftConfig
        from peft.utils import set_peft_model_state_dict

        try:
            peft_config = PeftConfig.from_peft_type(**config)
        except Exception as exc:  # noqa: BLE001
            raise AdapterError(f"adapter {name!r}: unreadable prefix-tuning config ({exc})") from None
        peft_config.inference_mode = True
        expected = peft_config.num_virtual_tokens
        prompt = state.get("prompt_embeddings")
        if prompt is None or prompt.shape[0] != expected:
            raise AdapterError(f"adapter {name!r}: prompt_embeddings missing or not {expected} virtual tokens long")
        if self._wrapper is None:
            self._wrapper = _peft_model(model, peft_config, adapter_name=name)
        else:
            self._wrapper.add_adapter(name, peft_config)
        try:
            result = set_peft_model_state_dict(self._wrapper, state, adapter_name=name)
        except RuntimeError as exc:  # size mismatch
            self.detach(model, name)
            raise AdapterError(f"adapter {name!r} does not fit this base: {str(exc).splitlines()[0]}") from None
        # peft copies prompt_embeddings into the prompt encoder itself, then reports the key
        # as unexpected to the generic load; anything else unexpected is a real mismatch.
        unexpected = [k for k in result.unexpected_keys if k != "prompt_embeddings"]
        if unexpected:
            self.detach(model, name)
            raise AdapterError(f"adapter {name!r} does not fit this base: unexpected {unexpected[:3]}")
        self._wrapper.set_adapter(name, inference_mode=True)
        return self._wrapper

    def activate(self, model: torch.nn.Module, name: str | None) -> None:
        if self._wrapper is None:
            return
        if name is None:
            _enable_auxiliary_modules(model, False)
            return
        _enable_auxiliary_modules(model, True)
        self._wrapper.set_adapter(name, inference_mode=True)

    def decode_parts(self, model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, Any]:
        """For the host's KV-cached decode loop: the bare causal LM, and a function giving
        the adapter's prefix as the initial cache (and its length) for a batch size."""
        wrapper = self._wrapper

        def start(batch_size: int) -> tuple[Any, int]:
            wrapper.set_adapter(name, inference_mode=True)
            return wrapper.get_prompt(batch_size), wrapper.peft_config[name].num_virtual_tokens

        return wrapper.base_model, start

    def detach(self, model: torch.nn.Module, name: str) -> None:
        wrapper = self._wrapper
        if wrapper is None or name not in wrapper.peft_config:
            return
        if len(wrapper.peft_config) == 1:
            self._wrapper = None  # prefix tuning never changed the base's modules
            return
        if wrapper.active_adapter == name:
            wrapper.set_adapter(next(n for n in wrapper.peft_config if n != name), inference_mode=True)
        wrapper.delete_adapter(name)


class PrefixMethod:
    """Prefix tuning through peft; hosted by :class:`PrefixHandler`."""

    Options = PrefixOptions
    handler = PrefixHandler

    def __init__(self, options: PrefixOptions) -> None:
        self.options = options

    def prepare(self, model: torch.nn.Module, task: Task, context: PrepareContext) -> torch.nn.Module:
        from peft import PrefixTuningConfig

        config = PrefixTuningConfig(
            task_type="SEQ_CLS" if task.is_classification else "CAUSAL_LM",
            num_virtual_tokens=self.options.num_virtual_tokens,
            prefix_projection=self.options.projection,
            encoder_hidden_size=self.options.projection_hidden,
        )
        return _peft_model(model, config)

    def adapter_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}

    def adapter_config(self, model: torch.nn.Module) -> dict[str, Any]:
        data = model.peft_config[model.active_adapter].to_dict()
        data["inference_mode"] = True  # the saved prefixes are already projected
        return data


@hookimpl
def register_tuning_methods(register):
    register("prefix", PrefixMethod)
