"""Does regularization shrink the train-dev gap? MiniLM-L6 + LoRA on a small SST-2 subset,
trained long enough to overfit, without and with regularizers. Writes the "regularization"
section of BENCHMARKS.md.

    python bench/regularization.py

Both runs: a seeded 2,000-row subset of SST-2 train, 4 epochs of batch 32 (252 steps), an
evaluation on a seeded 2,000-row subset of SST-2 dev every 32 steps, and accuracy on the
2,000 training rows at the end. The plain run is ``bench/recipes/sst2-minilm-lora.yaml`` with
``regularizers=[]`` (its weight decay removed); the regularized run is
``bench/recipes/sst2-minilm-lora-regularized.yaml`` (l2sp + word_dropout + early_stopping). Each
run is a fresh process (``bench/run_one.py``).

``--reuse`` skips a run whose output folder already holds an adapter trained from exactly
the recipe (with overrides) it would run, and reads its results from there: useful when only
one of the two recipes changed.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
ROWS = 2000
COMMON = [f"data.options.max_train_rows={ROWS}", f"data.options.max_test_rows={ROWS}", "training.epochs=4",
          "training.batch_size=32", "training.eval_every=32", "training.eval_before=false",
          f"training.eval_train_examples={ROWS}"]
RUNS = [
    ("no regularizers", "bench/recipes/sst2-minilm-lora.yaml", ["regularizers=[]", "name=sst2-minilm-lora-plain"]),
    ("l2sp + word_dropout + early_stopping", "bench/recipes/sst2-minilm-lora-regularized.yaml", []),
]


def _reusable(recipe: str, overrides: list[str], out: Path) -> dict | None:
    """The manifest of an earlier run of exactly this recipe and these overrides, if any."""
    import plugtune

    try:
        manifest = json.loads((out / "plugtune.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("recipe") == plugtune.load_recipe(ROOT / recipe, overrides).raw else None


def run(recipe: str, overrides: list[str], reuse: bool = False) -> dict:
    name = next((o.split("=", 1)[1] for o in overrides if o.startswith("name=")), Path(recipe).stem)
    out = OUT / name
    overrides = [*COMMON, *overrides, f"output.dir={out}"]
    manifest = _reusable(recipe, overrides, out) if reuse else None
    if manifest is not None:
        print(f"reusing {out}", flush=True)
        result = {"steps": manifest["training"]["steps"], "train_seconds": manifest["training"]["train_seconds"],
                  "after": manifest["metrics"]["after"], "reused": True}
    else:
        cmd = [sys.executable, str(ROOT / "bench" / "run_one.py"), recipe, *overrides]
        print("$", " ".join(cmd[1:]), flush=True)
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise SystemExit(f"{recipe} failed (exit status {done.returncode}):\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        manifest = json.loads((out / "plugtune.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result["train"] = manifest["metrics"]["train"]
    result["best_step"] = manifest["training"]["best_step"]
    result["curve"] = [(r["step"], r["accuracy"]) for r in records if r["event"] == "eval" and r["split"] == "test"]
    return result


def section(results: list[tuple[str, dict]], wall: float, load: float) -> str:
    n_reused = sum(bool(r.get("reused")) for _, r in results)
    reused = f" ({n_reused} of them reused from an earlier invocation with `--reuse`)" if n_reused else ""
    regularized = (ROOT / RUNS[1][1]).read_text()
    block = regularized[regularized.index("regularizers:"):regularized.index("evaluators:")].strip()
    lines = [
        "## Regularization (issue 4)",
        "",
        "Command: `python bench/regularization.py`. Machine: "
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__}, fp32; "
        f"{wall / 60:.1f} min wall time for both runs{reused}, 1-minute load average {load:.1f} at the start.",
        "",
        "MiniLM-L6 + LoRA (r=8 on query/key/value/dense, new classifier head) on a seeded 2,000-row subset of SST-2 "
        "train, 4 epochs of batch 32 (252 steps), learning rate 1e-3, so that it overfits. Dev accuracy is on a "
        "seeded 2,000-row subset of `../shared/data/sst2/dev.tsv` (`data.options.max_test_rows=2000`, to keep the "
        "benchmark under 10 minutes with an evaluation every 32 steps); train accuracy is the saved adapter's on the "
        "2,000 training rows. The plain run is `bench/recipes/sst2-minilm-lora.yaml` with `regularizers=[]` (no weight "
        "decay); MiniLM's own dropout (0.1) and the LoRA dropout (0.1) are part of both runs. The regularized run "
        "is `bench/recipes/sst2-minilm-lora-regularized.yaml`:",
        "",
        "```yaml",
        block,
        "```",
        "",
        "| run | steps | saved step | train accuracy | dev accuracy | train-dev gap | train loss | dev loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in results:
        gap = r["train"]["accuracy"] - r["after"]["accuracy"]
        lines.append(f"| {label} | {r['steps']} | {r['best_step']} | {r['train']['accuracy']:.4f} | {r['after']['accuracy']:.4f} "
                     f"| {gap:+.4f} | {r['train']['loss']:.4f} | {r['after']['loss']:.4f} |")
    lines += ["", "Dev accuracy at each evaluation (step: accuracy):", ""]
    for label, r in results:
        lines.append(f"* {label}: " + ", ".join(f"{s}: {a:.3f}" for s, a in r["curve"]))
    lines += [
        "",
        "\"saved step\": the step whose weights the adapter holds. Early stopping keeps the weights of the lowest dev "
        "loss and stops after 2 evaluations without improvement; \"steps\" < 252 means it stopped. It selects on the "
        "same dev subset the table reports, so the regularized run's dev figures are slightly optimistic (a "
        "best-of-several choice); the plain run reports its last weights.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    reuse = "--reuse" in sys.argv[1:]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    results = [(label, run(recipe, overrides, reuse)) for label, recipe, overrides in RUNS]
    wall = time.perf_counter() - started
    (OUT / "regularization.json").write_text(json.dumps({"wall_seconds": wall, "load": load, "runs": results}, indent=2))
    text = section(results, wall, load)
    write_section(text, key="regularization")
    print(text)


if __name__ == "__main__":
    main()
