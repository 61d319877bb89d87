"""Meta-tests: every hookspec is documented in its docstring and in the README, and some
test exercises it (the datasette habit)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from plugtune import hookspecs

ROOT = Path(__file__).resolve().parents[1]
SPECS = [name for name, fn in vars(hookspecs).items() if inspect.isfunction(fn) and hasattr(fn, "plugtune_spec")]


def test_hookspecs_found():
    assert {"register_tuning_methods", "register_data_loaders", "register_regularizers", "register_evaluators",
            "register_tasks", "register_base_models", "register_trackers", "on_train_start", "on_step_end", "on_evaluate",
            "on_train_end", "on_train_failed"} == set(SPECS)


@pytest.mark.parametrize("name", SPECS)
def test_hookspec_has_docstring(name):
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert len(doc) > 40 and ("Called" in doc or "called" in doc)


@pytest.mark.parametrize("name", SPECS)
def test_hookspec_is_in_the_plugin_guide(name):
    assert f"`{name}(" in (ROOT / "docs" / "plugins.md").read_text()


@pytest.mark.parametrize("name", SPECS)
def test_hookspec_is_exercised_by_a_test(name):
    here = Path(__file__).name
    sources = [p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != here]
    sources += [p.read_text() for p in (ROOT / "examples").rglob("*.py")]
    assert any(f"def {name}(" in s for s in sources), f"no test implements {name}"
