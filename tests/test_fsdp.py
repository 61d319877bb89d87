"""``training.distributed: fsdp``: two CPU processes over gloo, through the real ``plugtune run
--nproc 2`` launcher (core/training/launch.py), on the tiny Llama.

* the adapter of a sharded run (full fine-tuning and LoRA), and of a ``ddp`` run, equals a
  single process's on the same global batch, within float summation order;
* each process holds about half the training state (parameters, gradients, AdamW moments)
  of a ``ddp`` process, read from the run's ``memory`` record;
* a SIGKILLed sharded run resumed with ``--resume`` gives the uninterrupted run's adapter;
* what cannot be sharded is refused at validation, before any weight loads.

Six two-process launches and two single-process runs in all (the full fine-tuning runs made
once per session, whichever xdist workers its tests land on): most of the time is the
processes' start-up (imports), not training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock
from plugtune.kernel.errors import RecipeError
from plugtune.testing import recipe_dict
from plugtune.training.recipe import load_recipe

from test_checkpoints import adapter_tensors, finish, gate_path, sigkill_two_process_run, start, train_records  # noqa: F401

STEPS = 6
CHECKPOINT_EVERY = 2
LEARNING_RATE = 1e-3


def write_recipe(folder: Path, tiny_llama: Path, tiny_data: Path, method: str, **training: object) -> Path:
    """The tiny Llama, full fine-tuning or LoRA (no dropout: the processes would draw
    different masks for their rows than one process for the whole batch), fp32, one thread."""
    raw = recipe_dict(tiny_llama, tiny_data)
    if method == "full":
        raw["method"] = {"name": "full"}
    raw["evaluators"] = ["loss"]
    raw["training"].update({"max_steps": STEPS, "learning_rate": LEARNING_RATE, "eval_before": False, "threads": 1,
                            "checkpoint_every": CHECKPOINT_EVERY, "distributed": "fsdp", **training})
    raw["output"] = {"dir": str(folder / "adapter")}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def two_processes(recipe: Path, gate: Path, *overrides: str) -> Path:
    """Run ``recipe`` with ``--nproc 2``; returns its adapter folder (its stdout beside, in stdout.txt)."""
    code, out, err = finish(start(recipe, gate, "--nproc", "2", *overrides))
    assert code == 0, err[-3000:]
    (recipe.parent / "stdout.txt").write_text(out)
    return recipe.parent / "adapter"


def one_process(recipe: Path, gate: Path) -> tuple[Path, str]:
    """The same recipe (``distributed: fsdp``) in one process: nothing to shard."""
    code, _, err = finish(start(recipe, gate))
    assert code == 0, err[-3000:]
    return recipe.parent / "adapter", err


def memory_record(adapter: Path) -> dict:
    [record] = [r for r in train_records(adapter) if r["event"] == "memory"]
    return record


def grad_norms(adapter: Path) -> list[float]:
    return [r["grad_norm"] for r in train_records(adapter) if r["event"] == "train"]


# Tolerance. The sharded run computes the same global-batch gradient as one process, only
# summed in another order (each process sums its half of the rows' token losses, then
# FSDP's reduce-scatter adds the halves): the gradients differ by float32 rounding, about
# 1e-7 relative (the logged grad_norm agrees to 1e-5). AdamW divides each update by the
# gradient's own running RMS, which amplifies that relative difference where an element's
# gradient is small, and differences compound over the steps. So the bound is set against
# the most AdamW can move an element in these steps (about lr per step, MOVE = 6e-3): observed
# at most 8.7e-6 of it for full fine-tuning (5e-8) and 6.6e-5 for LoRA (4e-7, some 25 float32
# ulps of lora_A's values); allowed 1e-3 of it (6e-6, a 15x margin over the worst seen). A real error moves elements by the size of an update:
# a rank whose gradient is not reduced, a shard put back in the wrong place, a step lost.
MOVE = LEARNING_RATE * STEPS
TOLERANCE = 1e-3 * MOVE


def assert_same_adapter_within_rounding(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Every tensor of ``got`` within :data:`TOLERANCE` of ``want``'s; returns the worst
    difference as a fraction of :data:`MOVE`."""
    assert sorted(got) == sorted(want)
    worst = 0.0
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape and got[name].dtype == tensor.dtype, name
        difference = float((got[name] - tensor).abs().max())
        assert difference <= TOLERANCE, (name, difference)
        worst = max(worst, difference / MOVE)
    return worst


