"""A base model's outline: its configuration and module structure, read without its weights.

Recipe validation hands a :class:`ModelOutline` to components that can check themselves
against the model (``check_model``, see :mod:`plugtune.kernel.components`), so that a
``target_modules`` that matches nothing fails at ``plugtune validate`` instead of after the
weights have loaded.

What is read, and what never is:

* the configuration: a folder's ``config.json``, or for a ``.gguf`` file the
  ``config.json`` of its converted cache (``gguf_to_hf``) when a run made one, else the
  file's metadata (transformers' ``gguf_file=``; the tensors are not read, but parsing the
  metadata, tokenizer included, takes seconds for SmolLM2);
* the module structure, only when a component asks for names: the model class for the
  task's head built from that configuration on the ``meta`` device (shapes, no storage).

Nothing is fetched: a hub id, an alias whose weights are not on this machine yet, or an
adapter folder whose own base is not local gives no outline, and the checks are skipped.
The structure is cached on disk (see :class:`ModelOutline`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plugtune.artifacts.models import converted_folder, local_location
from plugtune.kernel.errors import ModelError
from plugtune.kernel.paths import plugtune_home
from plugtune.kernel.registry import PluginSystem, get_plugin_system

if TYPE_CHECKING:
    from torch import nn

    from plugtune.kernel.components import Head, Task

MAX_ADAPTER_DEPTH = 8  # adapters stacked as bases of adapters, followed to their first base
STRUCTURE_VERSION = 1  # bump when the cached structure's format changes


class OutlineUnavailable(ModelError):
    """The outline's config or structure could not be read (a damaged config, an unknown
    architecture): validation then skips the model checks, and loading the model reports
    the real problem with its own message."""


@dataclass(frozen=True)
class ModelOutline:
    """The base model a recipe trains, as far as it can be known without its weights.

    ``location``: the model folder (or ``.gguf`` file) the structure is read from. ``head``:
    the task's head (``"lm"``, ``"classifier"``), which decides the model class, hence the
    names. ``num_labels``: the classifier's output size (the task's label count; 2 when the
    recipe lets the task infer its labels from the data).

    Everything is read on first use. ``config`` is the transformers ``PretrainedConfig``
    (``model_type``, ``hidden_size``, ...). The names and shapes come from the model class
    built on the ``meta`` device (:attr:`skeleton`), kept as JSON under
    ``$PLUGTUNE_HOME/outlines/`` keyed by the config's content, the head, the label count and
    the transformers version: a second ``plugtune validate`` of the same base imports
    neither torch nor transformers."""

    location: Path
    head: Head
    num_labels: int

    @functools.cached_property
    def config(self) -> Any:
        """The transformers config (imports transformers)."""
        config = _read_config(self.location)
        if config is None:
            raise OutlineUnavailable(f"no readable config at {self.location}")
        return config

    @functools.cached_property
    def skeleton(self) -> nn.Module:
        """The model built on the ``meta`` device: every module and parameter shape, no
        storage; the same class ``load_base`` loads for the head (imports torch)."""
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
        except Exception as exc:  # noqa: BLE001 - an architecture transformers cannot build
            raise OutlineUnavailable(f"cannot build {self.location}'s model class: {exc}") from exc
        finally:
            transformers.logging.set_verbosity(verbosity)

    @functools.cached_property
    def _structure(self) -> dict[str, Any]:
        """Module names, linear-layer names and parameter shapes: from the cache when this
        config was outlined before, else from :attr:`skeleton` (then cached)."""
        path = _structure_path(self)
        if path is not None:
            try:
                return _valid_structure(json.loads(path.read_text(encoding="utf-8")))
            except FileNotFoundError:
                pass  # not outlined yet
            except (OSError, ValueError, TypeError) as exc:  # damaged or planted: a miss, said once
                print(f"model outline cache entry {path.name} unreadable ({type(exc).__name__}); building it again",
                      file=sys.stderr)
        from torch import nn

        modules = list(self.skeleton.named_modules())
        structure = {"modules": [name for name, _ in modules if name],
                     "linear": [name for name, module in modules if isinstance(module, nn.Linear)],
                     "parameters": {name: list(p.shape) for name, p in self.skeleton.named_parameters()}}
        if path is not None:
            _write_atomically(path, json.dumps(structure))
        return structure

    def module_names(self) -> list[str]:
        """Dotted names of every module (``model.layers.0.self_attn.q_proj``), in model order."""
        return list(self._structure["modules"])

    def linear_names(self) -> list[str]:
        """Dotted names of the ``nn.Linear`` layers, the ones LoRA-like methods target."""
        return list(self._structure["linear"])

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's dotted name and shape (tied weights listed once)."""
        return {name: tuple(shape) for name, shape in self._structure["parameters"].items()}


