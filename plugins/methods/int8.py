"""``int8``: LoRA on a base held in 8 bits (LLM.int8 through bitsandbytes).

The base's linear layers become ``bitsandbytes.nn.Linear8bitLt`` (int8 weights with one
scale per output row: about a quarter of the fp32 memory); LoRA weights train on top in full
precision; optionally the optimizer keeps its state in 8 bits too. The output head, and any
layer the base did not have (a new classification head), stay in full precision.

    method:
      name: int8
      options:
        r: 8                    # every LoRA option applies
        target_modules: [q_proj, v_proj]
        optimizer_8bit: false   # bitsandbytes' AdamW8bit (state of tensors >= 4096 elements)
        outlier_threshold: 6.0  # LLM.int8 mixed-precision decomposition threshold (0: off)

The base is loaded already quantized (:meth:`Int8Method.base_loading`: transformers'
``BitsAndBytesConfig`` through ``from_pretrained``, each weight quantized as it is read), never
held in fp32 first, on the CPU or a GPU; its fingerprint is still the fp32 load's (the
quantized layers' weights are read from the checkpoint for it). An adapter folder as
``base_model`` (merged in full precision) is refused: ``plugtune merge`` it first.

The adapter is an ordinary LoRA adapter: it applies to the full-precision base (the adapter
host serves it with the other LoRA adapters) as well as to an 8-bit one, and plain peft
loads it. Made for CUDA GPUs; bitsandbytes >= 0.46.1 also runs the 8-bit layers on the CPU
(slower than fp32 there: the point on a CPU is memory). When this machine cannot, the recipe
fails validation with the reason, before any model is loaded.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from pydantic import Field

from plugtune import hookimpl
from plugtune.plugins.methods.lora import LoraMethod, LoraOptions
from plugtune.sdk import MemoryHints, ModelError

if TYPE_CHECKING:
    import torch

    from plugtune.sdk import BaseLoading, PrepareContext, Task


class Int8Options(LoraOptions):
    optimizer_8bit: bool = False
    outlier_threshold: float = Field(6.0, ge=0)


@functools.cache
def int8_unavailable_reason() -> str | None:
    """None when bitsandbytes can run an 8-bit layer forward and backward here (CUDA, or its
    CPU backend); otherwise a one-line reason."""
    try:
        import bitsandbytes as bnb
        import torch
    except Exception as exc:  # noqa: BLE001
        return f"int8 training needs bitsandbytes (pip install 'plugtune[int8]'): {type(exc).__name__}: {exc}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        layer = bnb.nn.Linear8bitLt(16, 8, bias=True, has_fp16_weights=False, threshold=6.0).to(device)
        x = torch.randn(2, 16, device=device, requires_grad=True)
        layer.train()
        layer(x).sum().backward()
        if layer.weight.dtype != torch.int8:
            raise RuntimeError(f"weights were not quantized (dtype {layer.weight.dtype})")
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return (f"bitsandbytes {bnb.__version__} cannot run 8-bit layers on {device} here ({first}); "
                f"int8 needs a CUDA GPU or bitsandbytes >= 0.46.1 with its CPU backend")
    return None


def bnb_loading(context: BaseLoading, **config: Any) -> dict[str, Any]:
    """``from_pretrained`` arguments that load the base already quantized by bitsandbytes
    (``config``: ``BitsAndBytesConfig``'s fields), on ``context.device``, the output head
    and a task's new layers (``context.head_modules``) kept in full precision."""
    from transformers import BitsAndBytesConfig

    skip = list(context.head_modules) or None  # None: transformers' own guess (tied and last modules)
    return {"quantization_config": BitsAndBytesConfig(llm_int8_skip_modules=skip, **config),
            "device_map": {"": context.device}}


def own_full_precision_tensors(model: torch.nn.Module) -> int:
    """Copy the base's full-precision parameters and buffers (embeddings, norms, the head)
    out of the checkpoint file into memory of their own; returns the bytes copied.

    transformers reads a safetensors checkpoint through one memory map, and a tensor it
    does not convert stays a view of that map. After a quantized load every page of the
    file has been read (to quantize it), and those views keep the whole map, and the pages,
    in the process: the fp32 file's size on top of the quantized weights. With the copies,
    the map is released and its pages leave the process's memory. Tied tensors stay tied."""
    import torch

    copied, seen = 0, set()
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for tensor in tensors.values():
                if tensor is None or id(tensor) in seen or not tensor.is_floating_point() or tensor.device.type != "cpu":
                    continue
                seen.add(id(tensor))
                tensor.data = torch.empty_like(tensor.data).copy_(tensor.data)
                copied += tensor.numel() * tensor.element_size()
    return copied


def has_quantized_layers(model: torch.nn.Module) -> bool:
    """Whether some layer of ``model`` is a bitsandbytes 8-bit or 4-bit one. A model on the
    ``meta`` device (``plugtune estimate``: shapes only, no storage to quantize) counts as
    quantized: LoRA injects over its linear layers as over the quantized ones."""
    if any(p.is_meta for p in model.parameters()):
        return True
    import bitsandbytes as bnb

    return any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in model.modules())


