"""Hostile input, bounded: recipes that are YAML bombs or carry duplicated keys, numbers no
run can use, templates that ask for gigabytes, adapter files with wrong types or whose base
is themselves, tampered checkpoints, a full disk, flags out of range, and the last guard for
whatever bug is left. Each case goes through the real command (``plugtune.cli.main``) and
asserts the exact line, the exit code, and that nothing under the test's folder was written,
changed or removed; the hypothesis properties at the end load arbitrary adapter configs,
manifests and checkpoint metadata and accept nothing but a :class:`PlugtuneError`.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import plugtune
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plugtune.artifacts.adapters import CONFIG_FILE, MANIFEST_FILE, read_adapter, read_manifest
from plugtune.cli import INTERNAL_ERROR_EXIT, main
from plugtune.kernel.bounds import MAX_DEPTH
from plugtune.kernel.errors import PlugtuneError
from plugtune.kernel.registry import build_plugin_system, set_plugin_system
from plugtune.testing import recipe_dict
from plugtune.training.checkpoints import META_FILE, latest_checkpoint, read_checkpoint
from test_checkpoints import FailingStepHook
from test_hostile_input import cli, refused, snapshot, tiny_raw

# -- helpers (the house style of tests/test_hostile_input.py) ---------------------------------


def run_text(capsys, tmp_path: Path, text: str, *extra: object) -> tuple[Path, int, list[str]]:
    """``plugtune run`` a recipe written as ``text``; refused, and no output folder made."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    code, lines = refused(capsys, tmp_path, "run", path, "--quiet", *extra)
    assert not (tmp_path / "out").exists()
    return path, code, lines


def run_raw(capsys, tmp_path: Path, raw: dict, *extra: object) -> tuple[Path, int, list[str]]:
    return run_text(capsys, tmp_path, yaml.safe_dump(raw, sort_keys=False), *extra)


# -- recipes: duplicate keys, YAML bombs ------------------------------------------------------


def test_duplicated_top_level_key_names_both_lines(tmp_path, tiny_llama, tiny_data, capsys):
    text = yaml.safe_dump(tiny_raw(tiny_llama, tiny_data, tmp_path), sort_keys=False) + "training:\n  max_steps: 1\n"
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("training:"))
    last = len(text.splitlines()) - 1
    path, code, lines = run_text(capsys, tmp_path, text)
    assert code == 2
    assert lines == [f"error: {path}: line {last}: key 'training' appears twice (first on line {first}); keep one"]


def test_duplicated_nested_key(tmp_path, tiny_llama, tiny_data, capsys):
    raw = tiny_raw(tiny_llama, tiny_data, tmp_path)
    text = yaml.safe_dump(raw, sort_keys=False).replace("  seed: 0\n", "  seed: 0\n  seed: 1\n")
    line = text.splitlines().index("  seed: 1") + 1
    path, code, lines = run_text(capsys, tmp_path, text)
    assert code == 2
    assert lines == [f"error: {path}: line {line}: key 'seed' appears twice (first on line {line - 1}); keep one"]


def test_merge_keys_may_be_overridden_beside_them(tmp_path):
    """``<<: *defaults`` then the same key: YAML's override, not a duplicate."""
    from plugtune.training.recipe import read_recipe_file

    path = tmp_path / "recipe.yaml"
    path.write_text("a: &defaults {seed: 0, max_steps: 8}\ntraining:\n  <<: *defaults\n  seed: 3\n")
    assert read_recipe_file(path)["training"] == {"seed": 3, "max_steps": 8}