def make_full_runs(root: Path, tiny_llama: Path, tiny_data: Path, gate_path: Path) -> dict[str, Path]:
    """Full fine-tuning: sharded over two processes, in one process, and under ddp."""
    recipe = write_recipe(root / "fsdp", tiny_llama, tiny_data, "full")
    single, note = one_process(write_recipe(root / "single", tiny_llama, tiny_data, "full"), gate_path)
    assert "training.distributed: fsdp with one process: nothing to shard" in note
    return {"fsdp": two_processes(recipe, gate_path), "single": single, "recipe": recipe,
            "ddp": two_processes(write_recipe(root / "ddp", tiny_llama, tiny_data, "full", distributed="ddp"), gate_path)}


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, tiny_llama, tiny_data, gate_path) -> dict[str, Path]:
    """:func:`make_full_runs`, made once per test session: under pytest-xdist the tests using
    it may land on several workers, and each would otherwise launch the same three runs
    (pytest-xdist's recipe: a file lock in the folder the workers' temporary folders share;
    the first worker makes the runs, the others wait for it and read where they are)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:  # no xdist: one process, a module fixture runs once anyway
        return make_full_runs(tmp_path_factory.mktemp("fsdp-full"), tiny_llama, tiny_data, gate_path)
    shared = tmp_path_factory.getbasetemp().parent
    made = shared / "fsdp-full-runs.json"
    with FileLock(str(made) + ".lock"):
        if not made.exists():
            runs = make_full_runs(shared / "fsdp-full", tiny_llama, tiny_data, gate_path)
            made.write_text(json.dumps({name: str(path) for name, path in runs.items()}))
        return {name: Path(path) for name, path in json.loads(made.read_text()).items()}


def test_fsdp_full_fine_tuning_matches_one_process(full_runs):
    fsdp, single = full_runs["fsdp"], full_runs["single"]
    got, want = adapter_tensors(fsdp), adapter_tensors(single)
    assert len(want) == 20  # every weight of the tiny Llama changed (delta.<name>), none missing
    assert min(float(t.abs().max()) for t in want.values()) > 100 * TOLERANCE  # every tensor moved far past it
    worst = assert_same_adapter_within_rounding(got, want)
    print(f"full: worst difference {worst:.2e} of MOVE")
    assert grad_norms(fsdp) == pytest.approx(grad_norms(single), rel=1e-5)  # catches a gradient scaled wrong
    assert len(grad_norms(fsdp)) == STEPS
    # the same artifact: the same files, the config listing the same tensors
    assert sorted(p.name for p in fsdp.iterdir()) == sorted(p.name for p in single.iterdir())
    assert json.loads((fsdp / "adapter_config.json").read_text()) == json.loads((single / "adapter_config.json").read_text())
    assert json.loads((fsdp / "plugtune.json").read_text())["training"]["steps"] == STEPS


def test_ddp_matches_one_process_with_the_same_global_batch(full_runs):
    """``--nproc 2`` under ``ddp``: each process takes half of every global batch and DDP
    averages the gradients, the loss normalised by the global label-token count, so the
    update is the single-process one, within float summation order (the bound above). Only
    the main process logs, evaluates and saves."""
    ddp, single = full_runs["ddp"], full_runs["single"]
    assert_same_adapter_within_rounding(adapter_tensors(ddp), adapter_tensors(single))
    assert grad_norms(ddp) == pytest.approx(grad_norms(single), rel=1e-5)
    records = train_records(ddp)
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, STEPS + 1))
    assert sum(1 for r in records if r["event"] == "eval") == 1
    assert (ddp.parent / "stdout.txt").read_text().count("adapter saved to") == 1
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())


def test_fsdp_lora_matches_one_process(tmp_path, tiny_llama, tiny_data, gate_path):
    fsdp = two_processes(write_recipe(tmp_path / "fsdp", tiny_llama, tiny_data, "lora"), gate_path)
    single, _ = one_process(write_recipe(tmp_path / "single", tiny_llama, tiny_data, "lora"), gate_path)
    got, want = adapter_tensors(fsdp), adapter_tensors(single)
    names = sorted(want)
    assert len(names) == 28 and sum("lora_B" in n for n in names) == 14  # A and B of 7 linear layers x 2 blocks
    # lora_B starts at zero, so its values are what training moved: far past the tolerance
    assert min(float(want[n].abs().max()) for n in names if "lora_B" in n) > 100 * TOLERANCE
    worst = assert_same_adapter_within_rounding(got, want)
    print(f"lora: worst difference {worst:.2e} of MOVE")
    assert grad_norms(fsdp) == pytest.approx(grad_norms(single), rel=1e-5)
    assert memory_record(fsdp)["sharded"] is True


def test_fsdp_processes_hold_half_the_training_state_of_ddp(full_runs):
    """Counted, not sampled: the bytes of the parameters, gradients and optimizer state each
    process holds after its first step (for a DTensor its local shard; sharding.py). A tiny
    model's RSS is the interpreter's and the libraries', so RSS would not show the shards."""
    fsdp, ddp = memory_record(full_runs["fsdp"]), memory_record(full_runs["ddp"])
    assert (fsdp["sharded"], ddp["sharded"]) == (True, False)
    assert ddp["state_bytes"][0] == ddp["state_bytes"][1]  # ddp: every process holds everything
    whole = ddp["state_bytes"][0]
    params = ddp["parameters_bytes"][0]
    assert ddp["gradients_bytes"][0] == params and ddp["optimizer_bytes"][0] == 2 * params  # AdamW: two moments
    for rank_bytes in fsdp["state_bytes"]:
        assert rank_bytes < 0.55 * whole, (fsdp, ddp)  # half, plus the padding of odd first dimensions
    assert whole <= sum(fsdp["state_bytes"]) <= 1.02 * whole  # the shards add up to the whole: nothing left out
    print(f"per process: ddp {whole} bytes, fsdp {fsdp['state_bytes']}")


