"""Where a training step's time goes: torch's profiler over the SFT throughput benchmark's steps.

    python bench/train_profile.py [overrides ...]      # e.g. training.precision=fp32

Runs ``bench/throughput.py``'s recipe (SmolLM2-135M, LoRA r 8 on q/v, batch 8) for 10 steps in
this process and profiles steps 4 to 8 (the first ones pay for allocation and kernel choice).
Prints the operators by their own CPU time, and the share of the step spent in the optimizer,
the forward, the backward and the rest (collation, logging, Python): the list the issue-20
ablation works down.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import throughput  # noqa: E402

PROFILED = range(4, 9)


def main(overrides: list[str]) -> None:
    from torch.profiler import ProfilerActivity, profile

    import plugtune
    from plugtune.training import train as train_module

    train, dev = throughput.write_data()
    recipe_path = throughput.write_recipe(train, dev)
    out = throughput.OUT / "profile"
    recipe = plugtune.load_recipe(str(recipe_path), [*overrides, "training.max_steps=10", f"output.dir={out}",
                                                     "training.eval_before=false", "training.max_eval_examples=8"])
    steps = {"n": 0, "open": False}
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
    real_step = train_module._micro_step

    def counted(*args, **kwargs):  # the profiler runs over the steps in PROFILED
        steps["n"] += 1
        if steps["n"] == PROFILED.start:
            prof.__enter__()
            steps["open"] = True
        elif steps["n"] == PROFILED.stop and steps["open"]:  # the next step's start: the optimizer of the last one is in
            prof.__exit__(None, None, None)
            steps["open"] = False
        return real_step(*args, **kwargs)

    train_module._micro_step = counted
    try:
        plugtune.run(recipe, show_progress=False, overwrite=True)
    finally:
        train_module._micro_step = real_step
        if steps["open"]:
            prof.__exit__(None, None, None)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(table)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups = {"optimizer": ("Optimizer.step", "aten::_fused_adamw", "aten::_foreach", "aten::addcdiv", "aten::lerp"),
              "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
              "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
              "casts": ("aten::copy_", "aten::_to_copy", "aten::to"),
              "elementwise": ("aten::mul", "aten::add", "aten::pow", "aten::rsqrt", "aten::mean", "aten::silu", "aten::neg",
                              "aten::cat", "aten::sum", "aten::div")}
    shares = {name: sum(e.self_cpu_time_total for e in events if e.key.startswith(prefixes)) / total
              for name, prefixes in groups.items()}
    shares["other"] = 1 - sum(shares.values())
    print(json.dumps({"profiled_steps": len(PROFILED), "self_cpu_ms": total / 1000, "shares": shares}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
