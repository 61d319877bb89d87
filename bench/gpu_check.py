"""GPU check: every tuning method trains a few steps on SmolLM2-135M on one CUDA GPU, and
the peak GPU memory of int8 vs bf16 LoRA vs full fine-tuning is recorded.

    bash bench/gpu_check.sh        # exits non-zero on any failure; about 2-3 minutes

For each method: the loss must fall, the adapter must load onto a fresh bf16 base and
generate. Results go to bench/out/gpu_check.json and the "gpu" section of BENCHMARKS.md.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

CASES = [
    ("lora (bf16 base)", "recipes/quickstart.yaml", []),
    ("int8 + LoRA", "recipes/support-smollm2-int8.yaml", []),
    ("int8 + LoRA + 8-bit AdamW", "recipes/support-smollm2-int8.yaml", ["method.options.optimizer_8bit=true"]),
    ("qlora (4-bit NF4 base, bf16 compute)", "recipes/quickstart.yaml", ["method.name=qlora"]),
    ("prefix (bf16 base)", "recipes/support-smollm2-prefix.yaml", []),
    ("full (fp32 master weights, bf16 autocast)", "recipes/support-smollm2-full.yaml", []),
]
COMMON = ["training.max_steps=30", "training.batch_size=16", "training.max_eval_examples=32", "training.device=cuda"]


def main() -> int:
    import plugtune
    from plugtune.serving.host import AdapterHost

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    out = ROOT / "bench" / "out"
    results, failures = [], []
    for label, recipe, extra in CASES:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            name = Path(recipe).stem + ("-qlora" if "method.name=qlora" in extra else "-8bitopt" if extra else "")
            loaded = plugtune.load_recipe(ROOT / recipe, [*COMMON, *extra, f"name={name}", f"output.dir={out / name}"])
            result = plugtune.run(loaded, show_progress=False, overwrite=True)
            peak = torch.cuda.max_memory_allocated()
            ok = result.after["loss"] < result.before["loss"]
            host = AdapterHost.from_adapters(result.adapter_dir)  # bf16 base on the GPU
            sample = host.generate(["My card was charged twice this month."], max_new_tokens=3)
            del host
            record = {"case": label, "peak_gpu_mb": peak / 2**20, "before_loss": result.before["loss"],
                      "after_loss": result.after["loss"], "after_accuracy": result.after.get("accuracy"),
                      "seconds_per_step": result.train_seconds / result.steps, "sample": sample[0],
                      "wall_seconds": time.perf_counter() - started, "loss_fell": ok}
            results.append(record)
            print(json.dumps(record), flush=True)
            if not ok:
                failures.append(f"{label}: loss did not fall ({result.before['loss']:.3f} -> {result.after['loss']:.3f})")
        except Exception as exc:  # noqa: BLE001 - report every case, then fail
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
            print(f"FAILED {label}: {exc}", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"device": torch.cuda.get_device_name(0), "results": results, "failures": failures}, indent=2))
    from methods import write_section

    lines = ["## GPU check (issue 3)", "", f"Command: `bash bench/gpu_check.sh` on {torch.cuda.get_device_name(0)}, torch {torch.__version__}. "
             "SmolLM2-135M, quickstart data, 30 steps of batch 16.", "",
             "| case | peak GPU memory | s/step | held-out loss before -> after |", "| --- | ---: | ---: | --- |"]
    for r in results:
        lines.append(f"| {r['case']} | {r['peak_gpu_mb']:.0f} MiB | {r['seconds_per_step']:.3f} | {r['before_loss']:.3f} -> {r['after_loss']:.3f} |")
    lines += [""] + [f"FAILED: {f}" for f in failures]
    write_section("\n".join(lines), key="gpu")
    for failure in failures:
        print(f"gpu_check: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
