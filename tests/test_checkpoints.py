"""Checkpoints and resume, through the real ``plugtune run`` in subprocesses.

A run is killed with SIGKILL (or stopped with Ctrl-C) in the middle of training, resumed with
``--resume``, and its adapter compared tensor by tensor with an uninterrupted run of the same
recipe: on the CPU with the same seed they must be bit-identical (``torch.equal``), which
covers the model weights, optimizer and scheduler state, every RNG (LoRA dropout draws from
torch's, word dropout from its own generator), the data position across an epoch boundary,
gradient accumulation and the best-weights copy early stopping keeps.

The processes are held at a chosen step by a tiny plugin (a real distribution found on
PYTHONPATH) whose ``on_step_end`` waits for a file, so the tests wait for files, never for a
time: they behave the same on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from plugtune.artifacts.adapters import WEIGHTS_FILE
from plugtune.training.checkpoints import latest_checkpoint, list_checkpoints
from plugtune.testing import recipe_dict
from safetensors.torch import load_file

GATE_PLUGIN = '''
import os
import time

from plugtune import hookimpl


@hookimpl
def on_step_end(run, step, metrics):
    """Hold the run after step PLUGTUNE_GATE_STEP until PLUGTUNE_GATE_OPEN exists. Each process
    of a data-parallel run writes its pid to PLUGTUNE_GATE_REACHED-rank<R> (a test kills them)."""
    if str(step) != os.environ.get("PLUGTUNE_GATE_STEP"):
        return
    reached = os.environ["PLUGTUNE_GATE_REACHED"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        reached += "-rank" + os.environ["RANK"]
    with open(reached, "w") as fh:
        fh.write(str(os.getpid()))
    deadline = time.monotonic() + 600
    while not os.path.exists(os.environ["PLUGTUNE_GATE_OPEN"]) and time.monotonic() < deadline:
        time.sleep(0.02)
'''

TOTAL_STEPS = 16  # 192 training rows, batch 8, grad_accum 2: 12 steps per epoch, so the run crosses an epoch


@pytest.fixture(scope="module")
def gate_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the gate plugin as an installed distribution (module + dist-info)."""
    root = tmp_path_factory.mktemp("gate-plugin")
    (root / "plugtune_gate.py").write_text(GATE_PLUGIN)
    info = root / "plugtune_gate-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugtune-gate\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[plugtune]\ngate = plugtune_gate\n")
    return root


def write_recipe(folder: Path, tiny_llama: Path, tiny_data: Path, out: Path, **training: object) -> Path:
    raw = recipe_dict(tiny_llama, tiny_data)
    raw["method"]["options"]["dropout"] = 0.1  # LoRA dropout: torch's global RNG
    raw["regularizers"] = [
        {"name": "word_dropout", "options": {"p": 0.2, "seed": 3}},  # its own torch.Generator
        # keeps a best-weights copy: with this min_delta only the first evaluation (step 4) counts as an
        # improvement, whatever this CPU's arithmetic makes of the later losses, and patience never runs out
        {"name": "early_stopping", "options": {"metric": "loss", "patience": 50, "min_delta": 100}},
    ]
    raw["evaluators"] = ["loss"]
    raw["training"].update({"max_steps": TOTAL_STEPS, "grad_accum": 2, "eval_every": 4, "checkpoint_every": 5,
                            "checkpoint_keep": 2, "learning_rate": 5e-2, **training})
    raw["output"] = {"dir": str(out)}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def start(recipe: Path, gate_path: Path, *extra: str, gate_step: int | None = None, gate_dir: Path | None = None,
          stderr_file: Path | None = None, start_new_session: bool = False) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="1000",
               PYTHONPATH=os.pathsep.join(filter(None, [str(gate_path), os.environ.get("PYTHONPATH")])))
    env.pop("PLUGTUNE_GATE_STEP", None)
    if gate_step is not None:
        assert gate_dir is not None
        env.update(PLUGTUNE_GATE_STEP=str(gate_step), PLUGTUNE_GATE_REACHED=str(gate_dir / "reached"),
                   PLUGTUNE_GATE_OPEN=str(gate_dir / "open"))
    stderr = open(stderr_file, "w") if stderr_file else subprocess.PIPE  # noqa: SIM115 - the child holds it
    return subprocess.Popen([sys.executable, "-m", "plugtune.cli", "run", str(recipe), "--quiet", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=start_new_session)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    """Wait until ``path`` exists (the process must still be running)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"the run ended (exit {process.returncode}) before {path} appeared:\n{err}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def wait_for_text(path: Path, text: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the file ``path`` contains ``text`` (the process must still be running)."""
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before printing {text!r}"
        assert time.monotonic() < deadline, f"{text!r} did not appear in {path}"
        time.sleep(0.05)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS_FILE)


