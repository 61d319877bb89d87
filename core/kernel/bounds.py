"""Bounds on the structured files plugtune reads (recipes, manifests, adapter configs,
checkpoint metadata): validation and loading do bounded work whatever the file holds.

A YAML or JSON document may nest at most :data:`MAX_DEPTH` levels (no recipe or manifest
plugtune writes comes near 20) and a YAML document may expand, aliases followed, to at most
:data:`MAX_NODES` nodes (the "billion laughs": a few lines of anchors that expand to
gigabytes once a validator walks them). :func:`read_json_file` is the one way plugtune reads
a JSON file it did not just write: any problem (unreadable, not UTF-8, not JSON, numbers past
Python's digit limit, too deep, not an object) comes back as one line, raised as the
caller's error class with the file's path in front.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MAX_DEPTH = 64
MAX_NODES = 100_000
NESTED = f"nested too deeply (more than {MAX_DEPTH} levels)"
_JSON_TYPES = {"list": "an array", "str": "a string", "int": "a number", "float": "a number", "bool": "a boolean", "NoneType": "null"}


def nesting_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply lists and dicts nest in ``value`` (a scalar: 0), counted without recursion
    and only up to ``limit + 1`` (past the limit, the exact depth does not matter)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            stack.extend((child, depth) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` with the depth bound; raises ValueError with a one-line reason.

    Python's own parser stops deep nesting with a RecursionError and overlong integers (more
    than 4300 digits) with a plain ValueError: both become the same one-line ValueError."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise ValueError(NESTED) from None
    except ValueError:  # int digits past sys.get_int_max_str_digits()
        raise ValueError(f"not valid JSON (a number with more than {sys.get_int_max_str_digits()} digits)") from None
    if nesting_depth(data) > MAX_DEPTH:
        raise ValueError(NESTED)
    return data


def read_json_file(path: Path, error: type[Exception], *, what: str = "a JSON object") -> dict[str, Any]:
    """The JSON object in ``path``, or ``error("<path>: <reason>")`` (one line) when it cannot
    be read, is not JSON, nests too deeply or is not an object (``what`` names it then)."""
    try:
        data = parse_json(Path(path).read_bytes())
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise error(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: not {what} (found {_JSON_TYPES.get(type(data).__name__, type(data).__name__)})")
    return data


__all__ = ["MAX_DEPTH", "MAX_NODES", "nesting_depth", "parse_json", "read_json_file"]
