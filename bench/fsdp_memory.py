"""FSDP against DDP on a real base: SmolLM2-135M fully fine-tuned by 2 CPU processes over gloo,
each process's training state and peak RSS. Writes the "fsdp-memory" section of BENCHMARKS.md.

    python bench/fsdp_memory.py        # about 3 minutes on 2 cores

The recipe is ``recipes/quickstart.yaml`` (the support-ticket data) with ``method: full`` and no regularizers (weight_decay reads whole parameters, refused under fsdp),
``STEPS`` steps of batch 8, no evaluation before training; ``plugtune run --nproc 2`` with
``training.distributed`` ddp, then fsdp, then each again. Read from the ``memory`` record of
metrics.jsonl (after step 1, where AdamW's state exists): the bytes of parameters, gradients
and optimizer state each process holds (for a sharded parameter its local shard), and each
process's peak RSS so far (``ru_maxrss``, loading the base included: every process loads the
whole base before it is sharded).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "fsdp-memory"
STEPS = 3
ROUNDS = int(os.environ.get("FSDP_ROUNDS", "2"))


def run(distributed: str, round_: int) -> dict:
    out = OUT / f"{distributed}-{round_}"
    command = [sys.executable, "-m", "plugtune.cli", "run", str(ROOT / "recipes" / "quickstart.yaml"), "--nproc", "2",
               "--overwrite", "method.name=full", "method.options={}", f"training.max_steps={STEPS}",
               "regularizers=[]", "training.eval_before=false", "training.max_eval_examples=8", f"training.distributed={distributed}",
               f"output.dir={out}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise SystemExit(f"{distributed} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    memory = next(r for r in records if r["event"] == "memory")
    train = [r for r in records if r["event"] == "train"]
    return {**memory, "seconds_per_step": statistics.mean(r["step_seconds"] for r in train[1:] or train)}


def section(runs: dict[str, list[dict]]) -> str:
    def mb(values: list[int]) -> str:
        return " / ".join(f"{v / 2**20:,.0f}" for v in values)

    ddp = statistics.mean(max(r["peak_rss_bytes"]) for r in runs["ddp"])
    lines = ["## FSDP on a real base: SmolLM2-135M full fine-tuning, 2 processes (issue 20)", "",
             f"Command: `python bench/fsdp_memory.py` ({ROUNDS} rounds, ddp and fsdp taking turns; "
             f"`recipes/quickstart.yaml` with `method: full`, {STEPS} steps of batch 8, 2 CPU processes over gloo on "
             "2 cores). Per process (rank 0 / rank 1), from the `memory` record after step 1:", "",
             "| distributed | round | parameters MB | gradients MB | AdamW state MB | training state MB | peak RSS MB | "
             "peak RSS vs ddp | s/step |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, rounds in runs.items():
        for i, r in enumerate(rounds):
            lines.append(f"| {name} | {i + 1} | {mb(r['parameters_bytes'])} | {mb(r['gradients_bytes'])} | "
                         f"{mb(r['optimizer_bytes'])} | {mb(r['state_bytes'])} | {mb(r['peak_rss_bytes'])} | "
                         f"{max(r['peak_rss_bytes']) / ddp:.2f}x | {r['seconds_per_step']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from methods import write_section

    runs: dict[str, list[dict]] = {"ddp": [], "fsdp": []}
    for round_ in range(ROUNDS):
        for name in runs:
            print(f"$ plugtune run --nproc 2 training.distributed={name} (round {round_ + 1})", flush=True)
            runs[name].append(run(name, round_))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fsdp-memory.json").write_text(json.dumps(runs, indent=2))
    text = section(runs)
    write_section(text, key="fsdp-memory")
    print(text)


if __name__ == "__main__":
    main()
