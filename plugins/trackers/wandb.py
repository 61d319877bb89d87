"""The ``wandb`` tracker: a Weights & Biases run (extra ``plugtune[wandb]``).

Offline by default: ``mode`` (option) wins, else ``$WANDB_MODE``, else ``offline``, which
needs no account and no network; upload later with ``wandb sync <dir>/wandb/offline-run-*``.
``project`` defaults to the recipe's name, ``dir`` to the output folder (W&B writes
``<dir>/wandb/``). The run's config is the recipe; every logged step's numbers go to the
history at their step, evaluations as ``eval/<split>/<metric>``; the summary holds the final
evaluation (``final/<metric>``) and the adapter's folder (``adapter_dir``). A failed run
finishes with exit code 1, an interrupted one with 130, so W&B marks it failed or crashed.

``--resume``: the run id is kept in ``<output dir>/wandb-run.json`` and passed again with
``resume="allow"`` online, so W&B continues the same run. W&B does not resume offline runs:
offline, the resumed training run writes a second offline run folder with the same id
(``wandb sync`` uploads both into that run).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from plugtune.plugins.trackers.run_record import read_run_record, write_run_record
from plugtune.sdk import ComponentOptions, FiniteScalars, hookimpl

RECORD = "wandb-run.json"


class WandbTracker:
    """One run's W&B run (see the module doc)."""

    requires = ("wandb",)
    install = "pip install 'plugtune[wandb]'"

    class Options(ComponentOptions):
        project: str | None = None  # default: the recipe's name
        entity: str | None = None
        mode: Literal["offline", "online", "disabled"] | None = None  # default: $WANDB_MODE, else offline
        dir: str | None = None  # default: the output folder
        name: str | None = None
        group: str | None = None
        tags: list[str] = []

    def __init__(self, options: Options) -> None:
        self.options = options
        self.scalars = FiniteScalars("wandb")
        self.run: Any = None

    @hookimpl
    def on_train_start(self, run: Any) -> None:
        import wandb

        out = Path(run.output_dir).resolve()
        mode = self.options.mode or os.environ.get("WANDB_MODE") or "offline"
        record = read_run_record(out / RECORD) if run.resumed else {}
        run_id = record.get("run_id") if isinstance(record.get("run_id"), str) else None
        folder = Path(self.options.dir) if self.options.dir else out
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.options.project or run.recipe.name, entity=self.options.entity, dir=str(folder), mode=mode,
            name=self.options.name, group=self.options.group, tags=self.options.tags or None, config=run.recipe.raw,
            id=run_id, resume="allow" if run_id and mode == "online" else None, reinit="create_new",
            allow_val_change=bool(run_id),  # a resume may change what does not change training (tracking:, output:)
            settings=wandb.Settings(console="off", silent=True),  # the run's own progress bar stays as it is
        )
        write_run_record(out / RECORD, {"run_id": self.run.id, "mode": mode})

    @hookimpl
    def on_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in self.scalars(metrics, step).items() if k != "step"}, step=step)

    @hookimpl
    def on_evaluate(self, split: str, step: int, metrics: dict[str, Any]) -> None:
        self.run.log({f"eval/{split}/{k}": v for k, v in self.scalars(metrics, step).items()}, step=step)

    @hookimpl
    def on_train_end(self, adapter_dir: str, metrics: dict[str, Any]) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in self.scalars(metrics).items()})
        self.run.summary["adapter_dir"] = str(Path(adapter_dir).resolve())
        self._finish(0)

    @hookimpl
    def on_train_failed(self, interrupted: bool) -> None:
        if self.run is not None:
            self._finish(130 if interrupted else 1)

    def _finish(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)
        self.run = None


@hookimpl
def register_trackers(register: Any) -> None:
    register("wandb", WandbTracker)
