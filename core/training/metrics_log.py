"""The run's log, ``metrics.jsonl`` beside the adapter: one JSON object a line, appended by
the main process as the run goes (``_Process.log`` in core/training/train.py). Trackers see
the same records through the lifecycle hooks; ``plugtune report`` (core/reporting) reads the
file. Every record has an ``event``; the shapes, in the order a run writes them:

``data`` (once, after encoding; absent in logs of runs before it was added)::

    {"event": "data",
     "splits": {"train": {"rows": 192, "tokens": {"p50": 31.0, "p90": 40.0, "p99": 47.0, "max": 48}},
                "test": {...}},               # encoded rows kept, and their token lengths
     "streamed": true,                        # only when the training split is streamed: "train"
                                              # describes its in-memory sample
     "sources": [{"name", "loader", "weight"?, "rows_read": {split: n}, "rows_kept": {split: n},
                  "truncated": {split: n | null}, "dropped": {split: n | null}}]}

``eval`` (before training, at every ``eval_every`` step, after; ``split`` "test", or "train"
for ``eval_train_examples``)::

    {"event": "eval", "split": "test", "step": 0, "when": "before" | "during" | "after" | "best",
     "<metric>": float, ...,                  # the evaluators' metrics: floats only (NaN when undefined)
     "details": {"<name>": {...}}}            # optional: structured results, see below

``train`` (every ``log_every`` steps and the last)::

    {"event": "train", "step": 1, "loss": float, "lr": float, "grad_norm": float,
     "tokens_per_s": float, "tokens": int, "step_seconds": float, "step_cpu_seconds": float,
     "<regularizer>/<term>": float, "<task term>": float, ...}

``grad_norm`` is the total L2 norm of the gradients before clipping (absent in older logs).

``plan`` (``training.budget``: each time the number of steps is chosen or revised,
core/training/budget.py)::

    {"event": "plan", "step": 4, "budget": "10m", "total_steps": 1150, "reason": str,
     "seconds_per_token": float | None, "tokens_per_step": float | None}

``memory`` (a run of several processes, once, after step 1: the training state each process
holds, in rank order, core/training/sharding.py ``resident_state_bytes``; and each process's
peak RSS so far, loading included)::

    {"event": "memory", "step": 1, "distributed": "ddp" | "fsdp", "sharded": bool,
     "state_bytes": [int, ...], "parameters_bytes": [int, ...], "gradients_bytes": [int, ...],
     "optimizer_bytes": [int, ...], "peak_rss_bytes": [int, ...]}

``best`` (when a regularizer kept earlier weights than the last)::

    {"event": "best", "step": 12, "<metric>": float, ...}

An evaluator's ``details()`` (optional, see :class:`~plugtune.kernel.components.Evaluator`)
returns structured results that are no single number, kept out of the float metrics so that
trackers, early stopping and the before/after table never see them. One shape is defined:
a matrix, drawn as a heatmap by the report::

    {"kind": "matrix", "rows": ["billing", ...], "columns": ["billing", ..., "<other>"],
     "values": [[12, 0, ...], ...], "row_title": "true", "column_title": "predicted",
     "metrics_prefix": "confusion/"}          # the flat metrics it also reports, if any

A resumed run cuts the log back to its checkpoint's length and appends from there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


def length_summary(lengths: list[int]) -> dict[str, float | int]:
    """``{"p50", "p90", "p99", "max"}`` of token lengths (empty for no rows)."""
    if not lengths:
        return {}
    values = np.percentile(np.asarray(lengths), PERCENTILES)
    return {**{f"p{p}": float(v) for p, v in zip(PERCENTILES, values)}, "max": int(max(lengths))}


def data_record(splits: dict[str, list[dict[str, Any]]], sources: list[dict[str, Any]] | None,
                streamed: bool = False) -> dict[str, Any]:
    """The ``data`` record of encoded ``splits`` (rows with ``input_ids``) and the sources'
    counts (``MixedData.records()``)."""
    record: dict[str, Any] = {"event": "data", "splits": {
        split: {"rows": len(rows), "tokens": length_summary([len(r["input_ids"]) for r in rows])}
        for split, rows in splits.items()}}
    if streamed:
        record["streamed"] = True
    if sources:
        record["sources"] = sources
    return record
