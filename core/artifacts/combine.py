"""Combine LoRA adapters into a new one with peft's ``add_weighted_adapter``.

    combine_adapters("adapters/blend", ["adapters/a", "adapters/b"], weights=[0.7, 0.3])
    plugtune combine adapters/blend adapters/a adapters/b --weights 0.7 0.3 --method ties --density 0.5

The result is an ordinary adapter (``save_adapter``): any host loads it like the parents. Its
manifest records the combination and every parent (name, folder, sha256 of its weights file,
its base fingerprint, its weight), so the blend can be traced and remade.

Methods are peft's: ``linear`` (A and B weighted separately; the parents must share a rank;
weights [1, 0] give the first parent exactly), ``cat`` (ranks concatenated: the exact weighted
sum of the parents' updates), ``svd`` (the weighted sum re-factored at ``svd_rank``), ``ties``,
``dare_linear``, ``dare_ties``, ``magnitude_prune`` (with ``density``: the fraction of each
update kept) and their ``_svd`` forms.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plugtune.artifacts.adapters import WEIGHTS_FILE, Adapter, read_adapter, save_adapter
from plugtune.kernel.errors import AdapterError
from plugtune.data.tasks import build_task

METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
           "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
NEEDS_DENSITY = {m for m in METHODS if m.startswith(("ties", "dare", "magnitude"))}
LORA_METHODS = {"lora", "int8"}  # int8 training produces ordinary LoRA adapters


def _check_parents(parents: list[Adapter], weights: Sequence[float]) -> None:
    if len(parents) < 2:
        raise AdapterError("combine needs at least two adapters")
    if len(weights) != len(parents):
        raise AdapterError(f"{len(parents)} adapters but {len(weights)} weights; give one weight per adapter")
    first = parents[0].manifest
    for adapter in parents:
        m = adapter.manifest
        if m.method.name not in LORA_METHODS:
            raise AdapterError(f"{adapter.path}: a {m.method.name} adapter; only LoRA adapters can be combined")
        if m.base_model.fingerprint != first.base_model.fingerprint:
            raise AdapterError(f"{adapter.path} was trained on base {m.base_model.id!r} ({m.base_model.fingerprint}), "
                               f"{parents[0].path} on {first.base_model.id!r} ({first.base_model.fingerprint}); "
                               f"only adapters of one base can be combined")
        if m.task.get("type") != first.task.get("type") or m.task.get("labels") != first.task.get("labels"):
            raise AdapterError(f"{adapter.path} is for task {m.task.get('type')} but {parents[0].path} is for "
                               f"{first.task.get('type')}; only adapters of one task can be combined")


def combine_adapters(out: str | Path, parents: Sequence[str | Path], weights: Sequence[float], *,
                     method: str = "linear", density: float | None = None, svd_rank: int | None = None,
                     majority_sign_method: str = "total", name: str | None = None) -> Path:
    """Write the combination of the LoRA adapters in ``parents`` to ``out``; returns ``out``.

    Loads the parents' base once (fp32, CPU is fine: only adapter tensors are computed)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    from plugtune.artifacts.models import load_base

    if method not in METHODS:
        raise AdapterError(f"unknown combination method {method!r}; choose one of {', '.join(METHODS)}")
    if method in NEEDS_DENSITY and density is None:
        raise AdapterError(f"combination method {method!r} needs a density (the fraction of each update kept), e.g. --density 0.5")
    if density is not None and not 0 < density <= 1:
        raise AdapterError(f"density must be in (0, 1], got {density}")
    adapters = [read_adapter(p) for p in parents]
    _check_parents(adapters, weights)
    first = adapters[0].manifest
    base = load_base(first.base_model.id, build_task(first.task, where=f"adapter {adapters[0].path}: task"))
    if base.info.fingerprint != first.base_model.fingerprint:
        raise AdapterError(f"base {first.base_model.id!r} now has fingerprint {base.info.fingerprint}, "
                           f"the adapters were trained on {first.base_model.fingerprint}")
    slots = [f"parent{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(base.model, str(adapters[0].path), adapter_name=slots[0])
    for slot, adapter in zip(slots[1:], adapters[1:]):
        model.load_adapter(str(adapter.path), adapter_name=slot)
    try:
        model.add_weighted_adapter(slots, list(weights), adapter_name="combined", combination_type=method,
                                   density=density, svd_rank=svd_rank, majority_sign_method=majority_sign_method)
    except (ValueError, TypeError) as exc:
        raise AdapterError(f"peft cannot combine these adapters with {method!r}: {str(exc).splitlines()[0]}") from None
    state = get_peft_model_state_dict(model, adapter_name="combined")
    config = model.peft_config["combined"].to_dict()
    config["inference_mode"] = True
    out = Path(out)
    combination: dict[str, Any] = {"method": method, "weights": list(weights), "density": density,
                                   "svd_rank": svd_rank, "majority_sign_method": majority_sign_method, "peft": "add_weighted_adapter"}
    manifest = {
        "name": name or out.name,
        "method": {**first.method.model_dump(), "name": "lora", "plugin": "lora",
                   "options": {"r": config["r"], "alpha": config["lora_alpha"],
                               "target_modules": sorted(config["target_modules"]) if isinstance(config["target_modules"], (set, list)) else config["target_modules"]}},
        "base_model": first.base_model.model_dump(),
        "task": first.task,
        "combination": combination,
        "parents": [
            {"name": a.manifest.name, "path": str(a.path.resolve()), "weight": w,
             "sha256": a.manifest.files.get(WEIGHTS_FILE, {}).get("sha256"),
             "base_fingerprint": a.manifest.base_model.fingerprint, "method": a.manifest.method.name}
            for a, w in zip(adapters, weights)
        ],
    }
    return save_adapter(out, state={k: v.detach().cpu() for k, v in state.items()}, config=config, manifest=manifest)
