"""``qlora``: LoRA on a base held in 4 bits (QLoRA, through bitsandbytes).

The base is loaded already quantized: transformers' ``BitsAndBytesConfig`` through
``from_pretrained`` (:meth:`QloraMethod.base_loading`) turns each linear layer's weight into
4-bit blocks (64 values per block with one scale: about an eighth of fp32, a quarter of
bf16) as it is read, so the base is never held in full precision, on the CPU or a GPU. LoRA
weights train on top in full precision; the 4-bit weights are dequantized block by block to
``compute_dtype`` inside each matmul. The output head, and any layer the base did not have
(a new classification head), stay in full precision.

    method:
      name: qlora
      options:
        r: 8                      # every LoRA option applies
        target_modules: all-linear
        quant_type: nf4           # nf4 (4-bit NormalFloat, for normally distributed weights) | fp4
        double_quant: true        # quantize the block scales too (about 0.4 bit per weight saved)
        compute_dtype: auto       # auto | float32 | bfloat16 | float16

``compute_dtype: auto`` is the dtype the base's full-precision tensors load in
(``training.base_dtype``): float32 on a CPU (bf16 matmuls are slow on CPUs without
AVX-512/AMX), bfloat16 on a GPU (QLoRA's choice: fp16's range overflows more easily).

peft's ``prepare_model_for_kbit_training`` is not called: what it does is freeze the base
(peft already does), upcast every bf16/fp16 tensor to fp32 (on a GPU that would put the
embeddings, SmolLM2's largest full-precision tensor, tied to the head, in fp32: twice their
memory, against the point of the method; the core's ``training.base_dtype`` decides that
dtype for every method alike) and turn gradient checkpointing on (a trade of speed for
activation memory that the core does not make for the other methods either; at plugtune's
sequence lengths the activations are small next to the weights).

After the load, the full-precision tensors are copied out of the checkpoint's memory map
(``base_loaded``), so the fp32 file's pages, all read to quantize them, leave the process.

The fingerprint is the fp32 load's (the quantized weights are read from the checkpoint's
safetensors for it), and the adapter is an ordinary LoRA adapter (``handler`` is
:class:`~plugtune.plugins.methods.lora.LoraHandler`): the adapter host serves it on the
full-precision base beside every other LoRA adapter, and plain peft loads it on a 4-bit or a
full-precision base. On the full-precision base its logits differ from the trained 4-bit
model's by the quantization error. Made for CUDA GPUs; bitsandbytes >= 0.46.1 also runs
4-bit layers on the CPU (slower than fp32 there: the point on a CPU is memory). When this
machine cannot, the recipe fails validation with the reason, before any model is loaded.
An adapter folder as ``base_model`` (merged in full precision) is refused: ``plugtune
merge`` it first and train on the merged folder.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal

from plugtune import hookimpl
from plugtune.plugins.methods.int8 import bnb_loading, has_quantized_layers, own_full_precision_tensors
from plugtune.plugins.methods.lora import LoraMethod, LoraOptions
from plugtune.sdk import MemoryHints, ModelError

if TYPE_CHECKING:
    import torch

    from plugtune.sdk import BaseLoading, PrepareContext, Task

DTYPES = ("float32", "bfloat16", "float16")


class QloraOptions(LoraOptions):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@functools.cache
def qlora_unavailable_reason(quant_type: str = "nf4", compute_dtype: str | None = None) -> str | None:
    """None when bitsandbytes can run a 4-bit layer forward and backward here (CUDA, or its
    CPU backend) with ``quant_type`` and ``compute_dtype`` (None: float32 on a CPU, bfloat16
    on a GPU); otherwise a one-line reason."""
    try:
        import bitsandbytes as bnb
        import torch
    except Exception as exc:  # noqa: BLE001
        return f"qlora training needs bitsandbytes (pip install 'plugtune[int8]'): {type(exc).__name__}: {exc}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, compute_dtype or ("bfloat16" if device == "cuda" else "float32"))
    try:
        layer = bnb.nn.Linear4bit(64, 16, bias=True, compute_dtype=dtype, compress_statistics=True,
                                  quant_type=quant_type).to(device)  # moving to the device quantizes
        if layer.weight.dtype.is_floating_point:
            raise RuntimeError(f"weights were not quantized (dtype {layer.weight.dtype})")
        x = torch.randn(2, 64, device=device, dtype=dtype, requires_grad=True)
        layer(x).float().sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            raise RuntimeError("no finite gradient through the 4-bit layer")
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return (f"bitsandbytes {bnb.__version__} cannot run 4-bit ({quant_type}, {dtype}) layers on {device} here "
                f"({first}); qlora needs a CUDA GPU or bitsandbytes >= 0.46.1 with its CPU backend")
    return None


def keep_4bit_trainable(model: torch.nn.Module) -> int:
    """Turn off, on every 4-bit layer of ``model``, the inference path bitsandbytes takes on a
    CPU with AVX-512-bf16 (a no-grad forward in eval mode). That path repacks the weights in
    place for a bf16 kernel that has no backward: once an evaluation ran, training through
    the layer gets no gradient through the base weights, silently (bitsandbytes 0.50), and it
    needs ``in_features`` to be a multiple of the block size (64), which small models are not.
    Returns how many layers it set."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