def train_records(folder: Path) -> list[dict]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    timings = {"tokens_per_s", "step_seconds", "step_cpu_seconds", "peak_rss_bytes"}  # clocks and RSS differ run to run
    return [{k: v for k, v in r.items() if k not in timings} for r in records]


def assert_same_adapter(resumed: Path, reference: Path) -> None:
    got, want = adapter_tensors(resumed), adapter_tensors(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # metrics.jsonl: every step and evaluation once, with the same values as the uninterrupted run
    assert train_records(resumed) == train_records(reference)
    manifest = json.loads((resumed / "plugtune.json").read_text())
    assert manifest["training"]["steps"] == TOTAL_STEPS
    assert manifest["training"]["best_step"] == json.loads((reference / "plugtune.json").read_text())["training"]["best_step"]
    assert not (resumed / "checkpoints").exists()  # a finished run drops its checkpoints


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_data: Path, gate_path: Path) -> Path:
    """The uninterrupted run every resumed run must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    out = folder / "adapter"
    code, _, err = finish(start(write_recipe(folder, tiny_llama, tiny_data, out), gate_path))
    assert code == 0, err
    # early stopping kept earlier weights, so the best-weights copy must survive a resume
    assert json.loads((out / "plugtune.json").read_text())["training"]["best_step"] < TOTAL_STEPS
    return out


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_llama, tiny_data, gate_path, reference):
    out = tmp_path / "adapter"
    recipe = write_recipe(tmp_path, tiny_llama, tiny_data, out)
    # Hold the run at step 13: past the checkpoint of step 10 and the epoch boundary at 12, with
    # steps 11-13 (and the evaluation at 12) logged but in no checkpoint.
    process = start(recipe, gate_path, gate_step=13, gate_dir=tmp_path)
    wait_for(tmp_path / "reached", process)
    assert latest_checkpoint(out).name == "step-10"
    assert [p.name for p in list_checkpoints(out)] == ["step-5", "step-10"]  # checkpoint_keep: 2
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (out / WEIGHTS_FILE).exists()
    logged_steps = [r["step"] for r in train_records(out) if r["event"] == "train"]
    assert logged_steps[-1] == 13  # these three steps are redone after the resume

    again = start(recipe, gate_path)  # `run` without --resume refuses, and touches nothing
    code, _, err = finish(again)
    assert code == 2, err
    assert err.strip().splitlines()[-1] == (f"error: output.dir: {out} holds an interrupted run (last checkpoint: step-10); "
                                            f"pass --resume to continue it or --overwrite to start over")
    assert latest_checkpoint(out).name == "step-10"

    code, _, err = finish(start(recipe, gate_path, "--resume"))
    assert code == 0, err
    assert f"resuming from {out / 'checkpoints' / 'step-10'} (step 10 of {TOTAL_STEPS})" in err
    assert_same_adapter(out, reference)


def test_sigkilled_two_process_run_resumes_to_the_uninterrupted_two_process_adapter(tmp_path, tiny_llama, tiny_data,
                                                                                      gate_path):
    """``--nproc 2`` (DDP over gloo): both processes are seeded alike, but their RNG states drift
    apart as soon as their shards differ in length (a dropout mask draws one number per
    element), so a checkpoint must hold every process's states and each process restore its
    own. The all-reduce of two ranks' gradients is a single commutative sum, so the resumed
    adapter is bit-identical too. The rows here vary in length and are not grouped by length
    (with equal shapes the two processes would draw alike and their states never differ)."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(line) for line in (tiny_data / "sft.jsonl").read_text().splitlines()]
    (data / "sft.jsonl").write_text("".join(
        json.dumps({**row, "question": row["question"].replace("what is", "what is" + " really" * (i % 5))}) + "\n"
        for i, row in enumerate(rows)))

    def recipe_in(folder: Path) -> Path:
        return write_recipe(folder, tiny_llama, data, folder / "adapter", eval_before=False, group_by_length=False)

    reference = tmp_path / "reference"
    code, _, err = finish(start(recipe_in(reference), gate_path, "--nproc", "2"))
    assert code == 0, err[-3000:]

    run = tmp_path / "run"
    recipe = recipe_in(run)
    # Held at step 13: past the checkpoint of step 10 and the epoch boundary at 12.
    sigkill_two_process_run(recipe, gate_path, run, gate_step=13, checkpoint="step-10")
    assert [r["step"] for r in train_records(run / "adapter") if r["event"] == "train"][-1] == 13

    code, _, err = finish(start(recipe, gate_path, "--nproc", "2", "--resume"))
    assert code == 0, err[-3000:]
    assert f"resuming from {run / 'adapter' / 'checkpoints' / 'step-10'} (step 10 of {TOTAL_STEPS})" in err
    assert "random state" not in err  # each process had its own state to restore
    assert_same_adapter(run / "adapter", reference / "adapter")


