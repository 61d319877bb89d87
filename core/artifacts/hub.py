"""Adapters on the Hugging Face hub by reference: ``hf://org/name[@revision]``.

    local_adapter("hf://acme/support-lora")   # the cached snapshot folder, or one line saying how to fetch it

An ``hf://`` reference is resolved here, in one place, and only through the local Hugging
Face cache (``snapshot_download(local_files_only=True)``, which honours HF_HOME and
HF_HUB_CACHE): loading, validating a recipe or serving never reaches the network. Fetching
and pushing, which do, are in core/artifacts/sharing.py. This module reads no adapter
itself, so the adapter format (core/artifacts/adapters.py) can resolve references with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugtune.kernel.errors import AdapterError

SCHEME = "hf://"
REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
REPO_ID = re.compile(rf"{REPO_PART}/{REPO_PART}")
REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")


@dataclass(frozen=True)
class HubRef:
    """``hf://repo_id[@revision]``."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def is_hub_ref(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


def parse_hub_ref(value: Any, *, strict: bool = True) -> HubRef | None:
    """The reference in ``hf://org/name[@revision]``; None for anything not starting with
    ``hf://``. A malformed one is an :class:`AdapterError` (``strict``) or None."""
    if not is_hub_ref(value):
        return None
    repo_id, _, revision = value[len(SCHEME):].partition("@")
    if (not REPO_ID.fullmatch(repo_id) or ".." in repo_id
            or (revision and (not REVISION.fullmatch(revision) or ".." in revision))):  # the revision names a cache file
        if not strict:
            return None
        raise AdapterError(f"{value[:200]!r} is not a hub adapter reference; write hf://ORG/NAME or hf://ORG/NAME@REVISION")
    return HubRef(repo_id, revision or None)


def hub_model_id(value: str) -> str | None:
    """``value`` when it is shaped like a hub id (``org/name``) and is no local path, else None."""
    if not isinstance(value, str) or value.startswith((".", "/", "~")) or not REPO_ID.fullmatch(value):
        return None
    try:
        if Path(value).exists():
            return None
    except OSError:
        pass
    return value


def not_cached_message(ref: HubRef) -> str:
    return (f"{ref} is not in the local Hugging Face cache; fetch it with `plugtune fetch {ref}` (needs network)")


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def cached_adapter(ref: HubRef) -> Path:
    """The folder of ``ref``'s snapshot in the local Hugging Face cache (HF_HOME /
    HF_HUB_CACHE), never fetching; one line when it is not there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise AdapterError(not_cached_message(ref)) from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{ref}: the cached copy cannot be read ({first_line(exc)}); fetch it again with "
                           f"`plugtune fetch {ref}`") from None


def local_adapter(value: str | Path) -> Path:
    """The folder an adapter argument names: an ``hf://`` reference's cached snapshot, or the
    path itself. Every entry point that takes an adapter folder goes through here (through
    :func:`~plugtune.artifacts.adapters.read_manifest` and ``read_adapter``)."""
    ref = parse_hub_ref(value) if isinstance(value, str) else None
    return cached_adapter(ref) if ref is not None else Path(value)


def cached_or_none(value: str) -> Path | None:
    """:func:`local_adapter` for an ``hf://`` reference, or None when it is not cached or malformed
    (cheap checks that must not raise: where a write may not go)."""
    try:
        ref = parse_hub_ref(value)
        return cached_adapter(ref) if ref is not None else None
    except AdapterError:
        return None
