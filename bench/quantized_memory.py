"""Peak memory of LoRA on an fp32 base against int8 (8-bit base) and qlora (4-bit base), on
SmolLM2-135M on this CPU. Writes the "quantized-memory" section of BENCHMARKS.md.

    python bench/quantized_memory.py [--rounds 2] [--steps 8]

Every run is ``bench/run_one.py`` in a fresh process (peak RSS, ``ru_maxrss``, is per
process) on ``recipes/quickstart.yaml`` with the method swapped by an override, the same
data, steps and LoRA options; the methods alternate (lora, int8, qlora, lora, ...) so a
slower or busier moment of a shared machine does not fall on one method. The base loads
already quantized for int8 and qlora (``base_loading``), so their peak never includes an
fp32 copy of the base.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import OUT, ROOT, run, write_section  # noqa: E402

METHODS = ["lora", "int8", "qlora"]
LABELS = {"lora": "lora (fp32 base)", "int8": "int8 (8-bit base)", "qlora": "qlora (4-bit NF4 base, double quant)"}


def overrides(method: str, steps: int) -> list[str]:
    return [f"method.name={method}", f"name=quantized-{method}", f"training.max_steps={steps}", "training.eval_before=false",
            "training.max_eval_examples=16", "training.device=cpu"]


def held_mb() -> dict[str, float]:
    """MB of parameters and buffers the loaded base holds, per method (loaded one at a time,
    in this process, after the measured runs)."""
    import gc

    import plugtune
    from plugtune.artifacts.models import load_base

    recipe = plugtune.load_recipe(ROOT / "recipes" / "quickstart.yaml")
    held = {}
    for method in METHODS:
        built = plugtune.load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"method.name={method}"]).method.build()
        base = load_base(recipe.spec.base_model, recipe.task, loading=getattr(built, "base_loading", None),
                         loaded=getattr(built, "base_loaded", None))
        tensors = {id(t): t for t in [*base.model.parameters(), *base.model.buffers()]}.values()
        held[method] = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        del base
        gc.collect()
    return held


def section(results: dict[str, list[dict]], steps: int, rounds: int, command: str, held: dict[str, float]) -> str:
    base = statistics.median(r["peak_rss_mb"] for r in results["lora"])
    lines = [
        "## Quantized bases: peak memory on CPU (issue 15)",
        "",
        f"Command: `{command}`. Machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}. SmolLM2-135M, `recipes/quickstart.yaml` with `method.name` swapped (LoRA r 8 on "
        f"q_proj and v_proj, batch 8, max_length 96), {steps} steps, evaluation on 16 rows; {rounds} rounds, the methods "
        "alternating, each run a fresh process; the median of the rounds (all runs listed).",
        "",
        "| method | peak RSS (median) | vs fp32 LoRA | runs (MB) | s/step (median) | held-out loss after | base weights held |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for method in METHODS:
        runs = results[method]
        peak = statistics.median(r["peak_rss_mb"] for r in runs)
        each = ", ".join(f"{r['peak_rss_mb']:,.0f}" for r in runs)
        lines.append(
            f"| {LABELS[method]} | {peak:,.0f} MB | {peak - base:+,.0f} MB | {each} "
            f"| {statistics.median(r['seconds_per_step'] for r in runs):.2f} | {runs[-1]['after'].get('loss', float('nan')):.3f} "
            f"| {held[method]:,.0f} MB |")
    lines += [
        "",
        "Peak RSS (`ru_maxrss`) counts the whole process: Python, torch, the tokenizer, the data, activations, the "
        "optimizer, and the pages of the checkpoint file that are mapped. An fp32 load keeps the base as views of "
        "the checkpoint's memory map (no copy: the 540 MB file is the weights). A quantized load reads every page "
        "of that file to quantize it, so while it loads, the file's pages and the quantized weights are both "
        "resident; afterwards `base_loaded` copies the full-precision tensors (embeddings tied to the head, norms) "
        "out of the map and the map's pages leave the process. So the peak of a short run on a small model falls by "
        "less than the weights do (last column: the parameters and buffers the loaded base holds). bitsandbytes' "
        "CPU kernels dequantize each layer's weight for its matmul: those temporaries are freed, but glibc keeps "
        "freed heap memory for the next step (the default, `training.malloc_mmap_threshold: auto`) unless a byte "
        "count is set there. On a CPU the quantized layers are slower "
        "than fp32 matmuls: the point there is memory. GPU figures (peak GPU memory against bf16 LoRA) come from "
        "`bench/gpu_check.sh`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--write-only", action="store_true", help="rewrite the section from bench/out/quantized_memory.json")
    args = parser.parse_args()
    command = "python bench/quantized_memory.py" + (f" --rounds {args.rounds}" if args.rounds != 2 else "") + (
        f" --steps {args.steps}" if args.steps != 8 else "")
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    if args.write_only:
        results = json.loads((OUT / "quantized_memory.json").read_text())
        args.rounds = len(results["lora"])
        args.steps = results["lora"][0]["steps"]
        command = "python bench/quantized_memory.py" + (f" --rounds {args.rounds}" if args.rounds != 2 else "") + (
            f" --steps {args.steps}" if args.steps != 8 else "")
    for _ in range(0 if args.write_only else args.rounds):
        for method in METHODS:
            results[method].append(run("recipes/quickstart.yaml", overrides(method, args.steps)))
            print(method, f"{results[method][-1]['peak_rss_mb']:.0f} MB", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quantized_memory.json").write_text(json.dumps(results, indent=2))
    text = section(results, args.steps, args.rounds, command, held_mb())
    write_section(text, key="quantized-memory")
    print(text)


if __name__ == "__main__":
    main()
