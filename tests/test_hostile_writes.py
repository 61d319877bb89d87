"""Hostile writes: every command that writes (``run``, ``merge``, ``combine``) under one output
policy (core/artifacts/outputs.py), signals during training and during the adapter swap, and
combine's numeric checks.

Each refusal goes through the real command (``plugtune.cli.main``) and asserts the exact
line, the exit code, no traceback, and that every file under the test's folder and the base
model's folder is byte-identical before and after. Signals are sent to real ``plugtune run``
subprocesses held at a step by test_checkpoints.py's gate plugin.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from plugtune.artifacts.adapters import MANIFEST_FILE, WEIGHTS_FILE, read_adapter, save_adapter
from plugtune.artifacts.outputs import recover_interrupted_swap
from plugtune.cli import main
from plugtune.data.tasks import build_task
from plugtune.plugins.methods.lora import random_lora_adapter
from plugtune.serving.host import AdapterHost
from plugtune.testing import recipe_dict
from test_checkpoints import (  # noqa: F401 - gate_path and reference are fixtures used here
    TOTAL_STEPS,
    assert_same_adapter,
    finish,
    gate_path,
    reference,
    start,
    wait_for,
    wait_for_text,
    write_recipe,
)
from test_hostile_input import cli, snapshot

TASK = build_task(dict(type="causal-lm", prompt="question : {q} answer :", response=" {a}"))
DEAD_PID = 2**22 + 12345  # above Linux's default pid_max: never a live process


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_llama) -> list[Path]:
    """Two random LoRA adapters on the tiny Llama, in a folder of their own."""
    root = tmp_path_factory.mktemp("parents")
    base = AdapterHost.from_base(str(tiny_llama), TASK).base
    return [random_lora_adapter(root / "a", base, TASK, r=4, seed=1, scale=0.5),
            random_lora_adapter(root / "b", base, TASK, r=4, seed=2, scale=0.5)]


@pytest.fixture
def work(tmp_path, loras) -> tuple[Path, Path, Path]:
    """Copies of the two parents under ``tmp_path`` (so ``refused`` snapshots them)."""
    import shutil

    a, b = tmp_path / "parents" / "a", tmp_path / "parents" / "b"
    shutil.copytree(loras[0], a)
    shutil.copytree(loras[1], b)
    return tmp_path, a, b


def refused_all(capsys, roots: list[Path], *args: object) -> tuple[int, list[str]]:
    """The command fails with an error line and nothing under any of ``roots`` changes."""
    before = [snapshot(r) for r in roots]
    listing = [sorted(os.listdir(r)) for r in roots]
    code, lines = cli(capsys, *args)
    assert code != 0, lines
    assert lines, "no error line"
    assert [snapshot(r) for r in roots] == before
    assert [sorted(os.listdir(r)) for r in roots] == listing  # no staging folder or empty folder left
    return code, lines


def resolved(path: Path) -> Path:
    return path.resolve()


# -- merge ------------------------------------------------------------------------------------


def merge_targets(tmp_path: Path, adapter: Path, base: Path) -> dict[str, tuple[Path, str]]:
    """Each hostile OUT for ``merge`` and the refusal it must give (after ``error: ``)."""
    (tmp_path / "a-file").write_text("keep me")
    (tmp_path / "link-to-base").symlink_to(base)
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "notes.txt").write_text("mine")
    r = resolved
    return {
        "the base folder": (base, f"{base} is the base model ({r(base)}); write to another folder"),
        "inside the base": (base / "merged", f"{base / 'merged'} is inside the base model ({r(base)}); write to another folder"),
        "the base by a symlink": (tmp_path / "link-to-base",
                                  f"{tmp_path / 'link-to-base'} is the base model ({r(base)}); write to another folder"),
        "the base spelled with ..": (base / ".." / base.name,
                                     f"{base / '..' / base.name} is the base model ({r(base)}); write to another folder"),
        "the adapter folder": (adapter, f"{adapter} is the adapter ({r(adapter)}); write to another folder"),
        "inside the adapter": (adapter / "model", f"{adapter / 'model'} is inside the adapter ({r(adapter)}); write to another folder"),
        "a folder holding the adapter": (adapter.parent, f"{adapter.parent} contains the adapter ({r(adapter)}); write to another folder"),
        "a regular file": (tmp_path / "a-file", f"{tmp_path / 'a-file'} exists and is not a folder"),
        "under a regular file": (tmp_path / "a-file" / "sub",
                                 f"cannot write to {tmp_path / 'a-file' / 'sub'} ({tmp_path / 'a-file'} is not a folder)"),
        "an existing folder": (tmp_path / "existing",
                               f"{tmp_path / 'existing'} already exists and is not empty; pass --overwrite to replace it"),
    }


MERGE_CASES = ["the base folder", "inside the base", "the base by a symlink", "the base spelled with ..", "the adapter folder",
               "inside the adapter", "a folder holding the adapter", "a regular file", "under a regular file", "an existing folder"]


@pytest.mark.parametrize("case", MERGE_CASES)
def test_merge_refuses_an_output_it_may_not_write(case, work, tiny_llama, capsys):
    tmp_path, adapter, _ = work
    out, message = merge_targets(tmp_path, adapter, tiny_llama)[case]
    code, lines = refused_all(capsys, [tmp_path, tiny_llama], "merge", adapter, out)
    assert code == 2
    assert lines == [f"error: {message}"]


@pytest.mark.parametrize("case", ["the base folder", "the adapter folder", "a folder holding the adapter", "a regular file"])
def test_merge_overwrite_never_overrides_the_input_rules(case, work, tiny_llama, capsys):
    tmp_path, adapter, _ = work
    out, message = merge_targets(tmp_path, adapter, tiny_llama)[case]
    code, lines = refused_all(capsys, [tmp_path, tiny_llama], "merge", adapter, out, "--overwrite")
    assert (code, lines) == (2, [f"error: {message}"])


def test_merge_with_overwrite_replaces_the_folder_as_a_whole_and_reports_its_files(work, capsys):
    """A stale file of the previous folder (an old shard, say) must not survive next to the
    new model, and the last line lists exactly the files written."""
    from transformers import AutoModelForCausalLM

    tmp_path, adapter, _ = work
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model-00002-of-00002.safetensors").write_text("stale")
    capsys.readouterr()
    assert main(["merge", str(adapter), str(out), "--overwrite"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert "model-00002-of-00002.safetensors" not in files and "model.safetensors" in files
    assert printed == f"a merged into {read_adapter(adapter).manifest.base_model.id}: a plain model folder at {out} ({len(files)} files: {', '.join(files)})"
    AutoModelForCausalLM.from_pretrained(out)  # loadable
    assert sorted(os.listdir(tmp_path)) == ["merged", "parents"]  # no staging or old folder left


# -- combine ----------------------------------------------------------------------------------


def combine_targets(tmp_path: Path, a: Path, b: Path, base: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "a-file").write_text("keep me")
    (tmp_path / "link-to-a").symlink_to(a)
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "notes.txt").write_text("mine")
    r = resolved
    pa, pb = f"parent adapter {str(a)!r}", f"parent adapter {str(b)!r}"
    return {
        "the first parent": (a, f"{a} is {pa} ({r(a)}); write to another folder"),
        "the second parent": (b, f"{b} is {pb} ({r(b)}); write to another folder"),
        "a parent by a symlink": (tmp_path / "link-to-a", f"{tmp_path / 'link-to-a'} is {pa} ({r(a)}); write to another folder"),
        "inside a parent": (b / "blend", f"{b / 'blend'} is inside {pb} ({r(b)}); write to another folder"),
        "the folder holding the parents": (a.parent, f"{a.parent} contains {pa} ({r(a)}); write to another folder"),
        "the base folder": (base, f"{base} is the base model ({r(base)}); write to another folder"),
        "a regular file": (tmp_path / "a-file", f"{tmp_path / 'a-file'} exists and is not a folder"),
        "an existing folder": (tmp_path / "existing",
                               f"{tmp_path / 'existing'} already exists and is not empty; pass --overwrite to replace it"),
    }


COMBINE_CASES = ["the first parent", "the second parent", "a parent by a symlink", "inside a parent",
                 "the folder holding the parents", "the base folder", "a regular file", "an existing folder"]


@pytest.mark.parametrize("case", COMBINE_CASES)
def test_combine_refuses_an_output_it_may_not_write(case, work, tiny_llama, capsys):
    tmp_path, a, b = work
    out, message = combine_targets(tmp_path, a, b, tiny_llama)[case]
    code, lines = refused_all(capsys, [tmp_path, tiny_llama], "combine", out, a, b, "--weights", "0.5", "0.5")
    assert (code, lines) == (2, [f"error: {message}"])


def test_combine_into_a_parent_is_refused_even_with_overwrite(work, tiny_llama, capsys):
    tmp_path, a, b = work
    code, lines = refused_all(capsys, [tmp_path, tiny_llama], "combine", a, a, b, "--overwrite")
    assert (code, lines) == (2, [f"error: {a} is parent adapter {str(a)!r} ({a.resolve()}); write to another folder"])


@pytest.mark.parametrize("weights, bad", [(("nan", "inf"), (1, "nan")), (("inf", "1"), (1, "inf")),
                                          (("-0.5", "inf"), (2, "inf")), (("1", "nan"), (2, "nan"))])
def test_combine_refuses_weights_that_are_not_finite(weights, bad, work, tiny_llama, capsys):
    tmp_path, a, b = work
    out = tmp_path / "blend"
    code, lines = refused_all(capsys, [tmp_path, tiny_llama], "combine", out, a, b, "--weights", *weights)
    which, value = bad
    assert code == 5
    assert lines == [f"error: weight {which} (for {(a, b)[which - 1]}) is {value}; weights must be finite numbers"]
    assert not out.exists()


def test_combine_refuses_a_result_that_overflows_to_infinity(work, tiny_llama, capsys):
    """Finite weights so large that the combined tensors overflow: checked before saving."""
    tmp_path, a, b = work
    out = tmp_path / "blend"
    code, lines = refused_all(capsys, [tmp_path, tiny_llama], "combine", out, a, b, "--weights", "1e300", "1e300")
    assert code == 5
    assert len(lines) == 1
    assert lines[0].startswith("error: the combination is not finite (")
    assert lines[0].endswith("nothing was written; use smaller weights")
    assert not out.exists()


def test_combine_with_overwrite_replaces_an_earlier_blend_and_reports_its_files(work, capsys):
    tmp_path, a, b = work
    out = tmp_path / "blend"
    assert main(["combine", str(out), str(a), str(b)]) == 0
    first = read_adapter(out).state
    capsys.readouterr()
    assert main(["combine", str(out), str(a), str(b), "--weights", "0.1", "0.9", "--overwrite"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == (f"combined 2 adapters (linear, weights [0.1, 0.9]) into {out} "
                       f"(4 files: README.md, adapter_config.json, adapter_model.safetensors, plugtune.json)")
    second = read_adapter(out)
    assert second.manifest.model_extra["combination"]["weights"] == [0.1, 0.9]
    assert any(not torch.equal(first[k], second.state[k]) for k in first)
    assert sorted(os.listdir(tmp_path)) == ["blend", "parents"]


# -- run: the same policy ---------------------------------------------------------------------


def run_recipe(tmp_path: Path, tiny_llama: Path, data: Path, out: Path) -> Path:
    raw = recipe_dict(tiny_llama, data)
    raw["output"] = {"dir": str(out)}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_run_refuses_the_base_model_folder_as_output(tmp_path, tiny_llama, tiny_data, capsys):
    recipe = run_recipe(tmp_path, tiny_llama, tiny_data, tiny_llama)
    code, lines = refused_all(capsys, [tmp_path, tiny_llama], "run", recipe, "--quiet", "--overwrite")
    assert (code, lines) == (2, [f"error: output.dir: {tiny_llama} is the base model ({tiny_llama.resolve()}); write to another folder"])


def test_run_refuses_an_output_folder_holding_its_data(tmp_path, tiny_llama, tiny_data, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    recipe = run_recipe(tmp_path, tiny_llama, data, data)
    code, lines = refused_all(capsys, [tmp_path], "run", recipe, "--quiet", "--overwrite")
    assert (code, lines) == (2, [f"error: output.dir: {data} contains data.options.path ({(data / 'sft.jsonl').resolve()}); "
                                 f"write to another folder"])


def test_run_refuses_an_output_inside_the_base_model_folder(tmp_path, tiny_llama, tiny_data, capsys):
    out = tiny_llama / "adapter"
    recipe = run_recipe(tmp_path, tiny_llama, tiny_data, out)
    code, lines = refused_all(capsys, [tmp_path, tiny_llama], "run", recipe, "--quiet")
    assert (code, lines) == (2, [f"error: output.dir: {out} is inside the base model ({tiny_llama.resolve()}); write to another folder"])


# -- signals during training ------------------------------------------------------------------


def test_first_sigterm_saves_a_checkpoint_and_exits_130_then_resume_matches(tmp_path, tiny_llama, tiny_data, gate_path,
                                                                             reference):
    out = tmp_path / "adapter"
    recipe = write_recipe(tmp_path, tiny_llama, tiny_data, out)
    process = start(recipe, gate_path, gate_step=7, gate_dir=tmp_path)
    wait_for(tmp_path / "reached", process)
    process.send_signal(signal.SIGTERM)  # what docker stop, systemd and timeout send; step 7 is still running
    (tmp_path / "open").touch()
    code, _, err = finish(process)
    assert code == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert "SIGTERM: stopping after this step and saving a checkpoint (a second SIGTERM or Ctrl-C stops at once)" in lines
    assert lines[-1] == (f"stopped at step 7 of {TOTAL_STEPS}; checkpoint saved to {out / 'checkpoints' / 'step-7'}; "
                         f"continue with: plugtune run {recipe} --resume")
    assert not (out / WEIGHTS_FILE).exists()

    code, _, err = finish(start(recipe, gate_path))  # a plain rerun says how to resume, and touches nothing
    assert code == 2
    assert err.strip().splitlines()[-1] == (f"error: output.dir: {out} holds an interrupted run (last checkpoint: step-7); "
                                            f"pass --resume to continue it or --overwrite to start over")
    code, _, err = finish(start(recipe, gate_path, "--resume"))
    assert code == 0, err
    assert_same_adapter(out, reference)


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_at_once_and_the_folder_says_there_is_nothing_to_resume(second, tmp_path, tiny_llama,
                                                                                      tiny_data, gate_path):
    out = tmp_path / "adapter"
    recipe = write_recipe(tmp_path, tiny_llama, tiny_data, out, checkpoint_every=0)
    process = start(recipe, gate_path, gate_step=3, gate_dir=tmp_path, stderr_file=tmp_path / "stderr.txt")
    wait_for(tmp_path / "reached", process)
    process.send_signal(signal.SIGTERM)
    wait_for_text(tmp_path / "stderr.txt", "a second SIGTERM or Ctrl-C stops at once", process)
    process.send_signal(second)
    code, _, _ = finish(process)
    err = (tmp_path / "stderr.txt").read_text()
    assert code == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted"
    assert not (out / "checkpoints").exists() and not (out / WEIGHTS_FILE).exists()
    before = snapshot(out)
    code, _, err = finish(start(recipe, gate_path))
    assert code == 2
    assert err.strip().splitlines()[-1] == (f"error: output.dir: {out} holds a run that stopped before its first checkpoint "
                                            f"(no adapter, nothing to resume); pass --overwrite to start over")
    assert snapshot(out) == before


# -- signals and kills during the adapter swap ------------------------------------------------


SWAP_SCRIPT = '''
import os, signal, sys
from pathlib import Path
from plugtune.artifacts import adapters, outputs
from plugtune.artifacts.adapters import read_adapter, save_adapter

out, signum = Path(sys.argv[1]), int(sys.argv[2])
old = read_adapter(out)
real = Path.rename
calls = []

def rename(self, target):
    real(self, target)
    calls.append(str(target))
    if len(calls) == 1:  # the previous adapter is aside, the new one not yet in: the worst moment
        os.kill(os.getpid(), signum)
    return target

Path.rename = rename
record = old.manifest.model_dump()
record.pop("files")
record["name"] = "new"
save_adapter(out, state={k: v * 2 for k, v in old.state.items()}, config=old.config, manifest=record)
print("survived")
'''


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_between_the_two_renames_of_the_swap_still_leaves_a_whole_adapter(signum, work):
    """The signal arrives after the old adapter was renamed aside: it is held until the new
    one is in place, then it ends the process; the next save clears what was left."""
    tmp_path, a, _ = work
    before = read_adapter(a).state
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", SWAP_SCRIPT, str(a), str(int(signum))], env=env,
                            capture_output=True, text=True, timeout=300)
    assert "survived" not in result.stdout  # the signal was delivered, after the swap
    assert result.returncode in (-signum, 1), result.stderr  # SIGTERM: killed; SIGINT: KeyboardInterrupt
    swapped = read_adapter(a)  # loadable, and the new one
    assert swapped.manifest.name == "new"
    assert all(torch.equal(swapped.state[k], v * 2) for k, v in before.items())
    leftovers = [n for n in os.listdir(a.parent) if n.startswith(".a.")]
    assert all(".old-" in n for n in leftovers)  # at most the previous adapter aside, never a staging folder of it
    assert recover_interrupted_swap(a) == [f"{a}: removed {n}, left by an interrupted write" for n in leftovers]
    assert sorted(os.listdir(a.parent)) == ["a", "b"]


def plant(folder: Path, name: str, source: Path) -> Path:
    import shutil

    target = folder / name
    shutil.copytree(source, target)
    return target


def test_a_swap_killed_with_no_adapter_at_its_path_is_put_back_by_the_next_run(work, tiny_llama, tiny_data, capsys):
    """Killed (SIGKILL, power loss) after the old adapter went aside and before the new one
    came in: the next ``plugtune run`` of that folder puts the old one back first, then
    applies the policy to it (here: the folder holds a run, so it is refused)."""
    tmp_path, a, _ = work
    original = snapshot(a)
    aside = a.parent / f".a.old-{DEAD_PID}"
    a.rename(aside)
    staging = plant(a.parent, f".a.tmp-{DEAD_PID}-k2j9x", aside)
    (staging / WEIGHTS_FILE).write_bytes(b"half")  # an unfinished new adapter
    recipe = run_recipe(tmp_path, tiny_llama, tiny_data, a)
    capsys.readouterr()
    code = main(["run", str(recipe), "--quiet"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert f"{a}: put back the previous contents from {aside.name} (a write was interrupted)" in err
    assert f"{a}: removed {staging.name}, left by an interrupted write" in err
    assert err[-1] == f"error: output.dir: {a} already holds a run; pass --overwrite or set output.overwrite: true"
    assert snapshot(a) == original
    read_adapter(a)
    assert sorted(os.listdir(a.parent)) == ["a", "b"]


@pytest.mark.parametrize("leftover", ["old", "tmp", "legacy-tmp"])
def test_leftovers_of_an_interrupted_swap_are_cleared_by_the_next_save(leftover, work):
    tmp_path, a, b = work
    name = {"old": f".a.old-{DEAD_PID}", "tmp": f".a.tmp-{DEAD_PID}-q1w2e3", "legacy-tmp": ".a.tmp-q1w2e3r4"}[leftover]
    plant(a.parent, name, b)
    old = read_adapter(a)
    record = old.manifest.model_dump()
    record.pop("files")
    save_adapter(a, state=old.state, config=old.config, manifest=record)
    assert sorted(os.listdir(a.parent)) == ["a", "b"]
    assert read_adapter(a).manifest.name == "a"


def test_a_live_writers_staging_folder_is_left_alone(work):
    """Another process still filling its staging folder (its pid is alive) keeps it."""
    tmp_path, a, b = work
    live = plant(a.parent, f".a.tmp-{os.getppid()}-abc", b)
    assert recover_interrupted_swap(a) == []
    assert live.is_dir()


def test_an_old_adapter_aside_is_not_put_back_over_a_present_one(work):
    tmp_path, a, b = work
    plant(a.parent, f".a.old-{DEAD_PID}", b)
    current = snapshot(a)
    assert recover_interrupted_swap(a) == [f"{a}: removed .a.old-{DEAD_PID}, left by an interrupted write"]
    assert snapshot(a) == current
    assert json.loads((a / MANIFEST_FILE).read_text())["name"] == "a"
