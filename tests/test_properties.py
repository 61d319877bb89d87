"""Property-based tests (hypothesis): the recipe parser and the adapter manifest loader, fed
arbitrary input, return a valid object or raise a plugtune error, never anything else.

Example counts are modest so the suite stays fast on two cores; each property still runs
well over a hundred distinct inputs (with hypothesis' shrinking on failure).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plugtune.artifacts.adapters import MANIFEST_FILE, Manifest, read_manifest
from plugtune.kernel.errors import AdapterError, PlugtuneError
from plugtune.training.recipe import Recipe, apply_overrides, load_recipe

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])

# YAML scalars as a recipe author might write them, and some they should not.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["lora", "table", "causal-lm", "sequence-classification", "1e-3", "0", "-1", "", "..", "/",
                     "a\x00b", "x" * 5000, "smollm2-135m", "weight_decay", "accuracy", "{text}", "{", "}"]),
)
keys = st.one_of(st.text(max_size=12), st.sampled_from(
    ["name", "base_model", "task", "data", "method", "regularizers", "evaluators", "training", "output",
     "type", "prompt", "response", "text", "label", "labels", "loader", "options", "path", "columns", "r",
     "batch_size", "learning_rate", "max_steps", "epochs", "dir", "overwrite", "checkpoint_every", "overlong"]))
trees = st.recursive(scalars, lambda children: st.one_of(st.lists(children, max_size=4),
                                                        st.dictionaries(keys, children, max_size=5)), max_leaves=25)


def valid_raw(tmp: Path) -> dict[str, Any]:
    data = tmp / "data.csv"
    if not data.exists():
        data.write_text("text,label\na b,pos\nc d,neg\n", encoding="utf-8")
    return {
        "name": "prop", "base_model": "smollm2-135m",
        "task": {"type": "sequence-classification", "text": "{text}"},
        "data": {"loader": "table", "options": {"path": str(data)}},
        "method": {"name": "lora", "options": {"r": 4}},
        "evaluators": ["accuracy"],
        "training": {"max_steps": 2, "batch_size": 2},
        "output": {"dir": str(tmp / "out")},
    }


def check_recipe(call: Any) -> None:
    try:
        recipe = call()
    except PlugtuneError as exc:
        assert str(exc).strip(), "an error without a message"
        return
    assert isinstance(recipe, Recipe)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("properties")


@SETTINGS
@given(text=st.text(max_size=300))
def test_recipe_from_arbitrary_text(workdir: Path, text: str) -> None:
    path = workdir / "recipe.yaml"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))  # lone surrogates make invalid UTF-8
    check_recipe(lambda: load_recipe(path))


@SETTINGS
@given(data=st.binary(max_size=300))
def test_recipe_from_arbitrary_bytes(workdir: Path, data: bytes) -> None:
    path = workdir / "recipe-bytes.yaml"
    path.write_bytes(data)
    check_recipe(lambda: load_recipe(path))


@SETTINGS
@given(tree=trees)
def test_recipe_from_arbitrary_yaml_documents(workdir: Path, tree: Any) -> None:
    path = workdir / "recipe-tree.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    check_recipe(lambda: load_recipe(path))


@SETTINGS
@given(section=st.sampled_from(["name", "base_model", "task", "data", "method", "regularizers", "evaluators",
                                "training", "output"]),
       key=st.one_of(st.none(), keys), value=trees)
def test_recipe_with_one_section_replaced(workdir: Path, section: str, key: str | None, value: Any) -> None:
    """A valid recipe with one section, or one key inside it, replaced by arbitrary data."""
    raw = valid_raw(workdir)
    if key is None or not isinstance(raw.get(section), dict):
        raw[section] = value
    else:
        raw[section][key] = value
    check_recipe(lambda: load_recipe(raw=raw, base_dir=workdir))


awkward_strings = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["", " ", "..", "/", "//", "\x00", "a\x00b", "x" * 5000, "a/" * 3000, "~", "$HOME", "{", "}", "{0}",
                     "{text!r}", "{text:>10}", "{__class__}", "C:\\x", "org/name", "m.gguf", "-1", "1e400", "nan"]),
)
STRING_FIELDS = [("name",), ("base_model",), ("task", "text"), ("task", "label"), ("data", "options", "path"),
                 ("data", "options", "test_path"), ("data", "loader"), ("method", "name"), ("output", "dir"),
                 ("training", "learning_rate"), ("training", "scheduler")]


@SETTINGS
@given(where=st.sampled_from(STRING_FIELDS), value=awkward_strings)
def test_recipe_with_awkward_strings_in_string_fields(workdir: Path, where: tuple[str, ...], value: str) -> None:
    """Names too long for the OS, NUL bytes, format-string tricks, paths that escape."""
    raw = valid_raw(workdir)
    node = raw
    for part in where[:-1]:
        node = node.setdefault(part, {})
    node[where[-1]] = value
    check_recipe(lambda: load_recipe(raw=raw, base_dir=workdir))


@SETTINGS
@given(overrides=st.lists(st.text(max_size=30), max_size=4))
def test_recipe_with_arbitrary_overrides(workdir: Path, overrides: list[str]) -> None:
    raw = valid_raw(workdir)
    check_recipe(lambda: load_recipe(raw=apply_overrides(raw, overrides), base_dir=workdir))


# -- the manifest loader ------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=5)),
    max_leaves=25,
)
VALID_MANIFEST = {
    "format": "plugtune-adapter", "format_version": 1, "name": "a",
    "method": {"name": "lora", "options": {"r": 4}},
    "base_model": {"id": "smollm2-135m", "fingerprint": "sha256:00"},
    "task": {"type": "causal-lm"},
}


def test_the_starting_points_are_valid(workdir: Path) -> None:
    """The "one field replaced" properties start from these: they must load, or those
    properties only ever exercise the error path."""
    assert isinstance(load_recipe(raw=valid_raw(workdir), base_dir=workdir), Recipe)
    folder = workdir / "adapter-valid"
    folder.mkdir(exist_ok=True)
    (folder / MANIFEST_FILE).write_text(json.dumps(VALID_MANIFEST), encoding="utf-8")
    assert isinstance(read_manifest(folder), Manifest)


def check_manifest(folder: Path) -> None:
    try:
        manifest = read_manifest(folder)
    except AdapterError as exc:
        assert str(exc).startswith(str(folder)) and "\n" not in str(exc), str(exc)
        return
    assert isinstance(manifest, Manifest)


@SETTINGS
@given(data=st.binary(max_size=400))
def test_manifest_from_arbitrary_bytes(workdir: Path, data: bytes) -> None:
    folder = workdir / "adapter-bytes"
    folder.mkdir(exist_ok=True)
    (folder / MANIFEST_FILE).write_bytes(data)
    check_manifest(folder)


@SETTINGS
@given(value=json_values)
def test_manifest_from_arbitrary_json(workdir: Path, value: Any) -> None:
    folder = workdir / "adapter-json"
    folder.mkdir(exist_ok=True)
    (folder / MANIFEST_FILE).write_text(json.dumps(value), encoding="utf-8")
    check_manifest(folder)


@SETTINGS
@given(key=st.sampled_from([*VALID_MANIFEST, "files", "metrics", "recipe", "training", "created"]),
       inner=st.one_of(st.none(), st.text(max_size=10)), value=json_values)
def test_manifest_with_one_field_replaced(workdir: Path, key: str, inner: str | None, value: Any) -> None:
    folder = workdir / "adapter-field"
    folder.mkdir(exist_ok=True)
    manifest = json.loads(json.dumps(VALID_MANIFEST))
    if inner is not None and isinstance(manifest.get(key), dict):
        manifest[key][inner] = value
    else:
        manifest[key] = value
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    check_manifest(folder)


def test_manifest_nested_deeper_than_the_json_parser_allows(workdir: Path) -> None:
    folder = workdir / "adapter-deep"
    folder.mkdir(exist_ok=True)
    (folder / MANIFEST_FILE).write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(AdapterError, match="nested too deeply"):
        read_manifest(folder)