def sigkill_two_process_run(recipe: Path, gate_path: Path, run: Path, gate_step: int, checkpoint: str) -> None:
    """Start ``recipe`` with ``--nproc 2``, hold both processes at ``gate_step`` (the gate
    plugin), check that ``checkpoint`` is the run's last, then SIGKILL the launcher's session and
    the two workers (torchrun starts each worker in a session of its own) and wait until they are
    gone. The launcher goes first, so nothing reacts to the workers dying."""
    launcher = start(recipe, gate_path, "--nproc", "2", gate_step=gate_step, gate_dir=run, start_new_session=True)
    for rank in (0, 1):
        wait_for(run / f"reached-rank{rank}", launcher)
    workers = [int((run / f"reached-rank{rank}").read_text()) for rank in (0, 1)]
    assert latest_checkpoint(run / "adapter").name == checkpoint
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=60)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    for pid in workers:  # gone (not children of this process, so poll rather than wait)
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid):
            assert time.monotonic() < deadline, f"worker {pid} survived SIGKILL"
            time.sleep(0.05)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "Z"


def test_first_ctrl_c_saves_a_checkpoint_and_exits_130_then_resume_matches(tmp_path, tiny_llama, tiny_data, gate_path, reference):
    out = tmp_path / "adapter"
    recipe = write_recipe(tmp_path, tiny_llama, tiny_data, out)
    process = start(recipe, gate_path, gate_step=7, gate_dir=tmp_path)
    wait_for(tmp_path / "reached", process)
    process.send_signal(signal.SIGINT)  # arrives while step 7 is still running (held in on_step_end)
    (tmp_path / "open").touch()  # let the step finish
    code, _, err = finish(process)
    assert code == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert "stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)" in lines
    assert lines[-1] == (f"stopped at step 7 of {TOTAL_STEPS}; checkpoint saved to {out / 'checkpoints' / 'step-7'}; "
                         f"continue with: plugtune run {recipe} --resume")
    assert [p.name for p in list_checkpoints(out)] == ["step-5", "step-7"]
    assert not (out / WEIGHTS_FILE).exists()

    code, _, err = finish(start(recipe, gate_path, "--resume"))
    assert code == 0, err
    assert_same_adapter(out, reference)


def test_second_ctrl_c_stops_at_once(tmp_path, tiny_llama, tiny_data, gate_path):
    out = tmp_path / "adapter"
    recipe = write_recipe(tmp_path, tiny_llama, tiny_data, out, checkpoint_every=0)
    process = start(recipe, gate_path, gate_step=3, gate_dir=tmp_path, stderr_file=tmp_path / "stderr.txt")
    wait_for(tmp_path / "reached", process)
    # The gate never opens, so only a second Ctrl-C ends the run. Two signals sent back to back
    # can merge into one before Python sees them: send the first, wait for its message on
    # stderr (read from a file the process writes), then send the second.
    process.send_signal(signal.SIGINT)
    wait_for_text(tmp_path / "stderr.txt", "Ctrl-C again to stop at once", process)
    process.send_signal(signal.SIGINT)
    code, _, _ = finish(process)
    err = (tmp_path / "stderr.txt").read_text()
    assert code == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert "stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)" in lines
    assert lines[-1] == "interrupted"
    assert not (out / "checkpoints").exists()  # stopped at once: no checkpoint, no adapter
    assert not (out / WEIGHTS_FILE).exists()


