"""``learning_rate: auto``: one documented rule that scales a method's reference rate to the
model and the batch.

The rule (all rates are AdamW's)::

    rate = reference x (REFERENCE_WIDTH / hidden_size) x sqrt(rows per step / REFERENCE_BATCH)
                     x ENCODER_FACTOR (encoders only)

* ``reference``: the method's own rate at a model of width :data:`REFERENCE_WIDTH` trained with
  :data:`REFERENCE_BATCH` rows per optimizer step, from its ``reference_learning_rate()``
  (optional member of :class:`~plugtune.kernel.components.TuningMethod`); a method without one
  gets :data:`FALLBACK_RATE` and the run says so. The built-in methods' references come from
  ``bench/methods.py``'s rate search (every method at centre/3, centre and 3 x centre on SST-2
  with MiniLM-L6, validation split carved from train) and the shipped SmolLM2 recipes' rates,
  both moved to the reference width and batch by this same rule.
* **width**: Adam's update of a ``fan_in``-wide matrix changes its output in proportion to
  ``fan_in``, so the rate that keeps the per-step change of the activations constant goes as
  ``1 / width`` (the muP rule for hidden weights, Yang et al. 2022). It gives about 2e-4 for
  LoRA on a 4096-wide 7B model at batch 16, the rate peft's and axolotl's examples use.
* **batch**: for adaptive optimizers the rate grows with the square root of the batch (Malladi
  et al. 2022, "On the SDEs and scaling rules for adaptive gradient algorithms").
* **encoders** (model types with a masked-LM head in transformers: BERT, RoBERTa, MiniLM...)
  take :data:`ENCODER_FACTOR` of the decoder rate. Measured: MiniLM-L6 LoRA on SST-2 at
  batch 32 for 300 steps reached 0.846 dev accuracy at the unscaled 3.77e-3, 0.883 at 1.9e-3,
  0.875 at 1e-3; a 10-minute run (2,441 steps) at 3.77e-3 fell to chance (0.555), while
  SmolLM2 (a pre-LN decoder) at the unscaled rule's 1.78e-3 reached 0.90 on the same data.
  Post-LN encoders amplify updates more (Liu et al. 2020, "Understanding the difficulty of
  training transformers"), which is the usual reason their LoRA rates are lower (the LoRA
  paper's RoBERTa-base rates, 4e-4-5e-4 at batch 16 and width 768, sit at this rule's value).
* **a new head** (sequence classification's freshly initialised ``score``/``classifier``
  layer, the loader's ``new_parameters``) gets the rate of a fresh linear layer,
  :data:`NEW_LAYER_RATE` scaled by the same rule, whatever the method: a full fine-tune's small
  rate would leave a random head almost untrained, and an adapter's rate is already close.
* **LoRA+** (``loraplus_lr_ratio``) keeps its ratio over the rate chosen here (the A matrices
  take it, B ratio times it), as the LoRA+ paper sets it.

The choice is printed and recorded in the manifest (``training.learning_rate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

REFERENCE_WIDTH = 512
REFERENCE_BATCH = 16
FALLBACK_RATE = 1e-3  # a method that declares no reference: LoRA-family territory
NEW_LAYER_RATE = 2e-3  # a freshly initialised linear layer at the reference width and batch
ENCODER_FACTOR = 0.5  # encoders' share of the rule's rate (measured: see the module docstring)


@dataclass(frozen=True)
class ChosenRates:
    """What ``learning_rate: auto`` chose, and from what."""

    adapter: float
    head: float | None  # None: no new layer to train
    reference: float
    width: int
    rows_per_step: int
    declared: bool  # False: the method declares no reference rate (FALLBACK_RATE)
    factor: float = 1.0  # ENCODER_FACTOR for encoders

    def describe(self) -> str:
        head = f", new head {self.head:.3g}" if self.head is not None else ""
        source = "" if self.declared else f" (the method declares no reference rate: {FALLBACK_RATE:g} assumed)"
        encoder = f" x {self.factor:g} (an encoder)" if self.factor != 1.0 else ""
        return (f"learning_rate auto: {self.adapter:.3g}{head} = {self.reference:g} x {REFERENCE_WIDTH}/{self.width} "
                f"x sqrt({self.rows_per_step}/{REFERENCE_BATCH}){encoder}{source}")

    def record(self) -> dict[str, Any]:
        return {"auto": True, "adapter": self.adapter, "head": self.head, "reference": self.reference,
                "width": self.width, "rows_per_step": self.rows_per_step, "factor": self.factor}


def scaled(reference: float, width: int, rows_per_step: int, factor: float = 1.0) -> float:
    """The rule: ``reference`` moved from the reference width and batch to these."""
    rate = reference * (REFERENCE_WIDTH / max(width, 1)) * math.sqrt(rows_per_step / REFERENCE_BATCH) * factor
    return float(f"{rate:.3g}")


def is_encoder(config: Any) -> bool:
    """Whether the model is a bidirectional encoder: its model type has a masked-LM head in
    transformers' auto mappings (decoders such as Llama, GPT-2, Qwen do not)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def model_width(config: Any) -> int:
    """The model's hidden width from its transformers config (``hidden_size``, ``d_model``,
    ``n_embd``, ``dim``; a text sub-config for multimodal ones); the reference width if none."""
    for source in (config, getattr(config, "text_config", None)):
        for name in ("hidden_size", "d_model", "n_embd", "dim"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return REFERENCE_WIDTH


def choose_rates(method: Any, config: Any, rows_per_step: int, has_new_layer: bool) -> ChosenRates:
    """The rates for ``method`` (a built tuning method) on a model with ``config``, trained with
    ``rows_per_step`` rows per optimizer step (batch times grad_accum)."""
    declared = getattr(method, "reference_learning_rate", None)
    reference = float(declared()) if callable(declared) else FALLBACK_RATE
    width, factor = model_width(config), ENCODER_FACTOR if is_encoder(config) else 1.0
    return ChosenRates(adapter=scaled(reference, width, rows_per_step, factor),
                       head=scaled(NEW_LAYER_RATE, width, rows_per_step, factor) if has_new_layer else None,
                       reference=reference, width=width, rows_per_step=rows_per_step, declared=callable(declared),
                       factor=factor)


def with_head_rate(groups: list[dict[str, Any]], named: list[tuple[str, Any]], new_parameters: frozenset[str],
                   head_rate: float) -> list[dict[str, Any]]:
    """``groups`` with the new layer's parameters moved into groups of their own at
    ``head_rate`` (each group's other settings, weight decay included, kept)."""
    head = {id(p) for n, p in named if is_new_parameter(n, new_parameters)}
    if not head:
        return groups
    out: list[dict[str, Any]] = []
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in head]
        mine = [p for p in group["params"] if id(p) in head]
        if rest:
            out.append({**group, "params": rest})
        if mine:
            out.append({**group, "params": mine, "lr": head_rate})
    return out


def is_new_parameter(name: str, new_parameters: frozenset[str]) -> bool:
    """A trainable parameter's name (peft wraps names: ``base_model.model.score.modules_to_save.
    default.weight``) matches a freshly initialised one (``score.weight``)."""
    plain = name.replace(".modules_to_save.default", "").replace(".original_module", "")
    return any(plain == n or plain.endswith("." + n) for n in new_parameters)
