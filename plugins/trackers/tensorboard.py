"""The ``tensorboard`` tracker: TensorBoard event files written with
``torch.utils.tensorboard.SummaryWriter`` (extra ``plugtune[tensorboard]``).

Writes, under ``log_dir`` (default ``<output dir>/tensorboard``): every logged step's
numbers as ``train/<name>`` scalars (loss, lr, tokens_per_s, each regularizer's terms), every
evaluation as ``eval/<split>/<metric>`` at its step, the recipe as YAML text and as hparams
(dotted keys), and at the end the adapter's folder as text (or the failure, on a failed run).

``--resume``: the writer reopens the same folder with ``purge_step`` at the first step after
the checkpoint, so TensorBoard hides what the interrupted run logged past its checkpoint and
the curves continue without a doubled stretch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from plugtune.sdk import ComponentOptions, FiniteScalars, flatten_params, hookimpl


class TensorBoardTracker:
    """One run's TensorBoard writer (see the module doc)."""

    requires = ("tensorboard",)
    install = "pip install 'plugtune[tensorboard]'"

    class Options(ComponentOptions):
        log_dir: str | None = None  # default <output dir>/tensorboard; relative to the current folder, as output.dir is
        flush_secs: int = Field(30, gt=0, le=3600, description="how often pending events are written out")

    def __init__(self, options: Options) -> None:
        self.options = options
        self.scalars = FiniteScalars("tensorboard")
        self.writer: Any = None
        self.log_dir: Path | None = None

    @hookimpl
    def on_train_start(self, run: Any) -> None:
        import yaml
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.log_dir = Path(self.options.log_dir) if self.options.log_dir else Path(run.output_dir) / "tensorboard"
        # resumed: events of the interrupted run from the first step this one logs again are hidden
        self.writer = SummaryWriter(str(self.log_dir), flush_secs=self.options.flush_secs,
                                    purge_step=run.step + 1 if run.resumed else None)
        if run.resumed:
            return  # the recipe and hparams were written when the run started
        self.writer.add_text("recipe", "```yaml\n" + yaml.safe_dump(run.recipe.raw, sort_keys=False) + "```", 0)
        # hparams take numbers, strings and booleans only; the rest (None, empty lists) as text
        params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten_params(run.recipe.raw).items()}
        for summary in hparams(params, {}):  # into this run's own file, not add_hparams' timestamped subfolder
            self.writer.file_writer.add_summary(summary)

    @hookimpl
    def on_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        for name, value in self.scalars(metrics, step).items():
            if name != "step":
                self.writer.add_scalar(f"train/{name}", value, step)

    @hookimpl
    def on_evaluate(self, split: str, step: int, metrics: dict[str, Any]) -> None:
        for name, value in self.scalars(metrics, step).items():
            if name != "step":
                self.writer.add_scalar(f"eval/{split}/{name}", value, step)

    @hookimpl
    def on_train_end(self, run: Any, adapter_dir: str) -> None:
        self.writer.add_text("adapter_dir", str(Path(adapter_dir).resolve()), run.step)
        self._close()

    @hookimpl
    def on_train_failed(self, run: Any, error: BaseException, interrupted: bool) -> None:
        if self.writer is None:
            return  # never started (an earlier plugin's on_train_start failed) or already closed
        what = "interrupted" if interrupted else "failed"
        self.writer.add_text("status", f"{what} at step {run.step}: {type(error).__name__}: {error}", run.step)
        self._close()

    def _close(self) -> None:
        self.writer.close()  # flushes the pending events
        self.writer = None


@hookimpl
def register_trackers(register: Any) -> None:
    register("tensorboard", TensorBoardTracker)