def laughs(levels: int, width: int = 10) -> str:
    """The billion laughs in a list field: ``width ** levels`` strings from a few lines."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nevaluators: *l{levels - 1}\n"


@pytest.mark.parametrize("levels", [6, 9])
def test_alias_expansion_is_bounded(tmp_path, tiny_llama, tiny_data, capsys, levels):
    raw = tiny_raw(tiny_llama, tiny_data, tmp_path)
    raw.pop("evaluators")
    started = time.perf_counter()
    path, code, lines = run_text(capsys, tmp_path, laughs(levels) + yaml.safe_dump(raw, sort_keys=False))
    assert time.perf_counter() - started < 5
    assert code == 2
    assert lines == [f"error: {path}: line 1: aliases expand to more than 100,000 values; "
                     f"write the values out, or use fewer aliases"]


@pytest.mark.parametrize("opener", ["[", "{a: ", "- "])
def test_deep_nesting_is_refused_while_composing(tmp_path, capsys, opener):
    closer = {"[": "]", "{a: ": "}", "- ": ""}[opener]
    if opener == "- ":  # block style: each level one more indented line
        text = "".join(f"{'  ' * i}- \n" for i in range(200)) + "  " * 200 + "- x\n"
    else:
        text = "task: " + opener * 100_000 + "1" + closer * 100_000 + "\n"
    path, code, lines = run_text(capsys, tmp_path, text)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: line ")
    assert lines[0].endswith(f": nested more than {MAX_DEPTH} levels deep")


def test_deep_nesting_through_aliases(tmp_path, capsys):
    deep = "[" * 40 + "1" + "]" * 40
    path, code, lines = run_text(capsys, tmp_path, f"a: &a {deep}\nb: {'[' * 40}*a{']' * 40}\n")
    assert code == 2
    assert lines == [f"error: {path}: line 2: nested more than {MAX_DEPTH} levels deep once aliases are followed"]


def test_recursive_alias(tmp_path, capsys):
    path, code, lines = run_text(capsys, tmp_path, "training: &t\n  seed: *t\n")
    assert code == 2
    assert lines == [f"error: {path}: line 1: an alias refers to the block that contains it"]


@pytest.mark.parametrize("value, problem", [
    ("{a: 1, a: 2}", "key 'a' appears twice (first on line 1); keep one"),
    ("[" * 100 + "]" * 100, f"nested more than {MAX_DEPTH} levels deep"),
])
def test_override_values_are_bounded_too(tmp_path, tiny_llama, tiny_data, capsys, value, problem):
    _, code, lines = run_raw(capsys, tmp_path, tiny_raw(tiny_llama, tiny_data, tmp_path), f"training.seed={value}")
    assert code == 2
    assert lines == [f"error: override training.seed: {problem}"]


# -- recipes: templates and numbers -----------------------------------------------------------


@pytest.mark.parametrize("spec, shown", [(":4000000000", "4000000000"), (":.999999", "999999"),
                                         (":>" + "9" * 5000, "9" * 20), (":0>1001", "1001")])
def test_template_format_widths_are_bounded(tmp_path, tiny_llama, tiny_data, capsys, spec, shown):
    raw = tiny_raw(tiny_llama, tiny_data, tmp_path)
    raw["task"]["prompt"] = "question : {question%s} answer :" % spec
    path, code, lines = run_raw(capsys, tmp_path, raw)
    assert code == 2
    assert lines == [f"error: {path}: task.prompt: not a valid template (field {{question{spec[:41]}}} asks for a "
                     f"width or precision of {shown}; at most 1000)"]


def test_template_small_widths_still_work(tmp_path, tiny_llama, tiny_data):
    from plugtune.training.recipe import load_recipe

    raw = tiny_raw(tiny_llama, tiny_data, tmp_path)
    raw["task"]["prompt"] = "question : {question:>12} answer :"
    assert load_recipe(raw=raw).task.to_dict()["prompt"] == "question : {question:>12} answer :"


NUMBERS = [
    ("epochs", ".inf", "Input should be a finite number (got inf)"),
    ("epochs", "1e308", "Input should be less than or equal to 1000000 (got 1e+308)"),
    ("epochs", ".nan", "Input should be a finite number (got nan)"),
    ("seed", "-1", "Input should be greater than or equal to 0 (got -1)"),
    ("seed", "4294967296", "Input should be less than or equal to 4294967295 (got 4294967296)"),
    ("seed", "18446744073709551616", "Input should be less than or equal to 4294967295 (got 18446744073709551616)"),
    ("learning_rate", ".inf", "Input should be a finite number above 0 such as 1e-3, or auto (got inf)"),
    ("learning_rate", ".NaN", "Input should be a finite number above 0 such as 1e-3, or auto (got nan)"),
    ("max_steps", "1000000000000", "Input should be less than or equal to 1000000000 (got 1000000000000)"),
    ("warmup_steps", "1e18", "Input should be less than or equal to 1000000000 (got 1e+18)"),
    ("batch_size", "99999999999999999999", "Input should be less than or equal to 1000000000 (got 99999999999999999999)"),
    ("max_grad_norm", ".inf", "Input should be a finite number (got inf)"),
]


@pytest.mark.parametrize("field, value, message", NUMBERS, ids=[f"{f}={v}" for f, v, _ in NUMBERS])
def test_training_numbers_are_bounded_before_any_folder(tmp_path, tiny_llama, tiny_data, capsys, field, value, message):
    raw = tiny_raw(tiny_llama, tiny_data, tmp_path)
    raw["training"][field] = "@@"  # the YAML scalar itself, as a user types it
    text = yaml.safe_dump(raw, sort_keys=False).replace("'@@'", value)
    path, code, lines = run_text(capsys, tmp_path, text)
    assert code == 2
    assert lines == [f"error: {path}: training.{field}: {message}"]


def test_max_new_tokens_past_the_model_context(tmp_path, tiny_llama, tiny_data, capsys):
    raw = tiny_raw(tiny_llama, tiny_data, tmp_path)
    raw["training"]["max_new_tokens"] = 100_000
    path, code, lines = run_raw(capsys, tmp_path, raw)
    assert code == 2
    assert lines == [f"error: {path}: training.max_new_tokens: 100000 tokens is past the context of {tiny_llama} "
                     f"(128 tokens, prompt included); use at most 127"]


# -- command-line flags -----------------------------------------------------------------------


@pytest.mark.parametrize("flags, line", [
    (["--port", "70000"], "error: --port: 70000 is out of range; use 0 to 65535"),
    (["--port", "-1"], "error: --port: -1 is out of range; use 0 to 65535"),
    (["--max-batch", "0"], "error: --max-batch: 0 is out of range; use 1 to 4096"),
    (["--threads", "0"], "error: --threads: 0 is out of range; use 1 to 4096"),
])
def test_serve_flags_out_of_range(tmp_path, tiny_llama, capsys, flags, line):
    code, lines = refused(capsys, tmp_path, "serve", "--base", tiny_llama, *flags)
    assert (code, lines) == (1, [line])


@pytest.mark.parametrize("value, line", [
    ("100000", "error: --max-new-tokens: 100000 is past the model's context (128 tokens, prompt included); use at most 127"),
    ("0", "error: --max-new-tokens: 0 is out of range; use 1 or more"),
])
def test_generate_max_new_tokens(tmp_path, tiny_llama, capsys, value, line):
    code, lines = refused(capsys, tmp_path, "generate", "--base", tiny_llama, "--max-new-tokens", value, "question")
    assert (code, lines) == (1, [line])


@pytest.mark.parametrize("target", ["missing/metrics.json", "."])
def test_eval_json_refused_before_the_evaluation(tmp_path, tiny_llama, tiny_data, capsys, monkeypatch, target):
    import plugtune.training.evaluation as evaluation

    def never(*args, **kwargs):
        raise AssertionError("the evaluation ran")

    monkeypatch.setattr(evaluation, "evaluate", never)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_raw(tiny_llama, tiny_data, tmp_path)))
    json_file = tmp_path / target
    code, lines = refused(capsys, tmp_path, "eval", recipe, "--json", json_file)
    expected = (f"error: --json {json_file}: the folder {json_file.parent} does not exist; create it first"
                if target != "." else f"error: --json {json_file}: is a folder; give a file name")
    assert (code, lines) == (1, [expected])


# -- adapters ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, tiny_data) -> Path:
    root = tmp_path_factory.mktemp("bounded-adapter")
    raw = recipe_dict(tiny_llama, tiny_data, name="victim")
    raw["training"]["max_steps"] = 2
    raw["output"] = {"dir": str(root / "victim")}
    (root / "victim.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return plugtune.run(root / "victim.yaml", show_progress=False).adapter_dir


def adapter_copy(trained: Path, tmp_path: Path, name: str = "adapter") -> Path:
    copy = tmp_path / name
    shutil.copytree(trained, copy)
    return copy


def edit_json(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


CONFIGS = [
    ("r", "8", "r is '8'; a LoRA rank is a whole number of at least 1"),
    ("r", 0, "r is 0; a LoRA rank is a whole number of at least 1"),
    ("r", True, "r is True; a LoRA rank is a whole number of at least 1"),
    ("lora_alpha", None, "lora_alpha is None; it is a finite number"),
    ("lora_alpha", "16", "lora_alpha is '16'; it is a finite number"),
    ("target_modules", 5, "target_modules is 5; it is a module name pattern or a list of module names"),
    ("alpha_pattern", {"q_proj": "big"}, "alpha_pattern is {'q_proj': 'big'}; it maps module names to finite numbers"),
    ("rank_pattern", [1], "rank_pattern is [1]; it maps module names to ranks of at least 1"),
    ("use_rslora", "yes", "use_rslora is 'yes'; it is true or false"),
]


@pytest.mark.parametrize("key, value, problem", CONFIGS, ids=[f"{k}={v!r}" for k, v, _ in CONFIGS])
def test_adapter_config_with_wrong_types(trained, tmp_path, capsys, key, value, problem):
    adapter = adapter_copy(trained, tmp_path)
    edit_json(adapter / CONFIG_FILE, lambda c: c.__setitem__(key, value))
    code, lines = refused(capsys, tmp_path, "generate", "--adapter", adapter, "the film")
    assert (code, lines) == (5, [f"error: adapter 'victim': adapter_config.json: {problem}"])


@pytest.mark.parametrize("content, problem", [
    ("[1, 2]", "not an adapter config (a JSON object) (found an array)"),
    ("{", "not valid JSON (Expecting property name enclosed in double quotes at line 1, column 2)"),
    ("[" * 100_000 + "]" * 100_000, f"nested too deeply (more than {MAX_DEPTH} levels)"),
    ('{"r": ' + "9" * 5000 + "}", "not valid JSON (a number with more than 4300 digits)"),
])
def test_adapter_config_not_a_config(trained, tmp_path, capsys, content, problem):
    adapter = adapter_copy(trained, tmp_path)
    (adapter / CONFIG_FILE).write_text(content)
    code, lines = refused(capsys, tmp_path, "generate", "--adapter", adapter, "the film")
    assert (code, lines) == (5, [f"error: {adapter / CONFIG_FILE}: {problem}"])


def test_manifest_whose_base_is_the_adapter_itself(trained, tmp_path, capsys):
    adapter = adapter_copy(trained, tmp_path)
    edit_json(adapter / MANIFEST_FILE, lambda m: m["base_model"].__setitem__("id", str(adapter)))
    code, lines = refused(capsys, tmp_path, "generate", "--adapter", adapter, "the film")
    assert (code, lines) == (5, [f"error: {adapter / MANIFEST_FILE}: base_model {str(adapter)!r} is the adapter itself; "
                                 f"an adapter's base must be a model or another adapter"])


def test_adapters_that_are_each_other_s_base(trained, tmp_path, capsys):
    a, b = adapter_copy(trained, tmp_path, "a"), adapter_copy(trained, tmp_path, "b")
    edit_json(a / MANIFEST_FILE, lambda m: m["base_model"].__setitem__("id", str(b)))
    edit_json(b / MANIFEST_FILE, lambda m: m["base_model"].__setitem__("id", str(a)))
    code, lines = refused(capsys, tmp_path, "merge", a, tmp_path / "merged")
    assert (code, lines) == (5, [f"error: {a / MANIFEST_FILE}: base_model {str(b)!r} comes back to {a} ({a} -> {b} -> {a}); "
                                 f"an adapter's base must be a model or another adapter"])
    assert not (tmp_path / "merged").exists()


def test_manifest_with_a_number_past_the_digit_limit(trained, tmp_path, capsys):
    adapter = adapter_copy(trained, tmp_path)
    text = (adapter / MANIFEST_FILE).read_text().replace('"format_version": 1', '"format_version": ' + "1" * 5000)
    (adapter / MANIFEST_FILE).write_text(text)
    code, lines = refused(capsys, tmp_path, "generate", "--adapter", adapter, "the film")
    assert (code, lines) == (5, [f"error: {adapter / MANIFEST_FILE}: not valid JSON (a number with more than 4300 digits)"])


# -- checkpoints ------------------------------------------------------------------------------


def interrupted_recipe(folder: Path, tiny_llama: Path, tiny_data: Path, out: Path) -> Path:
    raw = recipe_dict(tiny_llama, tiny_data, name="paused")
    raw["evaluators"] = ["loss"]
    raw["training"].update(max_steps=8, checkpoint_every=2, checkpoint_keep=2, eval_before=False)
    raw["output"] = {"dir": str(out)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder / "recipe.yaml"


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_llama, tiny_data) -> Path:
    """A folder with ``recipe.yaml`` and the run it started, stopped after step 5 (last
    checkpoint: step-4)."""
    root = tmp_path_factory.mktemp("interrupted")
    recipe = interrupted_recipe(root, tiny_llama, tiny_data, root / "out")
    set_plugin_system(build_plugin_system(extra_plugins=[("fail", FailingStepHook(at_step=5))]))
    try:
        with pytest.raises(plugtune.PluginError):
            plugtune.run(recipe, show_progress=False)
    finally:
        set_plugin_system(None)
    assert latest_checkpoint(root / "out").name == "step-4"
    return root


def resume_copy(interrupted: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """The interrupted run copied to ``tmp_path`` with its recipe pointing there: the recipe,
    the output folder and its last checkpoint."""
    shutil.copytree(interrupted / "out", tmp_path / "out")
    raw = yaml.safe_load((interrupted / "recipe.yaml").read_text())
    raw["output"]["dir"] = str(tmp_path / "out")  # output.dir may differ on a resume
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp_path / "recipe.yaml", tmp_path / "out", latest_checkpoint(tmp_path / "out")


TAMPERED = [
    ("step", "'4'", "field step: Input should be a valid integer (got '4')"),
    ("step", "1e400", "field step: Input should be a valid integer (got inf)"),
    ("step", "-3", "field step: Input should be greater than or equal to 0 (got -3)"),
    ("epoch", "null", "field epoch: Input should be a valid integer (got None)"),
    ("batch", "18446744073709551616", "field batch: Input should be less than or equal to 9007199254740992 (got 18446744073709551616)"),
    ("recipe", "[]", "field recipe: Input should be a valid dictionary"),
    ("train_seconds", "NaN", "field train_seconds: Input should be a finite number (got nan)"),
    ("best", '{"step": "x"}', "field best.step: Input should be a valid integer, unable to parse string as an integer (got 'x')"),
    ("metrics_bytes", None, "field metrics_bytes: Field required"),
]


@pytest.mark.parametrize("key, value, problem", TAMPERED, ids=[f"{k}={v}" for k, v, _ in TAMPERED])
def test_tampered_checkpoint_json_on_resume(interrupted, tmp_path, capsys, key, value, problem):
    recipe, out, last = resume_copy(interrupted, tmp_path)
    meta = json.loads((last / META_FILE).read_text())
    if value is None:
        del meta[key]
    else:
        meta[key] = "@@"
    text = json.dumps(meta).replace('"@@"', (value or "").replace("'", '"'))
    (last / META_FILE).write_text(text)
    code, lines = refused(capsys, tmp_path, "run", recipe, "--quiet", "--resume")
    assert (code, lines) == (7, [f"error: checkpoint {last / META_FILE}: {problem}; remove {last} to resume from an "
                                 f"earlier checkpoint, or start over with --overwrite"])


@pytest.mark.parametrize("content, problem", [
    ("not json", "not valid JSON (Expecting value at line 1, column 1)"),
    ('"a string"', "not checkpoint metadata (a JSON object) (found a string)"),
    ("{" * 5000, f"nested too deeply (more than {MAX_DEPTH} levels)"),
])
def test_checkpoint_json_that_is_not_metadata(interrupted, tmp_path, capsys, content, problem):
    recipe, out, last = resume_copy(interrupted, tmp_path)
    (last / META_FILE).write_text(content)
    code, lines = refused(capsys, tmp_path, "run", recipe, "--quiet", "--resume")
    if "nested" in problem:  # "{{{{..." is not even JSON: the parser stops at the first key
        problem = "not valid JSON (Expecting property name enclosed in double quotes at line 1, column 2)"
    assert (code, lines) == (7, [f"error: checkpoint {last / META_FILE}: {problem}; remove {last} to resume from an "
                                 f"earlier checkpoint, or start over with --overwrite"])


# -- a full disk (a small tmpfs) --------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs at ``tmp_path/disk`` (root only; skipped elsewhere), unmounted after."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> None:
    """Write a filler file until the disk is full."""
    with open(disk / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(interrupted, small_disk, capsys):
    """A real full disk (tmpfs): the log's appends still fit in its last page, the next
    checkpoint does not."""
    recipe, out, last = resume_copy(interrupted, small_disk)
    kept = snapshot(last)
    fill(small_disk)
    code, lines = cli(capsys, "run", recipe, "--quiet", "--resume")
    assert (code, lines) == (7, [f"error: could not write checkpoint {out}/checkpoints/step-6 (No space left on device); "
                                 f"the last good checkpoint ({last}) is intact; free space, then continue with --resume"])
    assert latest_checkpoint(out) == last and snapshot(last) == kept
    assert read_checkpoint(last).step == 4
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no staging left


def test_full_disk_while_appending_the_log(interrupted, tmp_path, capsys, monkeypatch):
    """``metrics.jsonl`` appends failing with ENOSPC (patched: on a tmpfs they fit in the
    file's last page): one line, the checkpoint untouched."""
    import builtins

    import plugtune.training.train as train_module

    def full_for_the_log(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(file, mode, *args, **kwargs)

    recipe, out, last = resume_copy(interrupted, tmp_path)
    kept = snapshot(last)
    monkeypatch.setattr(train_module, "open", full_for_the_log, raising=False)
    code, lines = cli(capsys, "run", recipe, "--quiet", "--resume")
    assert (code, lines) == (7, [f"error: could not append to {out}/metrics.jsonl (No space left on device); "
                                 f"the last checkpoint is intact; free space, then continue with --resume"])
    assert latest_checkpoint(out) == last and snapshot(last) == kept


# -- the last guard ---------------------------------------------------------------------------


def explode(*args, **kwargs):
    raise ValueError("a bug\nwith a second line")


def test_an_unexpected_exception_is_one_line_naming_the_command_and_where(tmp_path, monkeypatch, capsys):
    import plugtune.training.recipe as recipe_module

    monkeypatch.setattr(recipe_module, "validate", explode)
    (tmp_path / "r.yaml").write_text("name: x\n")
    code, lines = refused(capsys, tmp_path, "validate", tmp_path / "r.yaml")
    assert code == INTERNAL_ERROR_EXIT
    assert lines == [f"error: internal error in 'plugtune validate' (ValueError at plugtune/training/recipe.py:"
                     f"{calls_validate()}: a bug); rerun with --debug or PLUGTUNE_DEBUG=1 for the traceback"]


def calls_validate() -> int:
    """The line of load_recipe that calls validate: the innermost plugtune frame when the
    test's own ``explode`` (not a plugtune module) raises."""
    import plugtune.training.recipe as recipe_module

    source = Path(recipe_module.__file__).read_text().splitlines()
    return next(i for i, line in enumerate(source, 1) if line.strip().startswith("return validate(raw"))


def test_the_guard_names_the_plugtune_frame(tmp_path, monkeypatch, capsys):
    import plugtune.training.recipe as recipe_module

    monkeypatch.setattr(recipe_module, "read_recipe_file", lambda path: {"name": object()})  # a raw recipe no YAML makes
    monkeypatch.setattr(recipe_module, "apply_overrides", lambda raw, overrides: 1 / 0)
    code, lines = refused(capsys, tmp_path, "validate", tmp_path / "r.yaml")
    assert code == INTERNAL_ERROR_EXIT and len(lines) == 1
    assert lines[0].startswith("error: internal error in 'plugtune validate' (ZeroDivisionError at ")


@pytest.mark.parametrize("how", ["flag-before", "flag-after", "env"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, how):
    import plugtune.training.recipe as recipe_module

    monkeypatch.setattr(recipe_module, "validate", explode)
    (tmp_path / "r.yaml").write_text("name: x\n")
    argv = {"flag-before": ["--debug", "validate", str(tmp_path / "r.yaml")],
            "flag-after": ["validate", str(tmp_path / "r.yaml"), "--debug"],
            "env": ["validate", str(tmp_path / "r.yaml")]}[how]
    if how == "env":
        monkeypatch.setenv("PLUGTUNE_DEBUG", "1")
    with pytest.raises(ValueError, match="a bug"):
        main(argv)


def test_ctrl_c_keeps_exit_130(tmp_path, monkeypatch, capsys):
    import plugtune.training.recipe as recipe_module

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe_module, "validate", interrupt)
    (tmp_path / "r.yaml").write_text("name: x\n")
    assert main(["validate", str(tmp_path / "r.yaml")]) == 130
    assert capsys.readouterr().err.splitlines() == ["interrupted"]


def test_the_guard_in_a_real_process(tmp_path):
    """The console script itself: one line on stderr, the dedicated code, no traceback."""
    (tmp_path / "r.yaml").write_text("name: x\n")
    code = ("import sys, plugtune.training.recipe as r\n"
            "r.validate = lambda *a, **k: {}['missing']\n"
            "from plugtune.cli import main\n"
            f"sys.exit(main(['validate', {str(tmp_path / 'r.yaml')!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == INTERNAL_ERROR_EXIT
    assert done.stderr.splitlines() == [
        f"error: internal error in 'plugtune validate' (KeyError at plugtune/training/recipe.py:{calls_validate()}: "
        f"'missing'); rerun with --debug or PLUGTUNE_DEBUG=1 for the traceback"]


# -- fuzzing the files plugtune reads ---------------------------------------------------------

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def only_plugtune_errors(load: Any) -> None:
    try:
        load()
    except PlugtuneError as exc:
        assert "\n" not in str(exc), str(exc)


@pytest.fixture(scope="module")
def fuzz_adapter(trained, tmp_path_factory) -> Path:
    return adapter_copy(trained, tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def fuzz_host(trained) -> Any:
    from plugtune.serving.host import AdapterHost

    return AdapterHost.from_adapters(trained)


@SETTINGS
@given(key=st.sampled_from(["r", "lora_alpha", "target_modules", "alpha_pattern", "rank_pattern", "use_rslora",
                            "use_dora", "fan_in_fan_out"]), value=json_values)
def test_fuzz_adapter_config_fields(fuzz_adapter, fuzz_host, trained, key, value):
    config = json.loads((trained / CONFIG_FILE).read_text())
    config[key] = value
    (fuzz_adapter / CONFIG_FILE).write_text(json.dumps(config))

    def load_and_generate() -> None:
        fuzz_host.load(fuzz_adapter, name="fuzz")
        try:
            fuzz_host.generate(["the film"], "fuzz", max_new_tokens=1)
        finally:
            fuzz_host.unload("fuzz")

    only_plugtune_errors(load_and_generate)


@SETTINGS
@given(data=st.one_of(json_values.map(json.dumps), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_fuzz_adapter_config_whole_file(fuzz_adapter, data):
    (fuzz_adapter / CONFIG_FILE).write_text(data, encoding="utf-8")
    only_plugtune_errors(lambda: read_adapter(fuzz_adapter))


@SETTINGS
@given(key=st.sampled_from(["name", "method", "base_model", "task", "format", "format_version", "files", "recipe"]),
       inner=st.one_of(st.none(), st.sampled_from(["id", "name", "fingerprint", "options"])), value=json_values)
def test_fuzz_manifest_fields_through_read_adapter(fuzz_adapter, trained, key, inner, value):
    manifest = json.loads((trained / MANIFEST_FILE).read_text())
    if inner is not None and isinstance(manifest.get(key), dict):
        manifest[key][inner] = value
    else:
        manifest[key] = value
    (fuzz_adapter / MANIFEST_FILE).write_text(json.dumps(manifest))
    only_plugtune_errors(lambda: (read_manifest(fuzz_adapter), read_adapter(fuzz_adapter)))


@pytest.fixture(scope="module")
def fuzz_checkpoint(interrupted, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-checkpoint") / "step-4"
    shutil.copytree(latest_checkpoint(interrupted / "out"), folder)
    return folder


@SETTINGS
@given(key=st.sampled_from(["step", "epoch", "batch", "recipe", "train_rows", "metrics_bytes", "before", "history",
                            "best", "train_seconds", "format_version", "finished"]),
       value=json_values, drop=st.booleans())
def test_fuzz_checkpoint_json(fuzz_checkpoint, interrupted, key, value, drop):
    meta = json.loads((latest_checkpoint(interrupted / "out") / META_FILE).read_text())
    if drop:
        meta.pop(key, None)
    else:
        meta[key] = value
    (fuzz_checkpoint / META_FILE).write_text(json.dumps(meta))

    def load() -> None:
        checkpoint = read_checkpoint(fuzz_checkpoint)
        _ = checkpoint.step  # what resuming reads first
        from plugtune.training.checkpoints import BestWeights

        BestWeights.from_checkpoint(checkpoint)

    only_plugtune_errors(load)
