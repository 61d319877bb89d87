"""The adapter artifact: one format for every tuning method.

An adapter is a directory::

    adapter_model.safetensors   the method's tensors (peft names for peft methods)
    adapter_config.json         the method's config (peft's LoraConfig etc. for peft methods)
    plugtune.json               the manifest: method + plugin + version, base model and its
                                fingerprint, task and labels, recipe, metrics, file hashes

so LoRA and prefix adapters also load with plain ``peft.PeftModel.from_pretrained``.

Writes are atomic: files go into a hidden sibling folder, are fsynced, and the folder is
renamed into place; an existing adapter is replaced only after the new one is complete, with
SIGINT/SIGTERM held during the swap, and what a killed save left behind is recovered by the
next one (core/artifacts/outputs.py).
Reads are strict: a missing file, a truncated or corrupt safetensors file, a hash that does
not match the manifest, or a manifest without the fields plugtune needs is an
:class:`~plugtune.kernel.errors.AdapterError`.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import io
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from plugtune.artifacts.card import CARD_FILE, is_ours, model_card
from plugtune.artifacts.hub import cached_or_none, is_hub_ref, local_adapter
from plugtune.artifacts.outputs import fsync_write, make_staging, recover_interrupted_swap, replace_dir
from plugtune.kernel.bounds import read_json_file
from plugtune.kernel.errors import AdapterError

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "plugtune.json"
ADAPTER_FILES = (WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE)  # replaced as a whole; other files in the folder stay
FORMAT = "plugtune-adapter"
FORMAT_VERSION = 1


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class MethodRecord(_Loose):
    name: str
    options: dict[str, Any] = {}
    plugin: str = ""
    distribution: str = ""
    version: str = ""


class BaseRecord(_Loose):
    id: str
    architecture: str = ""
    fingerprint: str
    dtype: str = ""


class Manifest(_Loose):
    """``plugtune.json``. Unknown extra fields are kept (newer plugtune versions may add)."""

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    name: str
    created: str = ""
    plugtune_version: str = ""
    method: MethodRecord
    base_model: BaseRecord
    task: dict[str, Any]
    recipe: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    training: dict[str, Any] = {}
    files: dict[str, dict[str, Any]] = {}


@dataclass
class Adapter:
    """An adapter read from disk."""

    path: Path
    manifest: Manifest
    state: dict[str, torch.Tensor]
    config: dict[str, Any]
    weights_file: str = WEIGHTS_FILE  # a pickle file's name when one was allowed instead

    @functools.cached_property
    def size_bytes(self) -> int:
        """The weights file's size, read once (a prefetching thread reads it with the tensors)."""
        return (self.path / self.weights_file).stat().st_size


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_adapter(
    directory: str | Path,
    *,
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    manifest: dict[str, Any],
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write an adapter atomically and return its directory.

    ``manifest`` gets ``format``, ``created`` and the file hashes filled in; it is validated
    before anything is written.
    """
    from safetensors.torch import save

    directory = Path(directory)
    manifest = dict(manifest)
    manifest.setdefault("format", FORMAT)
    manifest.setdefault("format_version", FORMAT_VERSION)
    manifest.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        raise AdapterError(f"refusing to save an adapter with an invalid manifest: {exc.errors()[0]['msg']}") from None

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    blobs: dict[str, bytes] = {
        WEIGHTS_FILE: save(tensors, metadata={"format": "pt"}),
        CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True, default=_json_default).encode(),
    }
    blobs.update(extra_files or {})
    manifest["files"] = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in blobs.items()
    }
    blobs[MANIFEST_FILE] = json.dumps(manifest, indent=2, default=_json_default).encode()
    card, kept = _model_card(directory, json.loads(blobs[MANIFEST_FILE]), json.loads(blobs[CONFIG_FILE]))
    if card is not None:
        blobs[CARD_FILE] = card

    try:
        for line in recover_interrupted_swap(directory):  # what a killed earlier save left beside the folder
            print(line, file=sys.stderr, flush=True)
        staging = make_staging(directory)
    except OSError as exc:
        raise AdapterError(f"could not write the adapter to {directory} ({exc.strerror or exc})") from None
    try:
        for name, data in blobs.items():
            fsync_write(staging / name, data)
        replace_dir(staging, directory, keep_extra=True, kept=kept)
    except OSError as exc:
        raise AdapterError(f"could not write the adapter to {directory} ({exc.strerror or exc}); "
                           f"the previous adapter is unchanged") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _model_card(directory: Path, manifest: dict[str, Any], config: dict[str, Any]) -> tuple[bytes | None, tuple[str, ...]]:
    """The model card to write with the adapter (core/artifacts/card.py), and the names the
    swap must not carry over from the previous folder. A README.md the user wrote (no
    plugtune marker; a link counts as theirs) is kept and no card is written, said once on
    stderr. The card is best-effort: when it cannot be made, the adapter is saved without it,
    with a warning, and a stale card of ours is not carried over."""
    existing = directory / CARD_FILE
    if existing.is_symlink() or (existing.exists() and not is_ours(existing)):
        print(f"note: {existing} is not plugtune's model card; left it as it is (delete it to get the generated card)",
              file=sys.stderr, flush=True)
        return None, ADAPTER_FILES
    try:
        return str(model_card(manifest, config)).encode(), (*ADAPTER_FILES, CARD_FILE)
    except Exception as exc:  # noqa: BLE001 - a card must never cost the trained adapter
        print(f"warning: no model card for {directory} ({type(exc).__name__}: {exc}); the adapter is saved without one",
              file=sys.stderr, flush=True)
        return None, (*ADAPTER_FILES, CARD_FILE)


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value"):  # enums
        return value.value
    return str(value)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of the adapter in ``directory`` (a folder, or ``hf://org/name`` in the
    local Hugging Face cache: core/artifacts/hub.py), after checking it and its base chain."""
    directory = local_adapter(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise AdapterError(f"adapter folder not found: {directory}")
    if not path.is_file():
        if (directory / CONFIG_FILE).is_file():
            raise AdapterError(f"{directory} looks like a plain peft adapter (no {MANIFEST_FILE}); plugtune adapters carry a manifest")
        raise AdapterError(f"{directory} is not an adapter: {MANIFEST_FILE} is missing")
    data = read_json_file(path, AdapterError, what="a manifest (a JSON object)")
    if data.get("format") not in (None, FORMAT):
        raise AdapterError(f"{path}: unknown format {str(data.get('format'))[:80]!r}")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise AdapterError(f"{path}: manifest field {where[:120]}: {err['msg']}") from None
    _check_base_chain(directory, manifest.base_model.id)
    return manifest


MAX_BASE_CHAIN = 16  # adapters stacked as bases of adapters; real stacks have two or three


def _check_base_chain(directory: Path, base: str) -> None:
    """Refuse an adapter whose base is itself, or whose chain of adapter folders used as
    bases comes back to one already in it (loading would recurse without end). Only the
    manifests of the chain are read (JSON, no weights); a link that cannot be read ends the
    walk, and loading that base reports it with its own message."""
    chain = [directory.resolve()]
    own_base = base
    while True:
        try:
            location = cached_or_none(base) if is_hub_ref(base) else Path(base).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):  # not a path (a hub id, an alias)
            return
        if location is None:  # an hf:// adapter not cached: loading it says so
            return
        if location in chain:
            loop = " -> ".join(str(p) for p in [*chain, location])
            what = "is the adapter itself" if len(chain) == 1 else f"comes back to {location} ({loop})"
            raise AdapterError(f"{directory / MANIFEST_FILE}: base_model {own_base[:200]!r} {what}; "
                               f"an adapter's base must be a model or another adapter")
        if len(chain) > MAX_BASE_CHAIN:
            raise AdapterError(f"{directory / MANIFEST_FILE}: more than {MAX_BASE_CHAIN} adapters stacked as bases")
        if not is_adapter_dir(location):
            return
        try:
            parent = read_json_file(location / MANIFEST_FILE, AdapterError)
        except AdapterError:
            return
        nxt = parent.get("base_model", {}).get("id") if isinstance(parent.get("base_model"), dict) else None
        if not isinstance(nxt, str):
            return
        chain.append(location)
        base = nxt


PICKLE_PATTERNS = ("adapter_model.bin", "*.pt", "*.pth", "*.bin")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def read_adapter(directory: str | Path, *, verify_hashes: bool = True, allow_pickle: bool = False) -> Adapter:
    """Read manifest, config and tensors, checking sizes and hashes against the manifest.

    Checks run cheapest first and before the tensors are parsed: the file size against the
    manifest, the safetensors header's claimed size against the file's, the tensors' byte
    ranges against the data actually there, then the sha256. A pickled weights file
    (``adapter_model.bin``, ``*.pt``, ``*.pth``) is refused unless ``allow_pickle``; then it
    is read with ``torch.load(weights_only=True)`` (no arbitrary code runs)."""
    directory = local_adapter(directory)
    manifest = read_manifest(directory)
    weights = directory / WEIGHTS_FILE
    if weights.is_file():
        state = _read_safetensors(weights, manifest.files.get(WEIGHTS_FILE) if verify_hashes else None)
    else:
        pickled = sorted({p for pattern in PICKLE_PATTERNS for p in directory.glob(pattern)})
        if not pickled:
            raise AdapterError(f"{directory}: {WEIGHTS_FILE} is missing")
        if not allow_pickle:
            raise AdapterError(
                f"{directory}: {WEIGHTS_FILE} is missing (found {pickled[0].name}: pickle files are not loaded; "
                f"opt in with allow_pickle=True or --allow-pickle if you trust it)"
            )
        state = _read_pickle(pickled[0], manifest.files.get(pickled[0].name) if verify_hashes else None)
        weights = pickled[0]
    config_path = directory / CONFIG_FILE
    config = read_json_file(config_path, AdapterError, what="an adapter config (a JSON object)") if config_path.is_file() else {}
    return Adapter(path=directory, manifest=manifest, state=state, config=config, weights_file=weights.name)


SHAREABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # a plain file name: no folder, no glob


def verify_listed_files(directory: Path, manifest: Manifest) -> None:
    """Every file the manifest lists is a file in ``directory`` (a plain name; in the Hugging
    Face cache, a link to its blob) with the recorded size and sha256: the stricter check for an adapter that changes
    hands (``plugtune push`` and ``fetch``), where the config matters as much as the weights."""
    for name, expected in manifest.files.items():
        path = directory / name
        if not SHAREABLE_NAME.fullmatch(name):
            raise AdapterError(f"{directory / MANIFEST_FILE}: lists the file {name[:120]!r}; an adapter's files are plain names in its folder")
        if not path.is_file():
            raise AdapterError(f"{path}: listed in the manifest but missing; the adapter is incomplete")
        data = path.read_bytes()
        _check_recorded(path, len(data), data, expected)


def _check_recorded(path: Path, size: int, data: bytes | None, expected: dict[str, Any] | None) -> None:
    if not expected:
        return
    if expected.get("bytes") is not None and expected["bytes"] != size:
        raise AdapterError(f"{path}: {size} bytes, the manifest says {expected['bytes']} (truncated or replaced)")
    if data is not None and expected.get("sha256") and expected["sha256"] != hashlib.sha256(data).hexdigest():
        raise AdapterError(f"{path}: content does not match the manifest's sha256 (corrupt or replaced)")


def _read_safetensors(path: Path, expected: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after checking its header against its size."""
    from safetensors.torch import load as load_bytes

    size = path.stat().st_size
    _check_recorded(path, size, None, expected)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise AdapterError(f"{path}: {size} bytes, too short for a safetensors file (truncated)")
        header_bytes = int.from_bytes(head, "little")
        if header_bytes > min(size - 8, MAX_HEADER_BYTES):
            raise AdapterError(f"{path}: the safetensors header claims {header_bytes} bytes but the file has {size} (corrupt or truncated)")
        data = head + fh.read()
    try:
        header = json.loads(data[8 : 8 + header_bytes])
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except Exception as exc:  # noqa: BLE001 - any malformed header means corrupt
        raise AdapterError(f"{path}: not a readable safetensors file (bad header: {exc})") from None
    available = size - 8 - header_bytes
    if max(ends, default=0) > available:
        raise AdapterError(f"{path}: the tensors need {max(ends)} bytes of data but the file holds {available} (truncated)")
    _check_recorded(path, size, data, expected)
    try:
        return load_bytes(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure means corrupt
        raise AdapterError(f"{path}: not a readable safetensors file ({exc})") from None


def _read_pickle(path: Path, expected: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    import torch

    data = path.read_bytes()
    _check_recorded(path, len(data), data, expected)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # the bytes just checked
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AdapterError(f"{path}: not loadable with torch.load(weights_only=True) ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise AdapterError(f"{path}: not a mapping of tensor names to tensors")
    return state


def list_adapters(root: str | Path) -> list[Path]:
    """Adapter folders at or below ``root`` (one level of nesting)."""
    root = Path(root)
    if is_adapter_dir(root):
        return [root]
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if is_adapter_dir(child):
            found.append(child)
        elif child.is_dir():
            found.extend(c for c in sorted(child.iterdir()) if is_adapter_dir(c))
    return found
