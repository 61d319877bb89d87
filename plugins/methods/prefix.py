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
encoders (see ``prompt_learning.peft_model`` for the one compatibility gap between peft 0.21 and
transformers 5 this plugin closes).

With ``projection: true`` the saved adapter holds the projected prefixes, so it is as small
as without and loads with plain ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from plugtune import hookimpl
from plugtune.plugins.methods.lora import peft_adapter_off
from plugtune.plugins.methods.prompt_learning import PromptLearningHandler, peft_model
from plugtune.sdk import ComponentOptions

if TYPE_CHECKING:
    import torch

    from plugtune.sdk import PrepareContext, Task


class PrefixOptions(ComponentOptions):
    num_virtual_tokens: int = Field(20, gt=0)
    projection: bool = False
    projection_hidden: int = Field(512, gt=0)


_peft_model = peft_model  # the name this module's users knew
PrefixHandler = PromptLearningHandler  # the host side, shared with prompt_tuning and p_tuning


class PrefixMethod:
    """Prefix tuning through peft; hosted by the prompt-learning handler
    (:class:`plugtune.plugins.methods.prompt_learning.PromptLearningHandler`)."""

    Options = PrefixOptions
    handler = PromptLearningHandler
    cannot_pack = "prefix tuning gives every row one set of prefix key/values (a cache), under which transformers keeps no packed examples apart"
    adapter_disabled = peft_adapter_off

    def reference_learning_rate(self) -> float:
        """AdamW's rate at a 512-wide model with 16 rows per step (bench/methods.py chose 3e-2 at
        MiniLM's width; the SmolLM2 recipe trains at 1e-2 with 8 rows); ``learning_rate: auto``
        scales it to the model and batch (core/training/rates.py)."""
        return 2e-2

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
        return peft_model(model, config)

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
