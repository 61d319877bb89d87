"""What each built-in tracker costs per logged step, apart from training: the tracker alone,
fed a typical step record (8 numbers) the way ``plugtune run`` calls it, on a throwaway run
folder. Prints one line per tracker (start seconds, ms per step over the last half of the
steps, end seconds); BENCHMARKS.md ("Trackers") quotes it.

    python bench/tracker_overhead.py [--steps 600] [tensorboard mlflow mlflow:flush_secs=0 wandb]

``name:key=value`` sets one of the tracker's options (a number or a string).

W&B runs offline (``WANDB_MODE=offline`` unless set), MLflow on its default SQLite store in
the run folder. Trackers whose library is missing are skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from plugtune.kernel.components import missing_requirement
from plugtune.kernel.registry import get_plugin_system

RECIPE = {"name": "bench", "base_model": "none", "method": {"name": "lora", "options": {"r": 8}},
          "training": {"max_steps": 600, "batch_size": 8, "learning_rate": 2e-4}}
RECORD = {"event": "train", "loss": 1.0, "lr": 2e-4, "tokens_per_s": 1000.0, "tokens": 512, "step_seconds": 0.5,
          "step_cpu_seconds": 0.9, "weight_decay/norm": 3.0}


def _call(hook, **kwargs):
    """A hook with the arguments it names (as pluggy does)."""
    names = hook.__code__.co_varnames[:hook.__code__.co_argcount]
    return hook(**{k: v for k, v in kwargs.items() if k in names})


def measure(spec: str, steps: int, folder: Path) -> str:
    name, _, option = spec.partition(":")
    cls = get_plugin_system().get("tracker", name).obj
    missing = missing_requirement(cls)
    if missing:
        return f"{name}: skipped ({missing})"
    out = Path(tempfile.mkdtemp(dir=folder))
    (out / "plugtune.json").write_text(json.dumps({"files": {}}))
    run = SimpleNamespace(recipe=SimpleNamespace(raw=RECIPE, name="bench", spec=SimpleNamespace(base_model="none")),
                          output_dir=out, resumed=False, step=0)
    key, _, value = option.partition("=")
    tracker = cls(cls.Options(**({key: float(value) if value.replace(".", "", 1).isdigit() else value} if key else {})))
    started = time.perf_counter()
    _call(tracker.on_train_start, run=run)
    start = time.perf_counter() - started
    for step in range(1, steps + 1):
        if step == steps // 2 + 1:
            timed = time.perf_counter()
        run.step = step
        _call(tracker.on_step_end, run=run, step=step, metrics={**RECORD, "step": step, "loss": 1.0 / step})
    per_step = (time.perf_counter() - timed) / (steps - steps // 2) * 1000
    ended = time.perf_counter()
    _call(tracker.on_train_end, run=run, adapter_dir=str(out), metrics={"loss": 0.5})
    end = time.perf_counter() - ended
    return (f"{spec}: start {start:.2f} s, {per_step:.2f} ms per logged step (the last {steps - steps // 2} of {steps}, "
            f"{len(RECORD) - 1} numbers each), end {end:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trackers", nargs="*", default=["tensorboard", "mlflow", "mlflow:flush_secs=0", "wandb"])
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="plugtune-tracker-bench-") as folder:
        for name in args.trackers:
            print(measure(name, args.steps, Path(folder)), flush=True)


if __name__ == "__main__":
    main()
