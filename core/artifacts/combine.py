"""Combine adapters into a new one, for any method whose handler can.

    combine_adapters("adapters/blend", ["adapters/a", "adapters/b"], weights=[0.7, 0.3])
    plugtune combine adapters/blend adapters/a adapters/b --weights 0.7 0.3 --method ties --density 0.5

The core checks what every combination needs (at least two parents, one weight each, one
base, one task, one handler) and asks the parents' handler for the
:class:`~plugtune.kernel.components.Combines` capability; a method without it is refused by
that capability, whatever its name. The handler does the arithmetic (LoRA's uses peft's
``add_weighted_adapter``; its docstring lists the combination methods) and validates the
combination options (``method``, ``density``, ``svd_rank``, ``majority_sign_method``).

The result is an ordinary adapter (``save_adapter``): any host loads it like the parents. Its
manifest records the combination and every parent (name, folder, sha256 of its weights file,
its base fingerprint, its weight, its method), so the blend can be traced and remade.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plugtune.artifacts.adapters import WEIGHTS_FILE, Adapter, read_adapter, save_adapter
from plugtune.artifacts.handlers import HandlerSpec, resolve_handler
from plugtune.artifacts.inputs import base_inputs
from plugtune.artifacts.outputs import check_output
from plugtune.data.tasks import build_task
from plugtune.kernel.components import Combines
from plugtune.kernel.errors import AdapterError
from plugtune.kernel.registry import PluginSystem, get_plugin_system


def _check_parents(parents: list[Adapter], weights: Sequence[float], plugins: PluginSystem) -> HandlerSpec:
    """The parents' common handler, after checking they can be combined at all."""
    if len(parents) < 2:
        raise AdapterError("combine needs at least two adapters")
    if len(weights) != len(parents):
        raise AdapterError(f"{len(parents)} adapters but {len(weights)} weights; give one weight per adapter")
    first = parents[0].manifest
    specs = [resolve_handler(a.manifest, plugins, subject=f"adapter {str(a.path)!r}") for a in parents]
    for adapter, spec in zip(parents, specs):
        m = adapter.manifest
        if not issubclass(spec.cls, Combines):
            raise AdapterError(f"{adapter.path}: a {m.method.name} adapter; its method's handler "
                               f"({spec.cls.__name__}) cannot combine adapters")
        if spec.cls is not specs[0].cls:
            raise AdapterError(f"{adapter.path} is a {m.method.name} adapter (handler {spec.cls.__name__}) but "
                               f"{parents[0].path} is {first.method.name} (handler {specs[0].cls.__name__}); "
                               f"only adapters of one handler can be combined")
        if m.base_model.fingerprint != first.base_model.fingerprint:
            raise AdapterError(f"{adapter.path} was trained on base {m.base_model.id!r} ({m.base_model.fingerprint}), "
                               f"{parents[0].path} on {first.base_model.id!r} ({first.base_model.fingerprint}); "
                               f"only adapters of one base can be combined")
        if m.task.get("type") != first.task.get("type") or m.task.get("labels") != first.task.get("labels"):
            raise AdapterError(f"{adapter.path} is for task {m.task.get('type')} but {parents[0].path} is for "
                               f"{first.task.get('type')}; only adapters of one task can be combined")
    return specs[0]


def check_weights(parents: Sequence[str | Path], weights: Sequence[float]) -> None:
    """Every weight a finite number: ``nan`` or ``inf`` would make every combined tensor NaN
    (refused before anything is read)."""
    for i, (parent, weight) in enumerate(zip(parents, weights), start=1):
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise AdapterError(f"weight {i} (for {parent}) is {weight!r}; weights must be finite numbers")


def check_finite(state: dict[str, Any]) -> None:
    """Refuse a combination whose tensors hold NaN or infinity (huge weights overflow) before
    it is saved: an adapter like that loads and then answers garbage."""
    import torch

    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise AdapterError(f"the combination is not finite ({len(bad)} of {len(state)} tensors hold nan or inf, "
                           f"first: {bad[0]}); nothing was written; use smaller weights")


def combine_adapters(out: str | Path, parents: Sequence[str | Path], weights: Sequence[float], *,
                     method: str = "linear", density: float | None = None, svd_rank: int | None = None,
                     majority_sign_method: str = "total", name: str | None = None,
                     plugins: PluginSystem | None = None, overwrite: bool = False) -> Path:
    """Write the combination of the adapters in ``parents`` to ``out``; returns ``out``.

    ``method``, ``density``, ``svd_rank`` and ``majority_sign_method`` go to the handler's
    ``combine`` as its options (None values left out). Loads the parents' base once (fp32,
    CPU is fine: only adapter tensors are computed).

    ``out`` follows the output policy (core/artifacts/outputs.py): never a parent, a folder
    holding one or the base's folder; an existing non-empty folder only with ``overwrite``."""
    from plugtune.artifacts.models import load_base

    plugins = plugins or get_plugin_system()
    check_weights(parents, weights)
    adapters = [read_adapter(p) for p in parents]
    spec = _check_parents(adapters, weights, plugins)
    first = adapters[0].manifest
    inputs = [*((f"parent adapter {str(a.path)!r}", a.path) for a in adapters), *base_inputs(first.base_model.id)]
    check_output(out, overwrite=overwrite, inputs=inputs)
    base = load_base(first.base_model.id, build_task(first.task, plugins=plugins, where=f"adapter {adapters[0].path}: task"), plugins=plugins)
    if base.info.fingerprint != first.base_model.fingerprint:
        raise AdapterError(f"base {first.base_model.id!r} now has fingerprint {base.info.fingerprint}, "
                           f"the adapters were trained on {first.base_model.fingerprint}")
    options = {k: v for k, v in {"method": method, "density": density, "svd_rank": svd_rank,
                                 "majority_sign_method": majority_sign_method}.items() if v is not None}
    combined = spec.build().combine(base.model, adapters, list(weights), options)
    check_finite(combined.state)
    record = first.method.model_dump()
    if combined.method is not None and combined.method is not spec.method.obj:
        registered = next((c for c in plugins.components.get("method", {}).values() if c.obj is combined.method), None)
        if registered is not None:
            record = {"name": registered.name, "plugin": registered.plugin.name,
                      "distribution": registered.plugin.distribution, "version": registered.plugin.version}
    out = Path(out)
    manifest: dict[str, Any] = {
        "name": name or out.name,
        "method": {**record, "options": combined.options},
        "base_model": first.base_model.model_dump(),
        "task": first.task,
        "combination": combined.record,
        "parents": [
            {"name": a.manifest.name, "path": str(a.path.resolve()), "weight": w,
             "sha256": a.manifest.files.get(WEIGHTS_FILE, {}).get("sha256"),
             "base_fingerprint": a.manifest.base_model.fingerprint, "method": a.manifest.method.name}
            for a, w in zip(adapters, weights)
        ],
    }
    check_output(out, overwrite=overwrite, inputs=inputs)  # again: the folder may have appeared meanwhile
    return save_adapter(out, state=combined.state, config=combined.config, manifest=manifest)