def test_fsdp_sigkilled_run_resumes_to_the_uninterrupted_adapter(tmp_path, full_runs, gate_path):
    """Killed at step 5 (past the checkpoint of step 4), resumed: the checkpoint's weights
    and AdamW moments were gathered whole and are sharded again on resume, the RNGs are each
    process's own, so the adapter is bit-identical to the uninterrupted sharded run's."""
    run = tmp_path / "run"
    run.mkdir()
    recipe = run / "recipe.yaml"
    raw = yaml.safe_load(full_runs["recipe"].read_text())
    raw["output"] = {"dir": str(run / "adapter")}
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    sigkill_two_process_run(recipe, gate_path, run, gate_step=5, checkpoint="step-4")

    code, _, err = finish(start(recipe, gate_path, "--nproc", "2", "--resume"))
    assert code == 0, err[-3000:]
    assert f"resuming from {run / 'adapter' / 'checkpoints' / 'step-4'} (step 4 of {STEPS})" in err
    got, want = adapter_tensors(run / "adapter"), adapter_tensors(full_runs["fsdp"])
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert train_records(run / "adapter") == train_records(full_runs["fsdp"])


@pytest.mark.parametrize(("change", "expected"), [
    ({"method": {"name": "int8"}},
     "training.distributed: fsdp cannot shard the quantized base that int8 loads; use training.distributed: ddp, "
     "or a method on an unquantized base"),
    ({"regularizers": [{"name": "grad_clip", "options": {"max_norm": 1.0}}]},
     "regularizers[0]: grad_clip's after_backward reads parameters or gradients, which under training.distributed: "
     "fsdp are per-process shards; drop it or use training.distributed: ddp"),
])
def test_fsdp_refuses_what_it_cannot_shard_at_validation(tmp_path, tiny_data, change, expected):
    """Refused by ``load_recipe`` (``plugtune run`` validates before launching any process):
    the base model named does not even exist, so no weight can have been read."""
    raw = recipe_dict(tmp_path / "no-such-model", tiny_data, **change)
    raw["training"]["distributed"] = "fsdp"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert expected in caught.value.problems
    raw["training"]["distributed"] = "ddp"  # the same recipe under ddp: not this refusal
    path.write_text(yaml.safe_dump(raw))
    try:
        load_recipe(path)
    except RecipeError as exc:
        assert expected not in exc.problems


def test_distributed_is_validated_with_its_field_path(tmp_path, tiny_llama, tiny_data):
    raw = recipe_dict(tiny_llama, tiny_data)
    raw["training"]["distributed"] = "fsdp2"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert any(p.startswith("training.distributed:") for p in caught.value.problems), caught.value.problems
