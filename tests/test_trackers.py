"""Experiment trackers (``tracking:``): a tiny model trains with TensorBoard, MLflow and W&B
attached, and each store is read back with its library's own reader; failed, interrupted
and resumed runs close or continue the tracker runs; validation reports unknown names,
bad options and missing libraries with the rest; a third-party tracker passes the kit."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml

import plugtune
from plugtune.kernel.errors import PluginError, RecipeError
from plugtune.kernel.hookspecs import hookimpl
from plugtune.sdk import ComponentOptions, FiniteScalars, flatten_params
from plugtune.testing import check_tracker, plugin_system_with, recipe_dict


def _recipe(tmp_path: Path, tiny_llama: Path, tiny_data: Path, tracking: list[Any], **training: Any) -> Path:
    raw = recipe_dict(tiny_llama, tiny_data, evaluators=["loss"], tracking=tracking,
                      description="d" * 7000,  # past MLflow's param value limit: cut, never refused
                      output={"dir": str(tmp_path / "out")})
    raw["training"].update({"max_steps": 4, "eval_every": 2, **training})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _mlflow_client(out: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlruns' / 'mlflow.db'}")


def _mlflow_run(out: Path, experiment: str = "tiny") -> Any:
    client = _mlflow_client(out)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _wandb_records(out: Path) -> list[Any]:
    """Every record of the offline run's ``.wandb`` file, parsed with W&B's own protobuf
    schema. wandb 0.31 ships no Python reader for this file (its old ``datastore`` module is
    gone; ``wandb beta leet`` is a terminal UI), so the framing, LevelDB's log format
    (7-byte header, 32 KiB blocks, records of 7-byte headers with full/first/middle/last
    types), is read here in a few lines."""
    from wandb.proto import wandb_internal_pb2

    [path] = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_history(records: list[Any]) -> list[dict[str, Any]]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def _wandb_summary(records: list[Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.summary.update})
    return summary


def _wandb_exit_code(records: list[Any]) -> int:
    [code] = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    return code


def _same_curve(points: list[tuple[int, float]], expected: dict[int, float]) -> None:
    """The points are the logged losses, step by step (values as float32, as TensorBoard keeps them)."""
    assert [step for step, _ in points] == sorted(expected)
    assert [value for _, value in points] == pytest.approx([expected[s] for s in sorted(expected)], rel=1e-6)


# -- the three stores hold the run ----------------------------------------------------------


def test_a_run_is_held_by_tensorboard_mlflow_and_wandb(tmp_path, tiny_llama, tiny_data, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    result = plugtune.run(_recipe(tmp_path, tiny_llama, tiny_data, ["tensorboard", "mlflow", "wandb"]), show_progress=False)
    out = tmp_path / "out"
    adapter = str(result.adapter_dir.resolve())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if r["event"] == "train"}
    assert sorted(losses) == [1, 2, 3, 4]

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    _same_curve([(e.step, e.value) for e in events.Scalars("train/loss")], losses)
    assert [e.step for e in events.Scalars("eval/test/loss")] == [0, 2, 4]
    texts = {tag: [e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)] for tag in events.Tags()["tensors"]}
    assert texts["adapter_dir/text_summary"] == [adapter]
    assert "name: tiny" in texts["recipe/text_summary"][0]

    client, run = _mlflow_run(out)
    assert run.info.status == "FINISHED"
    assert run.data.params["training.max_steps"] == "4" and run.data.params["method.name"] == "lora"
    assert run.data.params["method.options.target_modules"] == "all-linear"
    assert run.data.params["description"].endswith("...[truncated]") and len(run.data.params["description"]) == 6000
    history = client.get_metric_history(run.info.run_id, "loss")
    _same_curve(sorted((m.step, m.value) for m in history), losses)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval.test.loss")) == [0, 2, 4]
    assert run.data.tags["plugtune.adapter_dir"] == adapter
    stored = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter_model.safetensors", "adapter_config.json", "plugtune.json"} <= stored
    assert not stored & {"metrics.jsonl", "mlruns", "tensorboard", "wandb"}  # the adapter's files, not the run folder

    records = _wandb_records(out)
    history = _wandb_history(records)
    _same_curve([(h["_step"], h["loss"]) for h in history if "loss" in h], losses)
    assert sorted(h["_step"] for h in history if "eval/test/loss" in h) == [0, 2, 4]
    summary = _wandb_summary(records)
    assert summary["adapter_dir"] == adapter and summary["final/loss"] == pytest.approx(result.after["loss"])
    [config] = [r.run.config for r in records if r.WhichOneof("record_type") == "run"]
    assert json.loads({i.key: i.value_json for i in config.update}["training"])["max_steps"] == 4
    assert _wandb_exit_code(records) == 0


# -- failed, interrupted, resumed -------------------------------------------------------------


class _FailAt:
    """A lifecycle plugin that fails the run after step ``step`` with ``error``."""

    def __init__(self, step: int, error: BaseException) -> None:
        self.step, self.error = step, error

    @hookimpl
    def on_step_end(self, step: int) -> None:
        if step == self.step:
            raise self.error


def test_a_failed_run_closes_its_tracker_runs_as_failed(tmp_path, tiny_llama, tiny_data, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    recipe = _recipe(tmp_path, tiny_llama, tiny_data, ["mlflow", "wandb"], max_steps=3)
    with plugin_system_with([("fails", _FailAt(2, RuntimeError("disk on fire")))]) as system:
        with pytest.raises(PluginError, match="disk on fire"):
            plugtune.run(recipe, plugins=system, show_progress=False)
        assert not [name for name, _ in system.pm.list_name_plugin() if name.startswith("tracking[")]
    _, run = _mlflow_run(tmp_path / "out")
    assert run.info.status == "FAILED" and "disk on fire" in run.data.tags["plugtune.error"]
    assert _wandb_exit_code(_wandb_records(tmp_path / "out")) == 1


def test_an_interrupted_run_is_killed_and_resume_continues_the_same_tracker_run(tmp_path, tiny_llama, tiny_data, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = _recipe(tmp_path, tiny_llama, tiny_data, ["mlflow", "tensorboard"], checkpoint_every=2)
    with plugin_system_with([("stops", _FailAt(3, KeyboardInterrupt()))]) as system:
        with pytest.raises(KeyboardInterrupt):
            plugtune.run(recipe, plugins=system, show_progress=False)
    out = tmp_path / "out"
    client, first = _mlflow_run(out)
    assert first.info.status == "KILLED"

    plugtune.run(recipe, show_progress=False, resume=True)  # from the checkpoint of step 2
    client, run = _mlflow_run(out)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4] and steps.count(3) == 2  # step 3 again after the checkpoint of step 2
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]  # purge_step hid the interrupted step 3


# -- validation ---------------------------------------------------------------------------------


class _Ghost:
    """A tracker whose library is not installed."""

    requires = ("plugtune_no_such_tracking_library",)
    install = "pip install 'ghost-tracker[all]'"

    class Options(ComponentOptions):
        pass

    def __init__(self, options: Any) -> None:
        self.options = options


class _RegistersGhost:
    @hookimpl
    def register_trackers(self, register: Any) -> None:
        register("ghost", _Ghost)


def test_validation_reports_tracker_mistakes_with_the_rest(tmp_path, tiny_llama, tiny_data, capsys):
    from plugtune.cli import main

    raw = recipe_dict(tiny_llama, tiny_data, tracking=["tensorbord", "ghost", {"name": "mlflow", "options": {"log_artifact": False}}])
    raw["training"]["batch_size"] = 0
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    with plugin_system_with([("ghosts", _RegistersGhost())]) as system:
        with pytest.raises(RecipeError) as caught:
            plugtune.load_recipe(path, plugins=system)
        problems = caught.value.problems
        assert any(p.startswith("tracking[0].name: unknown tracker 'tensorbord'; did you mean 'tensorboard'?") for p in problems)
        assert "tracking[1]: ghost needs the 'plugtune_no_such_tracking_library' package: pip install 'ghost-tracker[all]'" in problems
        assert any(p.startswith("tracking[2].options.log_artifact:") for p in problems)
        assert any(p.startswith("training.batch_size:") for p in problems)
        assert main(["validate", str(path)]) != 0
    err = capsys.readouterr().err
    assert "tracking[1]: ghost needs" in err and "Traceback" not in err


def test_a_tracker_library_that_is_missing_names_its_extra(monkeypatch, tmp_path, tiny_llama, tiny_data):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_llama, tiny_data, tracking=["mlflow"])))
    with pytest.raises(RecipeError) as caught:
        plugtune.load_recipe(path)
    assert caught.value.problems == ["tracking[0]: mlflow needs the 'mlflow' package: pip install 'plugtune[mlflow]'"]


def test_tracking_changes_do_not_block_a_resume():
    from plugtune.training.checkpoints import recipe_differences

    assert recipe_differences({"tracking": ["mlflow"]}, {"tracking": ["mlflow", "tensorboard"]}) == []


# -- a third-party tracker and the helpers --------------------------------------------------------


class _Notebook:
    """A third-party tracker keeping what it was sent in memory, finite numbers only."""

    requires: tuple[str, ...] = ()
    install = "pip install notebook-tracker"
    sent: list[tuple[str, int, dict[str, float]]] = []

    class Options(ComponentOptions):
        prefix: str = "nb"

    def __init__(self, options: Any) -> None:
        self.prefix = options.prefix
        self.scalars = FiniteScalars("notebook")

    @hookimpl
    def on_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        _Notebook.sent.append((f"{self.prefix}/train", step, self.scalars(metrics, step)))

    @hookimpl
    def on_evaluate(self, split: str, step: int, metrics: dict[str, Any]) -> None:
        _Notebook.sent.append((f"{self.prefix}/{split}", step, self.scalars(metrics, step)))

    @hookimpl
    def on_train_end(self, run: Any, adapter_dir: str) -> None:
        _Notebook.sent.append((f"{self.prefix}/end", run.step, {}))

    @hookimpl
    def on_train_failed(self, error: BaseException) -> None:
        _Notebook.sent.append((f"{self.prefix}/failed", -1, {}))


def test_a_third_party_tracker_passes_the_conformance_kit(tmp_path):
    _Notebook.sent.clear()
    calls = check_tracker(_Notebook, {"prefix": "x"}, tmp_path=tmp_path)
    assert [c["step"] for c in calls["on_step_end"]] == [1, 2, 3]
    assert [tag for tag, _, _ in _Notebook.sent] == ["x/test", "x/train", "x/train", "x/test", "x/train", "x/test", "x/end"]
    train = [numbers for tag, _, numbers in _Notebook.sent if tag == "x/train"]
    assert all(math.isfinite(v) for numbers in train for v in numbers.values()) and all("loss" in n for n in train)
    assert all("event" not in n for n in train)  # strings never reach a tracker


def test_finite_scalars_skip_nan_with_one_warning(capsys):
    scalars = FiniteScalars("t")
    record = {"event": "train", "loss": float("nan"), "lr": 0.1, "steps": 3, "flag": True, "grad": float("inf")}
    assert scalars(record, 1) == {"lr": 0.1, "steps": 3.0}
    assert scalars(record, 2) == {"lr": 0.1, "steps": 3.0}
    err = capsys.readouterr().err
    assert err.count("'loss' is nan at step 1") == 1 and err.count("'grad' is inf") == 1 and "step 2" not in err


def test_flatten_params_gives_dotted_field_paths():
    assert flatten_params({"a": {"b": 1, "c": [2, {"d": None}]}, "e": [], "f": "x"}) == \
        {"a.b": 1, "a.c.0": 2, "a.c.1.d": None, "e": "[]", "f": "x"}


def test_mlflow_adapter_files_stay_inside_the_adapter(tmp_path):
    from plugtune.plugins.trackers.mlflow import adapter_files

    (tmp_path / "outside.txt").write_text("secret")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "weights.bin").write_bytes(b"0")
    (adapter / "link.txt").symlink_to(tmp_path / "outside.txt")
    files = {"weights.bin": {}, "../outside.txt": {}, "link.txt": {}, "missing.bin": {}}
    (adapter / "plugtune.json").write_text(json.dumps({"files": files}))
    assert sorted(p.name for p in adapter_files(adapter)) == ["plugtune.json", "weights.bin"]
    (adapter / "plugtune.json").write_text("{truncated")
    assert [p.name for p in adapter_files(adapter)] == ["plugtune.json"]


class _Broken(_Notebook):
    """A tracker that cannot even close: its failure must not hide the run's own error."""

    @hookimpl
    def on_train_failed(self, error: BaseException) -> None:
        raise OSError("tracker server gone")


