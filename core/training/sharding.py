"""``training.distributed: fsdp``: the model, its gradients and optimizer state sharded.

Under ``ddp`` (the default) every process of a ``--nproc``/torchrun/accelerate run holds
the whole model, its gradients and AdamW's two moments, and DDP all-reduces gradients.
Under ``fsdp`` torch's FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) splits every
parameter along its first dimension over the processes: one FSDP unit per decoder layer
(the model's ``_no_split_modules``, what transformers itself never splits) plus the root,
which keeps the rest (embeddings, final norm, head, tied together). A unit's weights are
all-gathered just before its forward and backward and freed after; gradients are
reduce-scattered, so each process keeps only its shard of the parameters, gradients and
optimizer state: about 1/N of each (:func:`resident_state_bytes`).

Why torch directly, not accelerate's ``FullyShardedDataParallelPlugin(fsdp_version=2)``:
accelerate 1.16 turns the plugin on only for GPU-like backends (``AcceleratorState`` keeps
``MULTI_CPU`` for a CPU run and ignores the plugin), and it carves the embeddings and the
tail into units of their own. The accelerator still runs the loop (gradient accumulation,
autocast, the process group); it just is not handed the model.

What cannot be sharded is refused at validation (core/training/recipe.py
``_check_distributed``). Everything the loop does with whole tensors goes through here: the adapter and checkpoints
gather full tensors (:func:`full_tensors`, :func:`full_optimizer_state`) and restore them
onto the shards (:func:`load_full_parameters`, :func:`load_full_optimizer_state`). These
are collectives: every process calls them at the same point, in the same order.
"""

from __future__ import annotations

from typing import Any

import torch

from plugtune.kernel.errors import RecipeError

FSDP = "fsdp"

def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that become FSDP units: those whose class is in a transformers model's
    ``_no_split_modules`` (its decoder or encoder layers), outermost first, never one inside
    another."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    found: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or type(module).__name__ not in names:
            continue
        found.append(module)
        inside.update(id(m) for m in module.modules())
    return found


def shard_model(model: torch.nn.Module) -> int:
    """Shard ``model`` in place with FSDP2 over the default process group: one unit per
    :func:`decoder_layers` module, then the root. ``generate`` goes through the root's
    hooks too (it calls the inner model, not the root's forward). Returns the number of
    layer units; refuses (one line) a model without layers to shard."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    layers = decoder_layers(model)
    if not layers:
        raise RecipeError([f"training.distributed: fsdp found no decoder layers to shard in {type(model).__name__} "
                           f"(it names no _no_split_modules); use training.distributed: ddp"])
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    if hasattr(model, "generate"):
        register_fsdp_forward_method(model, "generate")
    return len(layers)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds (its shard, for a DTensor)."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def full_tensors(tensors: dict[str, Any]) -> dict[str, Any]:
    """``tensors`` with every DTensor gathered into a whole tensor on the CPU (a collective:
    every process calls it with the same keys in the same order); other values unchanged."""
    return {k: (v.full_tensor().cpu() if _is_dtensor(v) else v) for k, v in tensors.items()}


def load_full_parameters(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors (every process read the same checkpoint) into the parameters,
    each process into its own shard; no communication."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for name, param in params.items():
            value = tensors[name]
            if _is_dtensor(param):
                value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                          src_data_rank=None).to_local()
            local(param).copy_(value)


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def full_optimizer_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state with whole tensors keyed by parameter name, on the main process
    (empty on the others): a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _torch_optimizer(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Shard a whole optimizer state (:func:`full_optimizer_state`, read by every process)
    onto this process's optimizer: a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _torch_optimizer(optimizer), optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def grad_norm(model: torch.nn.Module, max_norm: float | None) -> float:
    """The total L2 norm of the (sharded) gradients over every process, clipped to
    ``max_norm`` when one is set: the norm of the whole gradient, as an unsharded run logs."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads)  # a DTensor over sharded gradients, replicated
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None], max_norm, total)
    return float(total.full_tensor() if _is_dtensor(total) else total)


def resident_state_bytes(model: torch.nn.Module, optimizer: Any) -> dict[str, int]:
    """Bytes of training state this process holds between steps: parameters, gradients and
    optimizer state (for a DTensor, its local shard; tied parameters once). The activations
    and the one or two units FSDP all-gathers during a forward or backward come on top;
    they do not grow with the model's depth."""
    params = list(model.parameters())  # unique: tied weights appear once
    sizes = {"parameters": sum(local(p).numel() * p.element_size() for p in params),
             "gradients": sum(local(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None),
             "optimizer": 0}
    for state in _torch_optimizer(optimizer).state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                sizes["optimizer"] += local(value).numel() * value.element_size()
    sizes["total"] = sum(sizes.values())
    return sizes
