"""What a write command reads, and so may never write into: the local folders behind a base
model (an alias, a folder, a .gguf; an adapter used as a base and the bases below it).

Kept apart from core/artifacts/outputs.py, which the adapter format itself uses for its
atomic swap and so imports nothing of the artifacts.
"""

from __future__ import annotations

from pathlib import Path

from plugtune.artifacts.adapters import is_adapter_dir, read_manifest
from plugtune.artifacts.models import local_location
from plugtune.kernel.errors import PlugtuneError


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


MAX_BASE_CHAIN = 16  # adapters used as bases of adapters, followed this deep (a cycle stops sooner)


def base_inputs(base_model: str, what: str = "the base model") -> list[tuple[str, Path]]:
    """The local folders (or files) behind ``base_model`` (an alias, a folder, a .gguf), and,
    when it is an adapter used as a base, the bases below it: the folders a write must not
    touch. Offline and cheap: a hub id or an alias not fetched yet gives nothing here (the
    hub cache is not a place anyone writes to by accident)."""
    found: list[tuple[str, Path]] = []
    name: str | None = base_model
    while name is not None and len(found) < MAX_BASE_CHAIN:
        try:
            location = local_location(name)
        except PlugtuneError:
            location = None
        if location is None or any(_resolved(location) == _resolved(p) for _, p in found):
            break
        found.append((what if not found else f"{what} below {found[-1][1]}", location))
        try:
            name = read_manifest(location).base_model.id if is_adapter_dir(location) else None
        except PlugtuneError:
            name = None
    return found
