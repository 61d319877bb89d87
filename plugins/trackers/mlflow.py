"""The ``mlflow`` tracker: one MLflow run per training run (extra ``plugtune[mlflow]``,
which installs ``mlflow-skinny`` with SQLAlchemy: the tracking client and a local store,
without the server UI's dependencies).

Where: ``tracking_uri`` (option) wins, else ``$MLFLOW_TRACKING_URI``, else a local store in
the run folder: ``sqlite:///<output dir>/mlruns/mlflow.db`` with artifacts under
``<output dir>/mlruns/artifacts``. A SQLite file rather than MLflow's ``./mlruns`` folder
store because MLflow 3 put that store in maintenance mode and refuses it unless
``MLFLOW_ALLOW_FILE_STORE=true`` (a ``file:`` URI still works with that variable set).
Browse it with the full ``mlflow`` package's ``mlflow ui --backend-store-uri
sqlite:///<output dir>/mlruns/mlflow.db`` (the skinny one has no server), or read it with
``MlflowClient(tracking_uri=...)``.

What: the experiment is ``experiment`` (default: the recipe's name); params are the recipe
flattened to dotted keys (``training.batch_size``), values cut to MLflow's length limit with
a ``...[truncated]`` marker, never refused; every logged step's numbers as metrics with
their step (written every ``flush_secs``, default 5, several steps per batch); evaluations as
``eval.<split>.<metric>`` with their step; at the end the adapter's files as artifacts under
``adapter/`` (:func:`adapter_files`; ``log_artifacts: false`` to skip) and its path as the
tag ``plugtune.adapter_dir``. The run ends FINISHED, FAILED (a failed run) or KILLED
(Ctrl-C, SIGTERM).

``--resume``: the run id is kept in ``<output dir>/mlflow-run.json`` (one per tracking URI);
a resumed training run reopens that MLflow run (status back to RUNNING) and goes on logging
into it; the steps between the checkpoint and the interruption get a second point each
(MLflow keeps every point of a metric's history).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from plugtune.plugins.trackers.run_record import read_run_record, write_run_record
from plugtune.sdk import ComponentOptions, FiniteScalars, flatten_params, hookimpl

RECORD = "mlflow-run.json"
TRUNCATED = "...[truncated]"


class MlflowTracker:
    """One run's MLflow client and run id (see the module doc)."""

    requires = ("mlflow", "sqlalchemy", "alembic")
    install = "pip install 'plugtune[mlflow]'"

    class Options(ComponentOptions):
        tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite in <output dir>/mlruns
        experiment: str | None = None  # default: the recipe's name
        run_name: str | None = None  # default: MLflow's generated name
        log_artifacts: bool = True  # copy the saved adapter's files into the run's artifacts
        flush_secs: float = Field(5.0, ge=0, le=3600, description="write the steps' metrics at most this often (0: every step)")
        tags: dict[str, str] = {}

    def __init__(self, options: Options) -> None:
        self.options = options
        self.scalars = FiniteScalars("mlflow")
        self.client: Any = None
        self.run_id: str | None = None
        self.buffered: list[Any] = []  # the steps' metrics not yet written
        self.written = 0.0  # when they last were (time.monotonic)

    # -- the lifecycle ------------------------------------------------------------------------

    @hookimpl
    def on_train_start(self, run: Any) -> None:
        from mlflow import MlflowClient

        out = Path(run.output_dir).resolve()
        uri = self.options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        artifacts = None
        if uri is None:  # the default store lives in the run folder
            (out / "mlruns").mkdir(parents=True, exist_ok=True)
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
            uri, artifacts = f"sqlite:///{out / 'mlruns' / 'mlflow.db'}", (out / "mlruns" / "artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        # one run id per store: two mlflow entries of one recipe keep theirs apart
        runs = read_run_record(out / RECORD).get("runs", {}) if (out / RECORD).exists() else {}
        runs = runs if isinstance(runs, dict) else {}
        if run.resumed and isinstance(runs.get(uri), str) and self._reopen(runs[uri]):
            return
        experiment = self.options.experiment or run.recipe.name
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment, artifact_location=artifacts)
        tags = {"plugtune.recipe": run.recipe.name, "plugtune.base_model": str(run.recipe.spec.base_model), **self.options.tags}
        self.run_id = self.client.create_run(experiment_id, run_name=self.options.run_name, tags=tags).info.run_id
        write_run_record(out / RECORD, {"runs": {**runs, uri: self.run_id}})
        self._log_params(flatten_params(run.recipe.raw))

    @hookimpl
    def on_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        self._buffer({k: v for k, v in self.scalars(metrics, step).items() if k != "step"}, step)
        if time.monotonic() - self.written >= self.options.flush_secs or len(self.buffered) > 900:
            self._flush()

    @hookimpl
    def on_evaluate(self, split: str, step: int, metrics: dict[str, Any]) -> None:
        self._buffer({f"eval.{split}.{k}": v for k, v in self.scalars(metrics, step).items()}, step)
        self._flush()

    @hookimpl
    def on_train_end(self, adapter_dir: str) -> None:
        path = Path(adapter_dir).resolve()
        self.client.set_tag(self.run_id, "plugtune.adapter_dir", str(path))
        if self.options.log_artifacts:
            for file in adapter_files(path):
                self.client.log_artifact(self.run_id, str(file), "adapter")
        self._end("FINISHED")

    @hookimpl
    def on_train_failed(self, error: BaseException, interrupted: bool) -> None:
        if self.run_id is None:
            return  # never started, or already ended
        self.client.set_tag(self.run_id, "plugtune.error", _cut(f"{type(error).__name__}: {error}", 5000))
        self._end("KILLED" if interrupted else "FAILED")

    # -- MLflow calls ---------------------------------------------------------------------------

    def _reopen(self, run_id: str) -> bool:
        """Continue the MLflow run ``run_id`` (a resumed training run); False when the store
        no longer has it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException:
            return False
        self.run_id = run_id
        return True

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        limit = _limit("MAX_PARAM_VAL_LENGTH", 500)
        items = [Param(_key(k), _cut("" if v is None else str(v), limit)) for k, v in params.items()]
        unique = list({p.key: p for p in items}.values())  # two keys may sanitize alike: the last wins
        for start in range(0, len(unique), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=unique[start:start + 100])

    def _buffer(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffered += [Metric(_key(k), v, now, step) for k, v in metrics.items()]

    def _flush(self) -> None:
        """Write the buffered metrics, several steps in one batch: one write per step cost
        about 22 ms on the SQLite store here (``bench/tracker_overhead.py``; 1.4 ms batched),
        a large share of a short GPU step. Called every ``flush_secs``, at each evaluation and
        at the end."""
        pending, self.buffered = self.buffered, []
        for start in range(0, len(pending), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=pending[start:start + 1000])
        self.written = time.monotonic()

    def _end(self, status: str) -> None:
        try:
            self._flush()
        finally:
            self.client.set_terminated(self.run_id, status=status)
            self.run_id = None


def adapter_files(folder: Path) -> list[Path]:
    """The saved adapter's own files: those its manifest (``plugtune.json``) lists, the
    manifest itself and a model card (``README.md``) when there is one. Not the whole folder:
    it is also the run folder, holding the log, checkpoints and this store's own files. Only
    plain names of regular files inside ``folder`` (no ``..``, no symlink out of it)."""
    names = ["plugtune.json", "README.md"]
    try:
        listed = json.loads((folder / "plugtune.json").read_text(encoding="utf-8")).get("files", {})
        names += [n for n in listed if isinstance(n, str)] if isinstance(listed, dict) else []
    except (OSError, ValueError, AttributeError):
        pass
    root = folder.resolve()
    files = []
    for name in dict.fromkeys(names):
        file = folder / name
        if "/" not in name and "\\" not in name and name not in {".", ".."} and file.is_file() and file.resolve().parent == root:
            files.append(file)
    return files


def _limit(name: str, default: int) -> int:
    """One of MLflow's own validation limits (they change between releases: 500 characters
    per param value in 2.x, 6000 in 3.x)."""
    try:
        from mlflow.utils import validation

        return int(getattr(validation, name, default))
    except ImportError:
        return default


def _cut(value: str, limit: int) -> str:
    """``value`` within ``limit`` characters, marked when cut."""
    return value if len(value) <= limit else value[: limit - len(TRUNCATED)] + TRUNCATED


def _key(name: str) -> str:
    """A param or metric name MLflow accepts: letters, digits and ``_-./ `` (others become
    ``_``), within its key length."""
    return re.sub(r"[^\w\-./ ]", "_", name)[: _limit("MAX_ENTITY_KEY_LENGTH", 250)] or "_"


@hookimpl
def register_trackers(register: Any) -> None:
    register("mlflow", MlflowTracker)
