"""The four tuning methods side by side on MiniLM-L6 and SST-2, and full fine-tuning's peak
memory on SmolLM2-135M. Writes the "methods" section of BENCHMARKS.md.

    python bench/methods.py          # or: make bench

Same data (a seeded 2,000-row subset of SST-2 train), batch size (32) and steps (63, one
epoch) for every method; each method keeps the learning rate of its recipe. Accuracy is on
the whole SST-2 dev file. Every run is a fresh process, so peak RSS is that run's own.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
COMMON = ["data.options.max_train_rows=2000", "training.epochs=1", "training.batch_size=32", "training.eval_before=false",
          "training.warmup_steps=6"]
MINILM = [("lora", "bench/recipes/sst2-minilm-lora.yaml"), ("full", "bench/recipes/sst2-minilm-full.yaml"),
          ("prefix", "bench/recipes/sst2-minilm-prefix.yaml"), ("int8 (CPU)", "bench/recipes/sst2-minilm-int8.yaml")]
SMOLLM = [("lora", "recipes/quickstart.yaml"), ("full", "recipes/support-smollm2-full.yaml")]
SMOLLM_COMMON = ["training.max_steps=8", "training.eval_before=false", "training.max_eval_examples=16"]


def run(recipe: str, overrides: list[str]) -> dict:
    name = Path(recipe).stem
    cmd = [sys.executable, str(ROOT / "bench" / "run_one.py"), recipe, *overrides, f"output.dir={OUT / name}"]
    print("$", " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{recipe} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def section(minilm: list[tuple[str, dict]], smollm: list[tuple[str, dict]]) -> str:
    lines = [
        "## Tuning methods (issue 3)",
        "",
        "Command: `python bench/methods.py` (part of `make bench`). Machine: "
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__}, fp32.",
        "",
        "MiniLM-L6 on SST-2: 2,000 training rows, batch 32, 63 steps (one epoch), each method at its recipe's learning rate; "
        "accuracy on all 6,735 rows of `../shared/data/sst2/dev.tsv`.",
        "",
        "| method | trainable parameters | adapter file | s/step | peak RSS | dev accuracy | dev F1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in minilm:
        lines.append(
            f"| {label} | {r['trainable_parameters']:,} ({100 * r['trainable_parameters'] / r['total_parameters']:.2f}%) "
            f"| {mb(r['adapter_bytes'])} | {r['seconds_per_step']:.3f} | {r['peak_rss_mb']:.0f} MB "
            f"| {r['after']['accuracy']:.4f} | {r['after']['f1']:.4f} |"
        )
    lines += [
        "",
        "SmolLM2-135M on the quickstart data (8 steps of batch 8): what full fine-tuning costs next to LoRA on this CPU.",
        "",
        "| method | trainable parameters | adapter file | s/step | peak RSS |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, r in smollm:
        lines.append(f"| {label} | {r['trainable_parameters']:,} | {mb(r['adapter_bytes'])} | {r['seconds_per_step']:.2f} | {r['peak_rss_mb']:.0f} MB |")
    lines += ["", "int8 on a CPU runs bitsandbytes' CPU kernels: it saves memory on the base but is not faster than fp32 there; "
              "its GPU figures come from `bench/gpu_check.sh`.", ""]
    return "\n".join(lines)


def write_section(text: str, key: str = "methods") -> None:
    path = ROOT / "BENCHMARKS.md"
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    current = path.read_text() if path.exists() else "# Benchmarks\n\nEvery figure here comes from a command in this repository; each section names its command.\n"
    block = f"{start}\n{text}\n{end}"
    if start in current:
        head, rest = current.split(start, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(current)


def main() -> None:
    minilm = [(label, run(recipe, COMMON)) for label, recipe in MINILM]
    smollm = [(label, run(recipe, SMOLLM_COMMON)) for label, recipe in SMOLLM]
    (OUT / "methods.json").write_text(json.dumps({"minilm": minilm, "smollm": smollm}, indent=2))
    write_section(section(minilm, smollm))
    print(section(minilm, smollm))


if __name__ == "__main__":
    main()
