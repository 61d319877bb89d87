"""GPU check: every tuning method trains a few steps on SmolLM2-135M on one CUDA GPU, in bf16,
plus LoRA on an 8-bit (int8) and a 4-bit (qlora) base; peak GPU memory and seconds per step.

    bash bench/gpu_check.sh            # exits non-zero on any failure; a few minutes
    python bench/gpu_check.py --dry-run  # no GPU needed: builds and validates every case's recipe

Each case is ``recipes/quickstart.yaml`` (the support-ticket data, a causal LM) with the case's
method block (Llama module names) and the same training settings (``COMMON``: batch 8,
``STEPS`` steps, CUDA). Frozen bases load in bf16 on a GPU (``training.base_dtype: auto``);
``full`` trains fp32 master weights under bf16 autocast; int8 and qlora load the base already
quantized. Per case: peak GPU memory (``torch.cuda.max_memory_allocated`` over loading,
training and the final evaluation), the median seconds per step after ``WARMUP`` steps, the
held-out loss before and after, and the saved adapter loaded on a fresh bf16 ``AdapterHost``
and generating. A case fails when it raises, its loss is not finite, or its adapter does not
load and generate; the script then exits 1 (2 without a GPU). The ratios of qlora's and
int8's peak memory to bf16 LoRA's are printed against the issue's targets (0.45 and 0.6).
Results go to bench/out/gpu_check.json and the "gpu" section of BENCHMARKS.md.

The cases are the methods of bench/methods.py (``METHODS``), so a method added there must get
its block here (tests/test_bench_methods.py checks); a method whose plugin is not installed
is listed as such, not run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from methods import METHODS, write_section  # noqa: E402

BASE_RECIPE = ROOT / "recipes" / "quickstart.yaml"
QV = ["q_proj", "v_proj"]
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": QV}
# method -> (options on SmolLM2's Llama modules, learning rate)
CASES: dict[str, tuple[dict[str, Any], float]] = {
    "lora": (LORA, 1e-3),
    "dora": ({"r": 8, "alpha": 16, "target_modules": QV}, 1e-3),
    "ia3": ({"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}, 1e-2),
    "loha": ({"r": 8, "alpha": 16, "target_modules": QV}, 3e-3),
    "lokr": ({"r": 8, "alpha": 16, "target_modules": QV}, 3e-3),
    "vera": ({"r": 256, "target_modules": QV}, 1e-2),
    "oft": ({"block_size": 32, "target_modules": QV}, 3e-3),
    "boft": ({"block_size": 8, "n_butterfly_factor": 2, "target_modules": QV}, 3e-3),
    "adalora": ({"init_r": 12, "target_r": 8, "target_modules": QV}, 3e-3),
    "ln_tuning": ({"target_modules": ["input_layernorm", "post_attention_layernorm"]}, 3e-3),
    "prompt_tuning": ({"num_virtual_tokens": 20}, 3e-2),
    "p_tuning": ({"num_virtual_tokens": 20, "encoder_hidden": 128}, 1e-2),
    "prefix": ({"num_virtual_tokens": 20}, 1e-2),
    "full": ({}, 1e-4),
    "int8": (LORA, 1e-3),
    "qlora": (LORA, 1e-3),
    "peft": ({"type": "HRA", "r": 8, "target_modules": QV}, 1e-3),
}
LABELS = {"full": "full (fp32 weights, bf16 autocast)", "int8": "int8 base + LoRA", "qlora": "4-bit NF4 base + LoRA (qlora)"}
STEPS, WARMUP, BATCH = 12, 3, 8
COMMON = [f"training.max_steps={STEPS}", f"training.batch_size={BATCH}", "training.max_eval_examples=32",
          "training.warmup_steps=2", "training.checkpoint_every=0", "evaluators=[loss]",
          "regularizers=[]"]
TARGETS = {"qlora": 0.45, "int8": 0.6}  # peak GPU memory at most this times bf16 LoRA's


def case_overrides(name: str, out: Path, device: str = "cuda") -> list[str]:
    options, lr = CASES[name]
    return [*COMMON, f"training.device={device}", f"method={json.dumps({'name': name, 'options': options})}", f"training.learning_rate={lr!r}",
            f"name=gpu-{name.replace('_', '-')}", f"output.dir={out / name}"]


def build(name: str, out: Path, device: str = "cuda") -> Any:
    """The validated recipe of case ``name`` (raises RecipeError when it is invalid)."""
    import plugtune

    return plugtune.load_recipe(BASE_RECIPE, case_overrides(name, out, device))


class StepTimer:
    """A lifecycle plugin: the wall time of each optimizer step, the GPU synchronized."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    from plugtune import hookimpl as _hookimpl

    @_hookimpl
    def on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:])][WARMUP - 1:]
        return statistics.median(gaps) if gaps else float("nan")


