"""The plugin author's guide (docs/plugins.md) covers the whole contract.

Every hook in the hookspecs, every protocol of the SDK with each of its members, and every
field of the records the core hands a plugin (the evaluation batch, the prepare context,
...) must be named in the guide, as code (between backticks). A member added to the code
without a word in the guide fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "plugins.md"
HOOKSPECS = ROOT / "core" / "kernel" / "hookspecs.py"
COMPONENTS = ROOT / "core" / "kernel" / "components.py"


def _code_words() -> set[str]:
    """Every identifier that appears inside backticks in the guide."""
    text = GUIDE.read_text(encoding="utf-8")
    spans = re.findall(r"```.*?```", text, flags=re.S) + re.findall(r"`[^`\n]+`", text)
    return {word for span in spans for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)}


def _decorated(node: ast.AST, name: str) -> bool:
    return any(name in ast.dump(d) for d in getattr(node, "decorator_list", []))


def _hooks() -> list[str]:
    tree = ast.parse(HOOKSPECS.read_text(encoding="utf-8"))
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and _decorated(n, "hookspec")]


def _is_protocol(node: ast.ClassDef) -> bool:
    return any("Protocol" in ast.dump(base) for base in node.bases)


def _is_record(node: ast.ClassDef) -> bool:
    return _decorated(node, "dataclass")


def _members(node: ast.ClassDef) -> list[str]:
    names = []
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
            names.append(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and not item.target.id.startswith("_"):
            names.append(item.target.id)
        elif isinstance(item, ast.Assign):
            names.extend(t.id for t in item.targets if isinstance(t, ast.Name) and not t.id.startswith("_"))
    return names


def _optional_members(node: ast.ClassDef) -> list[str]:
    """Optional members a protocol lists in its docstring (``name(...)``, ``name = ...``,
    ``name: ...``): looked up with getattr by the core, so not code members, but contract."""
    doc = ast.get_docstring(node) or ""
    return sorted(set(re.findall(r"``([a-z_][a-z0-9_]*)(?:\(|: | = )", doc)))


def _contract() -> list[tuple[str, str]]:
    """(where, name) for every name the guide must mention."""
    tree = ast.parse(COMPONENTS.read_text(encoding="utf-8"))
    wanted = [("hookspecs", hook) for hook in _hooks()]
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and (_is_protocol(node) or _is_record(node)):
            wanted.append(("components", node.name))
            members = _members(node) + (_optional_members(node) if _is_protocol(node) else [])
            wanted.extend((node.name, member) for member in dict.fromkeys(members) if member != "model_config")
    return wanted


def test_the_contract_is_read_from_the_code() -> None:
    contract = _contract()
    assert ("hookspecs", "register_tuning_methods") in contract
    assert ("components", "EvalBatch") in contract and ("EvalBatch", "predictions") in contract
    assert ("Regularizer", "transform_batch") in contract  # listed in the protocol's docstring
    assert len(contract) > 40


@pytest.mark.parametrize("where,name", _contract())
def test_the_guide_names_every_hook_protocol_and_member(where: str, name: str) -> None:
    assert name in _code_words(), f"docs/plugins.md does not mention `{name}` ({where}); document it"


def test_the_readme_links_the_guide() -> None:
    assert "docs/plugins.md" in (ROOT / "README.md").read_text(encoding="utf-8")
