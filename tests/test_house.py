"""The house: the core is laid out by layer, imports only downward, and names no built-in.

Layers, lowest first: ``kernel`` <- ``data`` <- ``artifacts`` <- ``training`` | ``serving``
(siblings: neither imports the other) <- ``reporting`` (reads what runs wrote) <- the top
floor (``cli``, ``sdk``, ``testing``, the package itself). Imports under ``if TYPE_CHECKING:`` are annotations only and not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "core"
RANK = {"kernel": 0, "data": 1, "artifacts": 2, "training": 3, "serving": 3, "reporting": 4}
TOP = 5


def _modules() -> dict[str, Path]:
    mods = {}
    for path in CORE.rglob("*.py"):
        parts = path.relative_to(CORE).with_suffix("").parts
        name = ".".join(("plugtune", *parts))
        mods[name.removesuffix(".__init__")] = path
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    return {id(child) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
            for child in ast.walk(node)}


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and target != "plugtune":
                found.add(target)
                break
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in RANK else None


def _rank(module: str) -> int:
    layer = _layer(module)
    return RANK[layer] if layer else TOP


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def test_every_core_module_sits_in_a_layer_or_on_the_top_floor() -> None:
    loose = sorted(p.name for p in CORE.glob("*.py") if p.stem not in {"__init__", "cli", "sdk", "testing"})
    assert not loose, f"core/ modules outside a layer folder: {loose}"


def test_layers_import_only_downward(graph: dict[str, set[str]]) -> None:
    wrong = []
    for module, deps in graph.items():
        for dep in deps:
            if _layer(dep) is None and _rank(module) < TOP:
                wrong.append(f"{module} -> {dep} (the top floor)")
            elif _rank(dep) > _rank(module) or (_rank(dep) == _rank(module) and _layer(dep) != _layer(module)):
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_the_core_import_graph_is_acyclic(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == 1:
            cycles.append(" -> ".join(path[path.index(module):] + [module]))
            return
        if state.get(module) == 2:
            return
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            visit(dep, path + [module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, "import cycles in core/:\n" + "\n".join(cycles)


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """String constants that could name a component: not docstrings, and not keys of a
    record (``{"loss": ...}``, ``metrics["loss"]``, ``row.get("text")``), where a word like
    ``loss`` or ``text`` is a field of the data, not a plugin's name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr)}
    keys = set(docstrings)
    for n in ast.walk(tree):
        if isinstance(n, ast.Dict):
            keys.update(id(k) for k in n.keys if k is not None)
        elif isinstance(n, ast.Subscript):
            keys.add(id(n.slice))
        elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.args
              and n.func.attr in {"get", "pop", "setdefault"}):
            keys.add(id(n.args[0]))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in keys]


# Words a file format fixes that happen to equal a component's name (none today: llama.cpp's
# adapter.type comes from peft's type name in core/artifacts/export.py).
FILE_FORMAT_WORDS: set[tuple[str, str]] = set()


def test_the_core_names_no_built_in_component(plugin_system) -> None:
    """Every name a built-in plugin registers as a tuning method, task or evaluator is absent
    from the core's code; the conformance kit (testing.py) may name them in its example
    recipes."""
    builtin = {name for kind, table in plugin_system.components.items() if kind in {"method", "task", "evaluator"}
               for name, component in table.items() if component.plugin.builtin}
    assert {"lora", "accuracy"} <= builtin  # the registry really was read
    hits = [f"{path.relative_to(CORE)}:{line} {value!r}"
            for path in CORE.rglob("*.py") if path.name != "testing.py"
            for line, value in _string_constants(path) if value.rstrip("/") in builtin
            and (str(path.relative_to(CORE)), value) not in FILE_FORMAT_WORDS]
    assert not hits, "the core names built-in components (ask for capabilities instead):\n" + "\n".join(hits)


@pytest.mark.parametrize("old,new", [("plugtune.tasks", "plugtune.data.tasks"), ("plugtune.host", "plugtune.serving.host"),
                                     ("plugtune.components", "plugtune.kernel.components"),
                                     ("plugtune.recipe", "plugtune.training.recipe"), ("plugtune.models", "plugtune.artifacts.models")])
def test_an_old_import_path_is_the_moved_module_itself(old: str, new: str) -> None:
    import importlib

    moved = importlib.import_module(new)
    assert importlib.import_module(old) is moved
    assert moved.__spec__.name == new  # the alias did not take the module's identity