def run_case(name: str, out: Path, device: str = "cuda") -> dict[str, Any]:
    """Train case ``name``, then load its adapter on a fresh host. ``device="cpu"`` runs the
    same path on a CPU (to check this script without a GPU; its memory figure is then 0)."""
    import torch

    import plugtune
    from plugtune.kernel.registry import build_plugin_system
    from plugtune.serving.host import AdapterHost

    cuda = device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    timer = StepTimer()
    system = build_plugin_system(extra_plugins=[("gpu-check-step-timer", timer)])
    result = plugtune.run(build(name, out, device), plugins=system, show_progress=False, overwrite=True)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    record = {"method": name, "peak_gpu_mib": peak / 2**20, "seconds_per_step": timer.seconds_per_step(),
              "steps": result.steps, "before_loss": result.before["loss"], "after_loss": result.after["loss"],
              "trainable_parameters": result.trainable_parameters}
    if not math.isfinite(result.after["loss"]):
        raise RuntimeError(f"the held-out loss is not finite after training ({result.after['loss']})")
    del result
    gc.collect()
    host = AdapterHost.from_adapters(out / name, device=device)  # a fresh base: bf16 on the GPU
    record["sample"] = host.generate(["My card was charged twice this month."], max_new_tokens=3)[0]  # the task template adds the rest
    del host
    record["wall_seconds"] = time.perf_counter() - started
    return record


def installed() -> set[str]:
    from plugtune.kernel.registry import get_plugin_system

    return set(get_plugin_system().names("method"))


def dry_run(out: Path) -> int:
    """Build and validate every case's recipe, no GPU needed; 1 when an installed one is invalid."""
    from plugtune.kernel.errors import PlugtuneError

    have, bad = installed(), 0
    for m in METHODS:
        if m.name not in have:
            print(f"{m.name}: not installed")
            continue
        try:
            recipe = build(m.name, out)
            print(f"{m.name}: ok ({recipe.method.name}, lr {recipe.training.learning_rate:g}, batch {recipe.training.batch_size}, "
                  f"{recipe.training.max_steps} steps on {recipe.training.device})")
        except PlugtuneError as exc:
            bad += 1
            print(f"{m.name}: INVALID: {' '.join(str(exc).split())}")
    return 1 if bad else 0


def weights_note() -> str:
    """What the base's weights are: the real ones, or bench/gpu_standin.py's random stand-in."""
    from gpu_standin import is_standin

    if is_standin():
        return ("SmolLM2-135M's architecture and tokenizer with random weights (bench/gpu_standin.py: the lent machine "
                "reaches no registry, and the weights do not fit its upload; step times and memory depend on the shapes, "
                "held-out losses are a random model's)")
    return "SmolLM2-135M (`smollm2-135m`)"


