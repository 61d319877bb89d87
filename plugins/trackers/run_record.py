"""The small JSON file a tracker keeps in the run folder (its tracker run's id), so that
``plugtune run --resume`` continues the same tracker run instead of starting a second one."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def read_run_record(path: Path) -> dict[str, Any]:
    """The record at ``path``; empty when there is none, or when it is unreadable or not a
    JSON object (a truncated write, a hand edit): the tracker then starts a new run, said on
    stderr, rather than failing a resumed training run over its tracker."""
    try:
        if not path.is_file():
            return {}
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        print(f"warning: {path} is unreadable ({type(exc).__name__}); starting a new tracker run", file=sys.stderr)
        return {}
    return record if isinstance(record, dict) else {}


def write_run_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` whole or not at all (a temporary file renamed over the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(staging, path)