class FailingStepHook:
    """A plugin whose on_step_end raises at one step."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    from plugtune import hookimpl

    @hookimpl
    def on_step_end(self, run, step, metrics):
        if step == self.at_step:
            raise RuntimeError("step hook exploded")


def test_resume_refuses_a_missing_checkpoint_and_a_changed_recipe(tmp_path, tiny_llama, tiny_data, capsys):
    import plugtune
    from plugtune.cli import main
    from plugtune.kernel.registry import build_plugin_system, set_plugin_system

    out = tmp_path / "adapter"
    recipe = write_recipe(tmp_path, tiny_llama, tiny_data, out)
    assert main(["run", str(recipe), "--quiet", "--resume"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --resume: no checkpoint in {out / 'checkpoints'}; run without --resume to start "
        f"(training.checkpoint_every sets the cadence)")
    assert not out.exists()

    set_plugin_system(build_plugin_system(extra_plugins=[("failing", FailingStepHook(at_step=7))]))
    try:
        with pytest.raises(plugtune.PluginError):
            plugtune.run(recipe, show_progress=False)
    finally:
        set_plugin_system(None)
    assert latest_checkpoint(out).name == "step-5"
    before = {p.name: p.read_bytes() for p in latest_checkpoint(out).iterdir()}
    capsys.readouterr()
    assert main(["run", str(recipe), "training.learning_rate=0.01", "training.log_every=2", "--quiet", "--resume"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --resume: {recipe} differs from the recipe the run in {out} was started with "
        f"(training.learning_rate); resume with the same recipe, or start over with --overwrite")
    assert main(["run", str(recipe), "--quiet", "--resume", "--overwrite"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --resume continues the run in output.dir and --overwrite replaces it; pass one of them")
    assert {p.name: p.read_bytes() for p in latest_checkpoint(out).iterdir()} == before


def test_half_written_checkpoints_are_never_picked(tmp_path):
    """Only renamed ``step-N`` folders count: a staging folder left by a killed writer, or a
    folder without its manifest, is ignored, and the next write clears the leftovers."""
    from plugtune.training.checkpoints import write_checkpoint

    out = tmp_path / "run"
    state = {"optimizer": {}, "scheduler": {}, "rng": {}, "regularizers": {}}
    write_checkpoint(out, 4, trainable={"w": torch.ones(2)}, best=None, training_state=state, meta={"step": 4}, keep=2)
    (out / "checkpoints" / ".step-8.tmp-abc").mkdir()  # killed while writing step 8
    (out / "checkpoints" / ".step-8.tmp-abc" / "trainable.safetensors").write_bytes(b"partial")
    (out / "checkpoints" / "step-9").mkdir()  # not made by plugtune: no manifest
    assert latest_checkpoint(out).name == "step-4"
    for step in (6, 10, 12):
        write_checkpoint(out, step, trainable={"w": torch.full((2,), float(step))}, best=None, training_state=state,
                         meta={"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(out)] == ["step-10", "step-12"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-12", "step-9"]


def test_the_resume_hint_names_overrides_only_when_there_are_some_and_the_process_count(tmp_path, tiny_llama, tiny_data):
    from plugtune.training.recipe import load_recipe
    from plugtune.training.signals import resume_command

    recipe = write_recipe(tmp_path, tiny_llama, tiny_data, tmp_path / "out")
    assert resume_command(load_recipe(recipe)) == f"plugtune run {recipe} --resume"
    assert resume_command(load_recipe(recipe, ["training.seed=3"])) == (
        f"plugtune run {recipe} --resume with the same key=value overrides")
    assert resume_command(load_recipe(recipe), nproc=2) == f"plugtune run {recipe} --resume --nproc 2"


def test_a_failing_overwrite_run_keeps_the_previous_adapter_and_its_log(tmp_path, tiny_llama, tiny_data, capsys):
    """``--overwrite`` keeps the old log (as metrics.previous.jsonl) until the new adapter
    replaces the old one: a run that fails (here a loss that overflows) leaves both byte for
    byte, a second failing run does not replace that log with the first failure's, and a
    run that succeeds drops it."""
    from plugtune.cli import main
    from plugtune.testing import recipe_dict

    out = tmp_path / "adapter"
    raw = recipe_dict(tiny_llama, tiny_data, output={"dir": str(out)})
    raw["training"].update(max_steps=2, eval_before=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["run", str(recipe), "--quiet"]) == 0
    adapter = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "metrics.jsonl"}
    old_log = (out / "metrics.jsonl").read_bytes()

    for _ in range(2):
        assert main(["run", str(recipe), "training.learning_rate=1e30", "training.max_steps=6", "--quiet", "--overwrite"]) == 7
        assert "loss became" in capsys.readouterr().err
        assert {name: (out / name).read_bytes() for name in adapter} == adapter
        assert (out / "metrics.previous.jsonl").read_bytes() == old_log
        assert (out / "metrics.jsonl").read_bytes() != old_log  # the failed run's own log

    assert main(["run", str(recipe), "training.seed=1", "--quiet", "--overwrite"]) == 0
    assert not (out / "metrics.previous.jsonl").exists()
    assert (out / "metrics.jsonl").read_bytes() != old_log