def section(device: str, torch_version: str, rows: list[dict[str, Any]], ratios: list[str]) -> str:
    lines = ["## GPU check (issues 3, 15, 20)", "",
             f"Command: `bash bench/gpu_check.sh` on {device}, torch {torch_version}. {weights_note()}, "
             f"the quickstart data, {STEPS} steps of batch {BATCH} per method; frozen bases in bf16; s/step is the median "
             f"after {WARMUP} steps; peak GPU memory is `torch.cuda.max_memory_allocated` over loading, training and the "
             "final evaluation.", "",
             "| method | peak GPU memory | s/step | trainable parameters | held-out loss before -> after |",
             "| --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        label = LABELS.get(r["method"], r["method"])
        if "error" in r or "skipped" in r:
            lines.append(f"| {label} | {r.get('error') or r['skipped']} | | | |")
        else:
            lines.append(f"| {label} | {r['peak_gpu_mib']:.0f} MiB | {r['seconds_per_step']:.4f} | {r['trainable_parameters']:,} "
                         f"| {r['before_loss']:.3f} -> {r['after_loss']:.3f} |")
    return "\n".join(lines + [""] + [f"* {x}" for x in ratios] + [""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="every tuning method a few steps on one CUDA GPU")
    parser.add_argument("--dry-run", action="store_true", help="build and validate every case's recipe; no GPU needed")
    parser.add_argument("--methods", help="comma-separated subset (default: all); writes no BENCHMARKS.md")
    parser.add_argument("--cpu", action="store_true", help="run the cases on the CPU (checks this script; writes no BENCHMARKS.md)")
    args = parser.parse_args(argv)
    out = ROOT / "bench" / "out" / "gpu_check"
    missing = [m.name for m in METHODS if m.name not in CASES]
    if missing:
        print(f"gpu_check: no case for {', '.join(missing)}: add its block to CASES", file=sys.stderr)
        return 1
    if args.dry_run:
        return dry_run(out)

    import torch

    device = "cpu" if args.cpu else "cuda"
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch (use --dry-run to validate the recipes here)", file=sys.stderr)
        return 2
    names = [m.name for m in METHODS]
    if args.methods:
        names = [n for n in names if n in {x.strip() for x in args.methods.split(",")}]
    have = installed()
    rows, failures = [], []
    for name in names:
        if name not in have:
            rows.append({"method": name, "skipped": "not installed"})
            print(f"{name}: not installed", flush=True)
            continue
        try:
            rows.append(run_case(name, out, device))
            print(json.dumps(rows[-1]), flush=True)
        except Exception as exc:  # noqa: BLE001 - report every case, then fail
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            rows.append({"method": name, "error": f"FAILED: {message}"})
            failures.append(f"{name}: {message}")
            print(f"FAILED {name}: {message}", file=sys.stderr, flush=True)
    peaks = {r["method"]: r["peak_gpu_mib"] for r in rows if "peak_gpu_mib" in r}
    ratios = []
    for name, target in TARGETS.items():
        if name in peaks and peaks.get("lora"):  # 0 on a CPU (--cpu): no GPU memory to compare
            ratio = peaks[name] / peaks["lora"]
            ratios.append(f"{LABELS[name]} / bf16 LoRA peak GPU memory: {ratio:.2f} (target <= {target}: "
                          f"{'met' if ratio <= target else 'MISSED'})")
    device_name = torch.cuda.get_device_name(0) if not args.cpu else "CPU"
    print(f"\n{'method':36} {'peak MiB':>9} {'s/step':>8}")
    for r in rows:
        shown = f"{r['peak_gpu_mib']:9.0f} {r['seconds_per_step']:8.4f}" if "peak_gpu_mib" in r else (r.get("error") or r["skipped"])
        print(f"{LABELS.get(r['method'], r['method']):36} {shown}")
    for line in ratios:
        print(line)
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / "gpu_check.json").write_text(json.dumps({"device": device_name, "weights": weights_note(), "rows": rows, "ratios": ratios,
                                                           "failures": failures}, indent=2))
    if not args.methods and not args.cpu:
        write_section(section(device_name, torch.__version__, rows, ratios), key="gpu")
    for failure in failures:
        print(f"gpu_check: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
