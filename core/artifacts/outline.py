"""A base model's outline: its configuration and module structure, read without its weights.

Recipe validation hands a :class:`ModelOutline` to components that can check themselves
against the model (``check_model``, see :mod:`plugtune.kernel.components`), so that a
``target_modules`` that matches nothing fails at ``plugtune validate`` instead of after the
weights have loaded.

What is read, and what never is:

* the configuration: a folder's ``config.json``, or a ``.gguf`` file's metadata
  (transformers' ``gguf_file=``; the tensors are not read);
* the module structure, only when a component asks for names: the model class for the
  task's head built from that configuration on the ``meta`` device (shapes, no storage).

Nothing is fetched: a hub id, an alias whose weights are not on this machine yet, or an
adapter folder whose own base is not local gives no outline, and the checks are skipped.
Outlines are cached per (location, head, label count) within a process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plugtune.artifacts.models import local_location
from plugtune.kernel.registry import PluginSystem, get_plugin_system

if TYPE_CHECKING:
    from torch import nn

    from plugtune.kernel.components import Head, Task

MAX_ADAPTER_DEPTH = 8  # adapters stacked as bases of adapters, followed to their first base


@dataclass(frozen=True)
class ModelOutline:
    """The base model a recipe trains, as far as it can be known without its weights.

    ``config``: the transformers ``PretrainedConfig`` (``model_type``, ``hidden_size``,
    ``num_hidden_layers``, ...). ``head``: the task's head (``"lm"``, ``"classifier"``), which
    decides the model class, hence the names. ``num_labels``: the classifier's output size
    (the task's label count; 2 when the recipe lets the task infer its labels from the data).
    The name and shape members build the skeleton on first use (once per outline)."""

    location: Path
    head: Head
    num_labels: int
    config: Any

    @functools.cached_property
    def skeleton(self) -> nn.Module:
        """The model built on the ``meta`` device: every module and parameter shape, no
        storage. Built on first access; the same class ``load_base`` loads for the head."""
        import copy

        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        config = copy.deepcopy(self.config)
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            with torch.device("meta"):
                if self.head == "classifier":
                    config.num_labels = self.num_labels
                    return AutoModelForSequenceClassification.from_config(config)
                return AutoModelForCausalLM.from_config(config)
        finally:
            transformers.logging.set_verbosity(verbosity)

    def module_names(self) -> list[str]:
        """Dotted names of every module (``model.layers.0.self_attn.q_proj``), in model order."""
        return [name for name, _ in self.skeleton.named_modules() if name]

    def linear_names(self) -> list[str]:
        """Dotted names of the ``nn.Linear`` layers, the ones LoRA-like methods target."""
        from torch import nn

        return [name for name, module in self.skeleton.named_modules() if isinstance(module, nn.Linear)]

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's dotted name and shape (tied weights listed once)."""
        return {name: tuple(p.shape) for name, p in self.skeleton.named_parameters()}


def outline_for(base_model: str, task: Task, plugins: PluginSystem | None = None) -> ModelOutline | None:
    """The outline of ``base_model`` for ``task``'s head, or None when it cannot be had
    offline and cheaply (not local, no readable config): callers then skip their checks.
    Never fetches, never reads weights, never raises for a model it cannot outline."""
    plugins = plugins or get_plugin_system()
    location = _local_base(base_model, plugins, depth=0)
    if location is None:
        return None
    num_labels = len(task.labels) if task.labels else 2
    try:
        stamp = (location / "config.json" if location.is_dir() else location).stat().st_mtime_ns
    except OSError:
        return None
    return _outline(location.resolve(), task.head, num_labels, stamp)


def _local_base(base_model: str, plugins: PluginSystem, depth: int) -> Path | None:
    """The local folder or ``.gguf`` file whose structure ``base_model`` has; an adapter
    folder used as a base has its own base's structure (the merge changes no module)."""
    location = local_location(base_model, plugins)
    if location is None or depth > MAX_ADAPTER_DEPTH:
        return None
    from plugtune.artifacts.adapters import is_adapter_dir, read_manifest
    from plugtune.kernel.errors import AdapterError

    if not is_adapter_dir(location):
        return location
    try:
        parent = read_manifest(location).base_model.id
    except AdapterError:
        return None
    return _local_base(parent, plugins, depth + 1)


@functools.lru_cache(maxsize=32)
def _outline(location: Path, head: Head, num_labels: int, stamp: int) -> ModelOutline | None:
    """Read the configuration once per (location, head, labels, file version)."""
    config = _read_config(location)
    return None if config is None else ModelOutline(location, head, num_labels, config)


def _read_config(location: Path) -> Any:
    """The transformers config of a model folder or ``.gguf`` file; None when there is none
    or it cannot be read (loading the model reports that, with its own message)."""
    if location.is_dir() and not (location / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        if location.suffix == ".gguf" and location.is_file():
            return AutoConfig.from_pretrained(location.parent, gguf_file=location.name, local_files_only=True)
        return AutoConfig.from_pretrained(location, local_files_only=True)
    except Exception:  # noqa: BLE001 - no outline; load_base gives the real error later
        return None