def _valid_structure(data: Any) -> dict[str, Any]:
    """A cached structure as :meth:`ModelOutline._structure` wrote it, or TypeError."""
    ok = (isinstance(data, dict) and all(isinstance(data.get(k), list) for k in ("modules", "linear"))
          and isinstance(data.get("parameters"), dict)
          and all(isinstance(n, str) for n in data["modules"] + data["linear"])
          and all(isinstance(s, list) and all(isinstance(d, int) for d in s) for s in data["parameters"].values()))
    if not ok:
        raise TypeError("not an outline structure")
    return data


def _structure_path(outline: ModelOutline) -> Path | None:
    """Where the structure of ``outline``'s model is cached: keyed by the config's bytes (for
    a GGUF without a converted folder, its path, size and time), the head, the label count
    and the transformers version; None when the key cannot be read."""
    import importlib.metadata as md

    source = _config_source(outline.location)
    try:
        identity = source.read_bytes() if source.suffix == ".json" else \
            f"{source.resolve()}:{source.stat().st_size}:{source.stat().st_mtime_ns}".encode()
        version = md.version("transformers")
    except (OSError, md.PackageNotFoundError):
        return None
    key = hashlib.sha256(identity + f"|{outline.head}|{outline.num_labels}|{version}|{STRUCTURE_VERSION}".encode())
    return plugtune_home() / "outlines" / f"{key.hexdigest()[:32]}.json"


def _write_atomically(path: Path, text: str) -> None:
    """Write the cache entry by a rename, so concurrent validations never read half a file;
    a read-only home only costs the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(fh.name, path)
    except OSError:
        pass


def outline_for(base_model: str, task: Task, plugins: PluginSystem | None = None) -> ModelOutline | None:
    """The outline of ``base_model`` for ``task``'s head, or None when it cannot be had
    offline and cheaply (not local, no readable config): callers then skip their checks.
    Never fetches, never reads weights, never raises for a model it cannot outline."""
    plugins = plugins or get_plugin_system()
    location = _local_base(base_model, plugins, depth=0)
    if location is None:
        return None
    if location.is_dir() and not (location / "config.json").is_file():
        return None  # not a model folder this can outline: loading it reports what is wrong
    num_labels = len(task.labels) if task.labels else 2
    return ModelOutline(location.resolve(), task.head, num_labels)


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


def _config_source(location: Path) -> Path:
    """The file the config is read from: ``config.json`` of a folder, of a GGUF's converted
    cache when a run made one (parsing a GGUF's metadata, tokenizer included, takes seconds
    for SmolLM2), else the ``.gguf`` file itself."""
    if location.suffix == ".gguf" and location.is_file():
        converted = converted_folder(location) / "config.json"
        return converted if converted.is_file() else location
    return location / "config.json"


def _read_config(location: Path) -> Any:
    """The transformers config of a model folder or ``.gguf`` file; None when it cannot be
    read (loading the model reports that, with its own message)."""
    from transformers import AutoConfig

    source = _config_source(location)
    try:
        if source.suffix == ".gguf":
            return AutoConfig.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
        return AutoConfig.from_pretrained(source.parent, local_files_only=True)
    except Exception:  # noqa: BLE001 - no outline; load_base gives the real error later
        return None
