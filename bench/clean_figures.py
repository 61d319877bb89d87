"""Honest classification figures: clean held-out data, a time budget, and the peer at equal
rows and time.

    python bench/clean_figures.py [--budget 10m] [--jobs agnews,sst2,smollm2,peer] [--quick]

* **AG News** (``../shared/data/agnews``: 8,000 train / 2,001 dev news snippets, four topics, no
  overlap): ``bench/recipes/agnews-minilm-lora.yaml`` under ``training.budget``.
* **SST-2** (``../shared/data/sst2``): its dev rows come from the same pool of parse-tree phrases
  as the training file (``../shared/data/README.md``), so the whole dev file overstates; the
  figure that counts is on the dev rows that are full sentences, :data:`LONG_WORDS` words or more
  (written to ``bench/out/clean/sst2-dev-long.tsv`` at run time). ``bench/recipes/sst2-minilm-
  lora.yaml`` (MiniLM-L6, new head) and ``bench/recipes/sst2-smollm2-lora.yaml`` (SmolLM2 through
  label words), both with the budget, 8,000 training rows.
* **The peer**: ``transformers.Trainer`` + peft with their defaults (``LoraConfig(task_type=
  "SEQ_CLS")``: r 8, alpha 8 on query/value; ``TrainingArguments``: AdamW at 5e-5, batch 8, linear
  schedule) on the same training rows and tokenization length, stopped when its training time
  reaches plugtune's on the same data (a callback), then scored on the same dev rows.

Each job runs in a fresh process, one after another. The table goes to ``bench/results/clean.md``;
BENCHMARKS.md's ``clean`` section quotes it with the machine and the runs' dates.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out" / "clean"
RESULTS = ROOT / "bench" / "results" / "clean.md"
LONG_WORDS = 15
TRAIN_ROWS = 8000


def long_sst2_dev() -> Path:
    """The SST-2 dev rows with at least LONG_WORDS words: full sentences, not phrase fragments."""
    OUT.mkdir(parents=True, exist_ok=True)
    target = OUT / "sst2-dev-long.tsv"
    with open(SHARED / "sst2" / "dev.tsv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    long = [r for r in rows if len(r["sentence"].split()) >= LONG_WORDS]
    with open(target, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writeheader()
        writer.writerows(long)
    return target


def child(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plugtune_job(recipe: str, budget: str, label: str, extra: list[str]) -> dict:
    """Train under the budget, then score on the long SST-2 rows where the data is SST-2."""
    out = OUT / label
    run = child([str(ROOT / "bench" / "run_one.py"), recipe, f"training.budget={budget}", f"output.dir={out}",
                 "training.eval_before=false", *extra])
    result = {"label": label, "recipe": recipe, "train_seconds": run["train_seconds"], "steps": run["steps"],
              "dev_all": run["after"]["accuracy"], "peak_rss_mb": run["peak_rss_mb"],
              "learning_rate": json.loads((out / "plugtune.json").read_text())["training"].get("learning_rate")}
    if "sst2" in recipe:
        scores = OUT / f"{label}-long.json"
        subprocess.run([sys.executable, "-m", "plugtune.cli", "eval", recipe, f"data.options.test_path={long_sst2_dev()}",
                        *[e for e in extra if "max_eval_examples" in e], "--adapter", str(out), "--json", str(scores)], cwd=ROOT, check=True, capture_output=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        columns = json.loads(scores.read_text())
        result["dev_long"] = next(v["accuracy"] for k, v in _columns(columns).items() if k != "base")
    return result


def _columns(data: dict) -> dict:
    return data.get("columns", data)


def peer_main(dataset: str, seconds: float) -> None:
    """Trainer + peft defaults on the same rows, stopped at ``seconds`` of training."""
    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    from plugtune.plugins.models.builtin import MINILM

    text, files = ("text", SHARED / "agnews") if dataset == "agnews" else ("sentence", SHARED / "sst2")
    train = _read(files / "train.tsv")[:TRAIN_ROWS]
    labels = sorted({r["label"] for r in train})
    folder = MINILM.locate()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(labels))
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS"))

    def encode(rows: list[dict]) -> Dataset:
        enc = tokenizer([r[text] for r in rows], truncation=True, max_length=96 if dataset == "agnews" else 64)
        return Dataset.from_dict({**enc, "labels": [labels.index(r["label"]) for r in rows]})

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - self.started >= seconds:
                control.should_training_stop = True

    args = TrainingArguments(output_dir=str(OUT / f"peer-{dataset}"), num_train_epochs=100, save_strategy="no",
                             report_to="none", use_cpu=True, seed=0, disable_tqdm=True, logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=encode(train), data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=[Clock()])
    started = time.perf_counter()
    trainer.train()
    trained = time.perf_counter() - started

    def accuracy(rows: list[dict]) -> float:
        predictions = trainer.predict(encode(rows))
        return float(np.mean(np.argmax(predictions.predictions, -1) == predictions.label_ids))

    result = {"label": f"peer-{dataset}", "train_seconds": trained, "steps": trainer.state.global_step,
              "dev_all": accuracy(_read(files / "dev.tsv")), "threads": torch.get_num_threads()}
    if dataset == "sst2":
        result["dev_long"] = accuracy(_read(long_sst2_dev()))
    print(json.dumps(result))


def _read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))


def table(results: list[dict], budget: str) -> str:
    lines = [f"Command: `python bench/clean_figures.py --budget {budget}` (2 CPU cores; jobs one after another, each in "
             f"a fresh process).", "",
             "| run | model | SST-2 dev (all) | SST-2 dev, full sentences (15+ words) | AG News dev | steps | training time | rate |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        sst2, agnews = ("agnews" not in r["label"]), ("agnews" in r["label"])
        rate = r.get("learning_rate")
        rate = (f"auto: {rate['adapter']:.3g}" + (f", head {rate['head']:.3g}" if rate.get("head") else "")
                if isinstance(rate, dict) else (f"{rate:g}" if rate else "5e-05 (peer default)"))
        lines.append(f"| {r['label']} | {'SmolLM2-135M' if 'smollm2' in r['label'] else 'MiniLM-L6'} | "
                     f"{r['dev_all']:.3f} |" if sst2 else f"| {r['label']} | MiniLM-L6 | |")
        lines[-1] += (f" {r['dev_long']:.3f} |" if sst2 else " |") + (f" {r['dev_all']:.3f} |" if agnews else " |")
        lines[-1] += f" {r['steps']} | {r['train_seconds']:.0f} s | {rate} |"
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--jobs", default="agnews,sst2,smollm2,peer",
                        help="any of agnews, sst2, smollm2, peer (both), peer-agnews, peer-sst2; the results of jobs "
                             "not run are kept from bench/out/clean/results.json")
    parser.add_argument("--quick", action="store_true", help="a 30 s budget and 2,000 training rows: checks the script")
    parser.add_argument("--peer", nargs=2, metavar=("DATASET", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        peer_main(args.peer[0], float(args.peer[1]))
        return
    if not (SHARED / "agnews").exists() or not (SHARED / "sst2").exists():
        raise SystemExit(f"needs {SHARED}/agnews and {SHARED}/sst2 beside the checkout")
    budget = "30s" if args.quick else args.budget
    extra = ["data.options.max_train_rows=2000", "training.max_eval_examples=200"] if args.quick else []
    jobs = args.jobs.split(",")
    results = Results(OUT / ("results-quick.json" if args.quick else "results.json"))
    if "agnews" in jobs:
        results.append(plugtune_job("bench/recipes/agnews-minilm-lora.yaml", budget, "plugtune-agnews", extra))
    if "sst2" in jobs:
        results.append(plugtune_job("bench/recipes/sst2-minilm-lora.yaml", budget, "plugtune-sst2",
                                    extra[1:] + [f"data.options.max_train_rows={2000 if args.quick else TRAIN_ROWS}",
                                     "training.learning_rate=auto", "training.epochs=1000"]))  # the budget decides
    if "smollm2" in jobs:
        results.append(plugtune_job("bench/recipes/sst2-smollm2-lora.yaml", budget, "plugtune-smollm2-sst2", extra))
    for dataset in ("agnews", "sst2"):
        if "peer" in jobs or f"peer-{dataset}" in jobs:
            ours = next((r for r in results if r["label"] == f"plugtune-{dataset}"), None)
            seconds = ours["train_seconds"] if ours else float(budget.rstrip("sm")) * (60 if budget.endswith("m") else 1)
            results.append(child([__file__, "--peer", dataset, str(seconds)]))
    text = table(results, budget)
    print(text)
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)


class Results(list):
    """The jobs' results, written to ``path`` after each one, so a failed job loses only itself."""

    def __init__(self, path: Path):
        super().__init__(json.loads(path.read_text()) if path.exists() else [])  # jobs run earlier: kept
        self.path = path

    def append(self, result: dict) -> None:
        self[:] = [r for r in self if r["label"] != result["label"]]  # a job run again replaces its row
        super().append(result)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(list(self), indent=2))


if __name__ == "__main__":
    main()
