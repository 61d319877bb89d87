"""Packing against length grouping (issue 20, item 3): real tokens/s and s/step.

    flock /tmp/plugtune-heavy.lock .venv/bin/python bench/packing.py [--rounds 2]

Two benchmarks, each configuration in a fresh process, the configurations taking turns:

* ``sst2``: bench/throughput.py's SFT recipe (SmolLM2-135M, LoRA r8 q/v, 2,000 SST-2 sentences,
  batch 8, cap 128, 18 steps, the first 3 untimed);
* ``chat``: the shipped support-chat recipe's data (recipes/data/support_chats.jsonl, 2-4 user
  turns, 60-238 tokens), SmolLM2's chat template, LoRA r8 q/k/v/o, batch 8, cap 256, 12 steps.

Configurations: length-grouped batches (the default), grouped + packed, random batches
(``group_by_length: false``), random + packed. Prints one JSON line per run and writes
bench/out/packing/packing.json; "computed" is the positions the model ran over (padding
included), so real / computed is the batches' fill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402  (bench/throughput.py: its data, recipe and run harness)
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "packing"
CONFIGS = {
    "grouped": ["training.packing=false"],
    "grouped+packed": ["training.packing=true"],
    "random": ["training.group_by_length=false", "training.packing=false"],
    "random+packed": ["training.group_by_length=false", "training.packing=true"],
}
CHAT_STEPS = 12


def chat_recipe() -> Path:
    """The support-chat recipe's data and task at benchmark settings: no budget, a few steps."""
    data = ROOT / "recipes" / "data"
    recipe = {
        "name": "packing-chat",
        "base_model": "smollm2-135m",
        "task": {"type": "chat", "format": "openai", "template": "tokenizer"},
        "data": {"loader": "table", "options": {"path": str(data / "support_chats.jsonl"),
                                                 "test_path": str(data / "support_chats_test.jsonl")}},
        "method": {"name": "lora", "options": {"r": 8, "alpha": 16, "dropout": 0.05,
                                               "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
        "evaluators": ["loss"],
        "training": {"max_steps": CHAT_STEPS, "batch_size": 8, "learning_rate": 1e-3, "seed": 0, "max_length": 256,
                     "eval_before": False, "max_eval_examples": 8, "device": "cpu"},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "packing-chat.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run(recipe: Path, bench: str, config: str) -> dict:
    """One run; adds the batches' fill (real / computed positions over the timed steps)."""
    label = f"packing-{bench}-{config.replace('+', '-')}"
    result = throughput.plugtune_run(recipe, label, CONFIGS[config])
    records = [json.loads(line) for line in (throughput.OUT / label / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["event"] == "train"][throughput.WARMUP:]
    result["fill"] = sum(r["tokens"] for r in timed) / sum(r["computed_tokens"] for r in timed)
    result.update(bench=bench, config=config)
    result.pop("step_list", None)
    print(json.dumps({k: result[k] for k in ("bench", "config", "real_tokens_per_s", "seconds_per_step",
                                             "real_tokens_per_cpu_s", "fill", "final_loss", "spikes_left_out")}), flush=True)
    return result


def table(runs: list[dict]) -> str:
    lines = ["| benchmark | configuration | real tokens/s (wall) | s/step (wall) | real tokens per CPU-s | fill (real / computed) | runs |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for bench in dict.fromkeys(r["bench"] for r in runs):
        for config in CONFIGS:
            mine = [r for r in runs if r["bench"] == bench and r["config"] == config]
            if not mine:
                continue
            mean = {k: statistics.mean(r[k] for r in mine) for k in ("real_tokens_per_s", "seconds_per_step",
                                                                     "real_tokens_per_cpu_s", "fill")}
            lines.append(f"| {bench} | {config} | {mean['real_tokens_per_s']:.1f} | {mean['seconds_per_step']:.3f} | "
                         f"{mean['real_tokens_per_cpu_s']:.1f} | {mean['fill']:.2f} | {len(mine)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=["sst2", "chat"], default=None)
    args = parser.parse_args()
    recipes = {"sst2": throughput.write_recipe(*throughput.write_data()), "chat": chat_recipe()}
    runs = []
    for bench, recipe in recipes.items():
        if args.only and bench != args.only:
            continue
        for _ in range(args.rounds):
            for config in CONFIGS:
                runs.append(run(recipe, bench, config))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "packing.json").write_text(json.dumps(runs, indent=1))
    print(table(runs))


if __name__ == "__main__":
    main()
