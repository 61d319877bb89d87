"""Run one recipe in this process and print one JSON line: metrics, timings, peak memory.

    python bench/run_one.py RECIPE [key=value ...]

Used by the benchmarks so each measurement gets a fresh process (peak RSS is per process).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import plugtune
from plugtune.artifacts.adapters import WEIGHTS_FILE


def main(argv: list[str]) -> None:
    started = time.perf_counter()
    recipe = plugtune.load_recipe(argv[0], argv[1:])
    result = plugtune.run(recipe, show_progress=False, overwrite=True)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "recipe": argv[0],
        "method": recipe.method.name,
        "base_model": recipe.spec.base_model,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "seconds_per_step": result.train_seconds / max(result.steps, 1),
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters,
        "adapter_bytes": (Path(result.adapter_dir) / WEIGHTS_FILE).stat().st_size,
        "peak_rss_mb": peak_kb / 1024,
        "after": result.after,
        "wall_seconds": time.perf_counter() - started,
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