class _RegistersNotebooks:
    @hookimpl
    def register_trackers(self, register: Any) -> None:
        register("notebook", _Notebook)
        register("broken", _Broken)


def _attached(system: Any) -> list[str]:
    return [name for name, _ in system.pm.list_name_plugin() if name.startswith("tracking[")]


def test_trackers_attach_on_the_main_process_only_and_always_detach(capsys):
    from types import SimpleNamespace

    from plugtune.training.recipe import Bound
    from plugtune.training.signals import Interrupted
    from plugtune.training.tracking import tracked

    with plugin_system_with([("notebooks", _RegistersNotebooks())]) as system:
        trackers = [Bound(n, system.get("tracker", n), system.get("tracker", n).obj.Options()) for n in ("notebook", "broken")]
        recipe, state = SimpleNamespace(trackers=trackers), SimpleNamespace(step=3)
        with tracked(recipe, system, state, main=False) as attached:
            assert attached == [] and _attached(system) == []  # another process of a data-parallel run
        _Notebook.sent.clear()
        with pytest.raises(Interrupted, match="stopped"):
            with tracked(recipe, system, state, main=True) as attached:
                assert _attached(system) == ["tracking[0]:notebook", "tracking[1]:broken"]
                assert system.plugins["tracking[0]:notebook"].distribution == "(registered in code)"
                raise Interrupted("stopped at step 3")
        assert _attached(system) == [] and not [n for n in system.plugins if n.startswith("tracking[")]
        assert [tag for tag, _, _ in _Notebook.sent] == ["nb/failed"]  # called after the broken one (last in, first out) raised
        assert "warning: plugin 'tracking[1]:broken'" in capsys.readouterr().err