class QloraMethod(LoraMethod):
    """LoRA training on a 4-bit base; hosting is LoRA's (``handler`` is inherited:
    :class:`~plugtune.plugins.methods.lora.LoraHandler`)."""

    Options = QloraOptions

    def __init__(self, options: QloraOptions) -> None:
        super().__init__(options)
        self.options: QloraOptions = options

    def preflight(self) -> str | None:
        o = self.options
        return (qlora_unavailable_reason(o.quant_type, None if o.compute_dtype == "auto" else o.compute_dtype)
                or super().preflight())  # LoRA's own (init: loftq)

    def compute_dtype(self, context: BaseLoading) -> str:
        """The dtype of the 4-bit matmuls: the option, or (``auto``) the base's load dtype."""
        if self.options.compute_dtype != "auto":
            return self.options.compute_dtype
        return context.dtype if context.dtype in DTYPES else "float32"

    def base_loading(self, context: BaseLoading) -> dict[str, Any]:
        """The base loads already in 4 bits on the training device, the head in full precision."""
        import torch

        return bnb_loading(context, load_in_4bit=True, bnb_4bit_quant_type=self.options.quant_type,
                           bnb_4bit_use_double_quant=self.options.double_quant,
                           bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype(context)))

    def memory_hints(self, context: BaseLoading) -> MemoryHints:
        """For ``plugtune estimate``: half a byte per linear weight plus the block scales
        (blocks of 64: one fp32 absmax each, 4/64 byte per weight; with ``double_quant`` an
        8-bit absmax and an fp32 scale per 256 blocks instead)."""
        scales = (1 + 4 / 256) / 64 if self.options.double_quant else 4 / 64
        return MemoryHints(linear_bytes_per_param=0.5 + scales)

    def base_loaded(self, model: torch.nn.Module) -> None:
        """Turn off bitsandbytes' AVX-512-bf16 inference path (see :func:`keep_4bit_trainable`)
        and release the checkpoint's memory map (see :func:`own_full_precision_tensors`)."""
        keep_4bit_trainable(model)
        own_full_precision_tensors(model)

    def prepare(self, model: torch.nn.Module, task: Task, context: PrepareContext) -> torch.nn.Module:
        keep_4bit_trainable(model)
        if not has_quantized_layers(model):
            raise ModelError("qlora trains on a base loaded in 4 bits (its base_loading), and this model was "
                             "loaded in full precision: train it with `plugtune run`, which loads the base quantized")
        return super().prepare(model, task, context)


@hookimpl
def register_tuning_methods(register):
    register("qlora", QloraMethod)