def quantize_linear_layers(model: torch.nn.Module, threshold: float = 6.0,
                           new_parameters: frozenset[str] = frozenset()) -> int:
    """Replace the model's ``nn.Linear`` layers by 8-bit ones in place; returns how many. The
    output head and newly initialised layers (those owning ``new_parameters``, from
    :class:`~plugtune.kernel.components.PrepareContext`) stay in full precision. For a model
    already loaded in full precision (a run loads the base quantized instead, through
    :meth:`Int8Method.base_loading`, without an fp32 copy)."""
    import bitsandbytes as bnb
    import torch

    new = {n.rsplit(".", 1)[0] for n in new_parameters}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    device = next(model.parameters()).device
    target = "cuda" if device.type == "cuda" or torch.cuda.is_available() else "cpu"
    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or module is head or name in new:
            continue
        q = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                has_fp16_weights=False, threshold=threshold)
        q.weight = bnb.nn.Int8Params(module.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if module.bias is not None:
            q.bias = torch.nn.Parameter(module.bias.data.clone(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, q.to(target))  # moving to the device quantizes
        replaced += 1
    return replaced


class Int8Method(LoraMethod):
    """LoRA training on an 8-bit base; hosting is LoRA's (``handler`` is inherited:
    :class:`~plugtune.plugins.methods.lora.LoraHandler`)."""

    Options = Int8Options

    def __init__(self, options: Int8Options) -> None:
        super().__init__(options)
        self.options: Int8Options = options

    def preflight(self) -> str | None:
        return int8_unavailable_reason() or super().preflight()  # LoRA's own (init: loftq)

    def base_loading(self, context: BaseLoading) -> dict[str, Any]:
        """The base loads already in 8 bits (LLM.int8, ``outlier_threshold``), on the training
        device, the head in full precision."""
        return bnb_loading(context, load_in_8bit=True, llm_int8_threshold=self.options.outlier_threshold)

    def memory_hints(self, context: BaseLoading) -> MemoryHints:
        """For ``plugtune estimate``: one byte per linear weight (int8) plus its row's fp32
        scale (a few per mille at these widths, left out), and bitsandbytes' AdamW8bit at two
        bytes per parameter when ``optimizer_8bit``."""
        return MemoryHints(linear_bytes_per_param=1.0, optimizer_bytes_per_param=2.0 if self.options.optimizer_8bit else None)

    def base_loaded(self, model: torch.nn.Module) -> None:
        """Release the checkpoint's memory map (see :func:`own_full_precision_tensors`)."""
        own_full_precision_tensors(model)

    def prepare(self, model: torch.nn.Module, task: Task, context: PrepareContext) -> torch.nn.Module:
        if not has_quantized_layers(model):
            raise ModelError("int8 trains on a base loaded in 8 bits (its base_loading), and this model was loaded "
                             "in full precision: train it with `plugtune run`, which loads the base quantized, or "
                             "quantize it first (quantize_linear_layers)")
        return super().prepare(model, task, context)

    def optimizer(self, param_groups: list[dict[str, Any]], lr: float) -> Any:
        import torch

        groups = self.loraplus_groups(param_groups, lr)  # LoRA+ when the options ask for it
        if not self.options.optimizer_8bit:
            return torch.optim.AdamW(groups, lr=lr)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr)


@hookimpl
def register_tuning_methods(register):
    register("int8", Int8Method)
