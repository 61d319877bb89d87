"""What logging ``grad_norm`` every step costs without clipping: ``torch.nn.utils.get_total_norm``
over the trainable gradients, against the step it is part of.

    python bench/grad_norm_cost.py ADAPTER_DIR     # e.g. a quickstart run's output folder

The gradients have the shapes and dtypes of the adapter's trainable tensors (read from the
adapter folder, so exactly what the training loop's norm runs over); the step time is the
median ``step_seconds`` of the run's own ``metrics.jsonl``. The norm runs on the same
threads as training (``torch.get_num_threads()``); the median of 200 timed calls after 20
warm-up calls is reported.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from plugtune.artifacts.adapters import read_adapter


def main(folder: str) -> None:
    adapter = read_adapter(folder)
    grads = [torch.randn_like(t, dtype=torch.float32) for t in adapter.state.values()]
    records = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step_seconds"] for r in records if r.get("event") == "train"]
    for _ in range(20):
        torch.nn.utils.get_total_norm(grads)
    timings = []
    for _ in range(200):
        start = time.perf_counter()
        float(torch.nn.utils.get_total_norm(grads))
        timings.append(time.perf_counter() - start)
    norm, step = statistics.median(timings), statistics.median(steps)
    print(f"{len(grads)} gradient tensors, {sum(g.numel() for g in grads):,} values, {torch.get_num_threads()} threads")
    print(f"get_total_norm: {norm * 1e3:.3f} ms (median of 200); step: {step:.3f} s (median of {len(steps)}); "
          f"{norm / step:.4%} of a step")


if __name__ == "__main__":
    main(sys.argv[1])
