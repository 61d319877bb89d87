"""Training on a million short rows: the ``hf`` loader with ``streaming: true`` against the
same loader reading the rows into memory, peak RSS of each run.

A generated JSON Lines file of 1,000,000 question/answer rows (~60 bytes each) trains a tiny
random Llama (``plugtune.testing.build_tiny_llama``) with LoRA for ``STEPS`` steps, once
streamed (test split: the first 1,000 rows; shuffle buffer 10,000) and once not (the whole
file loaded, split 99.9/0.1 and tokenized before the first step). Each run is a fresh
subprocess (``--one MODE``) reporting its own peak RSS (``ru_maxrss``) and its RSS after the
imports; everything it writes (the data, the model, the Arrow cache, the adapters) goes
under ``bench/out/streaming/``, which git ignores.

    .venv/bin/python bench/streaming_memory.py            # writes its section of BENCHMARKS.md
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import write_section

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "streaming"
ROWS = 1_000_000
STEPS = 50
ANSWERS = {"sky": "blue", "grass": "green", "sea": "blue", "sun": "yellow"}


def generate(path: Path) -> None:
    rng = random.Random(0)
    things = sorted(ANSWERS)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(ROWS):
            thing = rng.choice(things)
            fh.write(json.dumps({"question": f"what is the colour of the {thing} ?", "answer": ANSWERS[thing]}) + "\n")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


def recipe(mode: str) -> dict:
    options = {"path": str(OUT / "rows.jsonl")}
    options.update({"streaming": True, "test_rows": 1000} if mode.startswith("streaming") else {"test_size": 0.001})
    if mode == "streaming-100k":
        options["select"] = "0:100000"  # the first tenth of the file: does the streamed run's memory follow the size?
    return {
        "name": f"million-{mode}",
        "base_model": str(OUT / "tiny-llama"),
        "task": {"type": "causal-lm", "prompt": "question : {question} answer :", "response": " {answer}"},
        "data": {"loader": "hf", "options": options},
        "method": {"name": "lora", "options": {"r": 4, "alpha": 8, "target_modules": "all-linear"}},
        "evaluators": ["loss"],
        "training": {"max_steps": STEPS, "batch_size": 8, "learning_rate": 2e-2, "seed": 0, "max_length": 48,
                     "device": "cpu", "cache_tokenized": False, "max_eval_examples": 200},
        "output": {"dir": str(OUT / "adapters" / mode), "overwrite": True},
    }


def one(mode: str) -> dict:
    import plugtune
    from plugtune.training.recipe import load_recipe
    import plugtune.plugins.loaders.hf  # noqa: F401 - the imports count in the baseline, not the growth
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    base = current_rss_mb()
    started = time.perf_counter()
    result = plugtune.run(load_recipe(raw=recipe(mode), base_dir=OUT), show_progress=False)
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": rss_mb(), "base_rss_mb": base,
            "loss_before": result.before["loss"], "loss_after": result.after["loss"], "steps": result.steps}


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one(sys.argv[2])))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    data = OUT / "rows.jsonl"
    if not data.exists():
        generate(data)
    if not (OUT / "tiny-llama").exists():
        from plugtune.testing import build_tiny_llama

        build_tiny_llama(OUT / "tiny-llama")
    env = dict(os.environ, PLUGTUNE_HOME=str(OUT / "home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    results = {}
    for mode in ("streaming", "streaming-100k", "in-memory"):
        out = subprocess.run([sys.executable, __file__, "--one", mode], capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(f"{mode} run failed:\n{out.stderr[-3000:]}")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(mode, results[mode], flush=True)
    size_mb = data.stat().st_size / 1e6
    s, small, m = results["streaming"], results["streaming-100k"], results["in-memory"]
    row = lambda name, r: (f"| {name} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['base_rss_mb']:.0f} | {r['seconds']:.0f} | "
                           f"{r['loss_before']:.2f} → {r['loss_after']:.2f} |")
    text = "\n".join([
        "## Training on a million rows: `hf` loader, streamed vs in memory (issue 14)",
        "",
        (f"Command: `.venv/bin/python bench/streaming_memory.py`. A generated JSON Lines file of {ROWS:,} short "
         f"question/answer rows ({size_mb:.0f} MB), {STEPS} LoRA steps (batch 8) on a tiny random Llama "
         "(`plugtune.testing.build_tiny_llama`), each run a fresh `plugtune.run` in its own process; peak RSS "
         "(`ru_maxrss`) and its growth over the process after importing torch, transformers and datasets. "
         "Streamed: `streaming: true`, the first 1,000 rows as the test split, a shuffle buffer of 10,000 rows, "
         "rows tokenized as batches are made. In memory: the same file loaded with `load_dataset` (its Arrow cache "
         "built under `$PLUGTUNE_HOME/datasets` in this run), split 99.9/0.1 and every row tokenized before the "
         "first step (`cache_tokenized: false`). Measured on the shared 2-core CPU machine (other sessions were "
         "running), so seconds are indicative."),
        "",
        "| run | peak RSS (MB) | growth over imports (MB) | seconds (load + train + evaluate) | held-out loss |",
        "| --- | --- | --- | --- | --- |",
        row("`streaming: true`", s),
        row("`streaming: true`, `select: \"0:100000\"` (a tenth of the rows)", small),
        row("in memory (`streaming: false`)", m),
        "",
        (f"The streamed run's memory does not follow the data's size (a tenth of the rows: {small['peak_rss_mb']:.0f} MB "
         f"against {s['peak_rss_mb']:.0f} MB): it holds the shuffle buffer's raw rows, one batch, and the 1,000-row "
         f"sample and test split; the in-memory run holds every row as a Python dict "
         f"and every encoded row ({(m['peak_rss_mb'] - m['base_rss_mb']) / max(s['peak_rss_mb'] - s['base_rss_mb'], 1):.0f}× "
         f"the streamed run's growth here), and it grows with the file."),
    ])
    write_section(text, key="streaming-memory")
    print(text)


if __name__ == "__main__":
    main()
