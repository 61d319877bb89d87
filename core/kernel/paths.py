"""Where plugtune keeps what it caches: fetched and converted models, tokenized splits."""

from __future__ import annotations

import os
from pathlib import Path


def plugtune_home() -> Path:
    """Where plugtune caches fetched and converted models and tokenized splits
    (``$PLUGTUNE_HOME``, default ``~/.cache/plugtune``)."""
    return Path(os.environ.get("PLUGTUNE_HOME") or Path.home() / ".cache" / "plugtune")
