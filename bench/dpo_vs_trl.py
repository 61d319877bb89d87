"""plugtune's ``preference`` task (DPO, LoRA) against TRL's ``DPOTrainer``, and the memory of
a DPO run with and without a second model: the "dpo" section of BENCHMARKS.md and
bench/results/dpo.json.

    python bench/dpo_vs_trl.py                  # both parts (about 30 min on 2 CPU cores)
    python bench/dpo_vs_trl.py --part trl       # the comparison only: --rounds 2 --steps 16
    python bench/dpo_vs_trl.py --part memory    # the reference-memory runs only: --memory-steps 3
    python bench/dpo_vs_trl.py --write-only     # the section again from bench/results/dpo.json

TRL is a peer, never a plugtune dependency. It is imported from ``--trl-path`` (default: the
``PLUGTUNE_TRL_PATH`` environment variable, else ``bench/out/trl``), a folder TRL was installed
into without its declared dependencies, which this venv's transformers, peft, accelerate and
datasets satisfy at these versions (``pip install --no-deps --target bench/out/trl trl==1.16.0``);
the script checks the import before it measures anything.

**What both tools get alike.** SmolLM2-135M-Instruct (``smollm2-135m``, the converted local
folder), fp32 on the CPU, the same pairs (``recipes/data/support_prefs.jsonl`` when it is
shipped, else a stand-in of the same shape written to ``bench/out/dpo/``: chat prompts,
polite answers routed to the right department against curt ones routed to a wrong one), DPO
(sigmoid) with beta 0.1, LoRA r 8 / alpha 16 / dropout 0 on q_proj and v_proj, batch 8,
``--steps`` steps, AdamW at 5e-4 with no weight decay, linear decay, no warm-up, gradient
norm clipped at 1, seed 0, max length 256 (no pair is longer, so neither truncates), the same
CPU threads, gradient checkpointing off (TRL's configs turn it on by default).

**The same batches.** plugtune's batch order (its seeded, length-grouped ``epoch_batches``) is
computed here from plugtune's own encoding of the training split, and TRL gets the rows in
that order with its sequential sampler, so step ``k`` of both sees the same eight pairs. The
loss curves are then comparable step by step, not only "within noise"; with LoRA's ``B``
starting at zero, both start from the same model (the ``A`` matrices come from the same seed).

**Token ids.** TRL's own prepared dataset (its ``_prepare_dataset``: the conversational
prompt rendered with the generation prompt, prompt + answer rendered whole, the answer from
where the two token lists part) is compared row by row with plugtune's ``encode``; the step-0
DPO loss is ``log 2`` for any policy equal to its reference, so the step-0 log-probabilities
of the chosen and rejected answers are compared too: they are what equal token ids show.

**Each measurement a fresh process** (peak RSS, ``ru_maxrss``, is per process), the tools
alternating round by round: TRL (reference: adapter disabled in every step), plugtune
``adapter_off``, plugtune ``precomputed``, and TRL ``precompute_ref_log_probs``. Examples per
second are training pairs over the training loop's seconds (plugtune's ``train_seconds``,
TRL's ``train_runtime``); for the precomputing runs the reference pass is timed too.

**Memory (``--part memory``).** plugtune alone: LoRA, prefix and DoRA, each with
``reference: adapter_off`` (the base with the adapter off, no second model) and
``reference: copy`` (a frozen copy of the base in memory), ``--memory-steps`` steps each.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "dpo"
RECIPE = ROOT / "bench" / "recipes" / "dpo-smollm2-lora.yaml"
RESULTS = ROOT / "bench" / "results" / "dpo.json"
SHIPPED = ROOT / "recipes" / "data" / "support_prefs.jsonl"
SHIPPED_TEST = ROOT / "recipes" / "data" / "support_prefs_test.jsonl"
TICKETS = ROOT / "recipes" / "data" / "support_tickets.csv"
DEFAULT_TRL = ROOT / "bench" / "out" / "trl"
DEPARTMENTS = ("billing", "shipping", "technical", "account")
KINDS = ("trl", "plugtune", "plugtune-precomputed", "trl-precomputed")  # the order of a round
LABELS = {"trl": "TRL DPOTrainer (adapter disabled in each step)", "plugtune": "plugtune, reference: adapter_off",
          "plugtune-precomputed": "plugtune, reference: precomputed", "trl-precomputed": "TRL, precompute_ref_log_probs"}
MEMORY_METHODS = {"lora": [], "prefix": ["method.name=prefix", "method.options={num_virtual_tokens: 16}"],
                  "dora": ["method.name=dora"]}
MEMORY_MODES = ("adapter_off", "copy")


@dataclass(frozen=True)
class Settings:
    """What both tools get (the recipe holds the same values; ``tests/test_bench_dpo.py``
    checks they agree)."""

    steps: int = 16  # one epoch of the stand-in's 128 training pairs: both precomputing runs score the same rows
    batch_size: int = 8
    beta: float = 0.1
    learning_rate: float = 5e-4
    max_length: int = 256
    seed: int = 0
    r: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    max_grad_norm: float = 1.0
    threads: int = 2


# -- the data ------------------------------------------------------------------------------


def standin_pairs(tickets: list[dict[str, str]], seed: int = 0) -> list[dict[str, Any]]:
    """Preference pairs of the shipped file's shape (``{prompt: [messages], chosen, rejected}``)
    from the support tickets: a polite answer routing to the ticket's department against a
    curt one routing to another (seeded)."""
    import random

    rng = random.Random(seed)
    polite = ["Thank you for reaching out. I have passed your message to our {d} team, who will reply within a day.",
              "I am sorry about the trouble. Our {d} team handles this, and I have forwarded your message to them.",
              "Thanks for letting us know. This is one for the {d} team; they have your message and will be in touch."]
    curt = ["Not my department. Ask {d}.", "Send it to {d}.", "{D}. Next.", "Try {d} or something."]
    rows = []
    for ticket in tickets:
        label = ticket["label"].strip().lower()
        wrong = rng.choice([d for d in DEPARTMENTS if d != label])
        rows.append({
            "prompt": [{"role": "system", "content": "You route customer-support messages to billing, shipping, technical or account."},
                       {"role": "user", "content": ticket["text"].strip()}],
            "chosen": rng.choice(polite).format(d=label),
            "rejected": rng.choice(curt).format(d=wrong, D=wrong.capitalize()),
        })
    return rows


def data_files(train_rows: int = 128, test_rows: int = 32) -> tuple[Path, Path | None, str]:
    """The shipped pairs when they are there (their test file, else a seeded split), else the
    stand-in written under bench/out/dpo."""
    if SHIPPED.is_file():
        return SHIPPED, SHIPPED_TEST if SHIPPED_TEST.is_file() else None, f"the shipped pairs ({SHIPPED.relative_to(ROOT)})"
    import csv

    with open(TICKETS, newline="", encoding="utf-8") as fh:
        pairs = standin_pairs(list(csv.DictReader(fh)))
    OUT.mkdir(parents=True, exist_ok=True)
    train, test = OUT / "standin_train.jsonl", OUT / "standin_test.jsonl"
    for path, part in ((train, pairs[:train_rows]), (test, pairs[train_rows: train_rows + test_rows])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return train, test, (f"stand-in pairs ({train_rows} train, {test_rows} test; from recipes/data/support_tickets.csv, "
                         "made by standin_pairs in this script, until the shipped ones land)")


def trl_row(row: dict[str, Any]) -> dict[str, Any]:
    """A plugtune pair as TRL's conversational preference row: a message prompt keeps its
    messages and each answer becomes a one-message assistant list; a text prompt stays text."""
    if isinstance(row["prompt"], list):
        wrap = (lambda a: a if isinstance(a, list) else [{"role": "assistant", "content": a}])
        return {"prompt": row["prompt"], "chosen": wrap(row["chosen"]), "rejected": wrap(row["rejected"])}
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


def visit_order(lengths: list[int], batch_size: int, seed: int, steps: int) -> list[int]:
    """The training-row indices plugtune's loop visits in ``steps`` steps (epoch after epoch
    of ``epoch_batches``, length-grouped), flattened: TRL's sequential sampler over the rows
    in this order sees the same batches."""
    from plugtune.data.batching import epoch_batches

    order: list[int] = []
    epoch = 0
    while len(order) < steps * batch_size:
        batches = epoch_batches(len(lengths), batch_size, seed=seed, epoch=epoch, lengths=lengths)
        if any(len(b) != batch_size for b in batches):
            raise ValueError(f"{len(lengths)} training rows do not fill batches of {batch_size}; "
                             "the tools would cut the epoch's last batch differently")
        order += [i for b in batches for i in b]
        epoch += 1
    return order[: steps * batch_size]


def split_ours(encoded: dict[str, list[int]]) -> dict[str, list[int]]:
    """plugtune's encoded pair as TRL's ``prompt_ids``/``chosen_ids``/``rejected_ids``."""
    n = encoded["prompt_length"][0]
    return {"prompt_ids": encoded["input_ids"][:n], "chosen_ids": encoded["input_ids"][n:],
            "rejected_ids": encoded["rejected_input_ids"][n:]}


def compare_ids(ours: list[dict[str, list[int]]], theirs: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Rows whose prompt, chosen and rejected ids are identical, per part, with the first row
    that differs (``ours``: plugtune's ``encode`` outputs, ``theirs``: TRL's prepared rows)."""
    if len(ours) != len(theirs):
        return {"rows": len(ours), "trl_rows": len(theirs), "identical": 0, "first_difference": "row counts differ"}
    same = {k: 0 for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    identical, first, labelled = 0, None, 0
    for i, (mine, row) in enumerate(zip(ours, theirs)):
        split = split_ours(mine)
        labelled += sum(label != -100 for label in mine["labels"]) == len(split["chosen_ids"])
        equal = {k: split[k] == list(row[k]) for k in same}
        for k, v in equal.items():
            same[k] += v
        identical += all(equal.values())
        if first is None and not all(equal.values()):
            part = next(k for k, v in equal.items() if not v)
            first = f"row {i}: {part} {split[part][:12]}... vs TRL {list(row[part])[:12]}..."
    return {"rows": len(ours), "identical": identical, **{f"same_{k}": v for k, v in same.items()},
            "labels_cover_answer": labelled, "first_difference": first}


# -- the records each run returns ------------------------------------------------------------


def plugtune_records(lines: list[str]) -> list[dict[str, float]]:
    """The per-step records of a plugtune ``metrics.jsonl``, named as :func:`trl_records`'s."""
    out = []
    for line in lines:
        rec = json.loads(line)
        if rec.get("event") != "train":
            continue
        out.append({"step": rec["step"], "loss": rec["loss"], "chosen_logp": rec.get("logps/chosen"),
                    "rejected_logp": rec.get("logps/rejected"), "margin": rec.get("rewards/margin"),
                    "accuracy": rec.get("rewards/accuracy"), "step_seconds": rec.get("step_seconds")})
    return out


def trl_records(log_history: list[dict[str, Any]], step_seconds: list[float] | None = None) -> list[dict[str, float]]:
    """The per-step records of a ``Trainer.state.log_history`` logged every step (the final
    summary entry, without ``loss``, is left out)."""
    out = []
    for entry in log_history:
        if "loss" not in entry or "step" not in entry:
            continue
        out.append({"step": entry["step"], "loss": entry["loss"], "chosen_logp": entry.get("logps/chosen"),
                    "rejected_logp": entry.get("logps/rejected"), "margin": entry.get("rewards/margins"),
                    "accuracy": entry.get("rewards/accuracies"), "step_seconds": None})
    for rec, seconds in zip(out, step_seconds or []):
        rec["step_seconds"] = seconds
    return out


def curve_gap(a: list[dict[str, float]], b: list[dict[str, float]], key: str = "loss") -> dict[str, float]:
    """Step-by-step ``|a - b|`` of ``key`` over the steps both logged: the largest, the mean,
    and the step of the largest."""
    theirs = {r["step"]: r[key] for r in b if r.get(key) is not None}
    gaps = [(abs(r[key] - theirs[r["step"]]), r["step"]) for r in a if r.get(key) is not None and r["step"] in theirs]
    if not gaps:
        return {"steps": 0}
    worst = max(gaps)
    return {"steps": len(gaps), "max": worst[0], "at_step": worst[1], "mean": sum(g for g, _ in gaps) / len(gaps)}


def examples_per_second(run: dict[str, Any], *, with_reference_pass: bool = False) -> float:
    seconds = run["train_seconds"] + (run.get("reference_seconds", 0.0) if with_reference_pass else 0.0)
    return run["steps"] * run["batch_size"] / seconds if seconds else float("nan")


def median_step(run: dict[str, Any]) -> float:
    """The median step time, the first step (warm-up: allocator, thread pools) left out."""
    times = [r["step_seconds"] for r in run["records"][1:] if r.get("step_seconds")]
    return statistics.median(times) if times else float("nan")


def rss_mb() -> dict[str, float]:
    """This process's resident memory now and its peak so far (``VmRSS``/``VmHWM``), in MB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"now": int(status["VmRSS"].split()[0]) / 1024, "peak": int(status["VmHWM"].split()[0]) / 1024}


# -- one run, in this process (the parent starts each in a fresh one) -------------------------


def plugtune_overrides(s: Settings, train: Path, test: Path | None, reference: str, out: Path, steps: int,
                       extra: list[str] = ()) -> list[str]:
    """The recipe's overrides for one run; the training split is cut (seeded) to one epoch of
    ``steps``, so a precomputing run scores exactly the rows the steps train on, as TRL's does
    (TRL's dataset is those rows in plugtune's order)."""
    return [f"data.options.path={train}", f"data.options.test_path={test if test else 'null'}", f"task.reference={reference}",
            f"training.max_steps={steps}", f"training.batch_size={s.batch_size}", f"training.learning_rate={s.learning_rate!r}",
            f"training.max_length={s.max_length}", f"training.seed={s.seed}", f"training.threads={s.threads}",
            f"training.max_grad_norm={s.max_grad_norm!r}", f"data.options.max_train_rows={steps * s.batch_size}",
            f"output.dir={out}", *extra]


def plugtune_job(spec: dict[str, Any]) -> dict[str, Any]:
    import plugtune
    from plugtune.data.encoding import REFERENCE
    from plugtune.training import reference as references

    timing = {"seconds": 0.0, "rows": 0}
    precompute = references.precompute

    def timed(model: Any, rows: list[Any], task: Any, **kwargs: Any) -> None:  # the run's reference pass, timed
        started = time.perf_counter()
        timing.setdefault("rss_before_reference_mb", rss_mb())  # the base loaded, the splits tokenized
        timing["rows"] += sum(REFERENCE not in r for r in rows)
        precompute(model, rows, task, **kwargs)
        timing["seconds"] += time.perf_counter() - started

    references.precompute = timed
    started = time.perf_counter()
    recipe = plugtune.load_recipe(RECIPE, spec["overrides"])
    result = plugtune.run(recipe, show_progress=False, overwrite=True)
    lines = (Path(result.adapter_dir) / "metrics.jsonl").read_text().splitlines()
    return {"tool": "plugtune", "reference": recipe.task.reference, "method": recipe.method.name,
            "steps": result.steps, "batch_size": recipe.training.batch_size, "train_seconds": result.train_seconds,
            "reference_seconds": timing["seconds"], "reference_rows": timing["rows"],
            "rss_before_reference_mb": timing.get("rss_before_reference_mb"),
            "records": plugtune_records(lines), "after": result.after,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "wall_seconds": time.perf_counter() - started}


def model_folder() -> Path:
    from plugtune.artifacts.models import gguf_to_hf, local_location

    location = local_location("smollm2-135m")
    return gguf_to_hf(location) if location.suffix == ".gguf" else location


def trl_job(spec: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    sys.path.insert(0, spec["trl_path"])
    import torch

    torch.set_num_threads(spec["settings"]["threads"])
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    s = Settings(**{**spec["settings"], "target_modules": tuple(spec["settings"]["target_modules"])})
    rows = json.loads(Path(spec["rows"]).read_text())
    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loaded_rss = rss_mb()
    precomputed = spec["reference"] == "precomputed"
    args = DPOConfig(
        output_dir=str(OUT / "runs" / "trl"), per_device_train_batch_size=s.batch_size, max_steps=spec["steps"],
        learning_rate=s.learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        max_grad_norm=s.max_grad_norm, beta=s.beta, loss_type=["sigmoid"], max_length=s.max_length, seed=s.seed,
        data_seed=s.seed, train_sampling_strategy="sequential", gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        precompute_ref_log_probs=precomputed, dataset_num_proc=None)
    peft_config = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=0.0, target_modules=list(s.target_modules),
                             task_type="CAUSAL_LM", bias="none")

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self.start)

    steps = StepTimes()
    built = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[steps])
    construct_seconds = time.perf_counter() - built
    constructed_rss = rss_mb()
    if spec.get("ids_out"):
        prepared = trainer.train_dataset
        Path(spec["ids_out"]).write_text(json.dumps([{k: list(prepared[i][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                                     for i in range(len(prepared))]))
    output = trainer.train()
    return {"tool": "trl", "trl_version": trl.__version__, "reference": spec["reference"], "method": "lora",
            "steps": output.global_step, "batch_size": s.batch_size, "train_seconds": output.metrics["train_runtime"],
            "reference_seconds": construct_seconds if precomputed else 0.0, "construct_seconds": construct_seconds,
            "records": trl_records(trainer.state.log_history, steps.times),
            "rss_after_load_mb": loaded_rss, "rss_after_trainer_mb": constructed_rss,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "wall_seconds": time.perf_counter() - started}


JOBS = {"plugtune": plugtune_job, "trl": trl_job}


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` run in a fresh process; its record, or ``{"error": ...}``."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--job", json.dumps(spec)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        record = json.loads(lines[-1])
    else:
        print(done.stderr[-4000:], file=sys.stderr)
        tail = [l for l in done.stderr.strip().splitlines() if l.strip()] or [f"exit status {done.returncode}"]
        record = {"error": " ".join(tail[-1].split())[:300]}
    record["process_seconds"] = time.perf_counter() - started
    return record


# -- the parts ---------------------------------------------------------------------------------


def check_trl(trl_path: Path) -> tuple[str | None, str]:
    """TRL's version imported from ``trl_path`` against this venv (in a child process, so the
    measured runs' imports stay their own), or None and why not."""
    code = f"import sys; sys.path.insert(0, {str(trl_path)!r}); import trl; from trl import DPOTrainer; print(trl.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        last = [l for l in done.stderr.splitlines() if l.strip()][-1:] or ["?"]
        return None, (f"TRL does not import from {trl_path} ({last[0]}); install it there with "
                      f"pip install --no-deps --target {trl_path} trl==1.16.0, or pass --trl-path")
    return done.stdout.strip().splitlines()[-1], ""


def prepare(s: Settings, steps: int, train: Path, test: Path | None) -> dict[str, Any]:
    """plugtune's own view of the training split: its rows, their encoding and the order its
    loop visits them in; the TRL rows in that order are written to bench/out/dpo."""
    import plugtune
    from transformers import AutoTokenizer

    recipe = plugtune.load_recipe(RECIPE, plugtune_overrides(s, train, test, "adapter_off", OUT / "runs" / "prepare", steps))
    task = copy.deepcopy(recipe.task)
    rows = recipe.load_data(s.seed, task).splits["train"]
    tokenizer = AutoTokenizer.from_pretrained(model_folder())
    task.bind_tokenizer(tokenizer)
    encoded = [task.encode(r, tokenizer, s.max_length) for r in rows]
    unbounded = [task.encode(r, tokenizer, 10**9) for r in rows]
    order = visit_order([len(e["input_ids"]) for e in encoded], s.batch_size, s.seed, steps)
    raw = [json.loads(line) for line in train.read_text().splitlines() if line.strip()]
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "trl_rows.json"
    path.write_text(json.dumps([trl_row(rows[i]) for i in order]))
    return {"rows_file": str(path), "ours": [encoded[i] for i in order], "train_rows": len(rows),
            "truncated": sum(a != b for a, b in zip(encoded, unbounded)),
            "longest": max(max(len(e["input_ids"]), len(e["rejected_input_ids"])) for e in unbounded),
            "changed_by_normalize": sum(trl_row(r) != trl_row(task.normalize(r)) for r in raw)}


def trl_part(s: Settings, rounds: int, steps: int, trl_path: Path, train: Path, test: Path | None) -> dict[str, Any]:
    prepared = prepare(s, steps, train, test)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    ids_file = OUT / "trl_ids.json"
    for round_ in range(rounds):
        for kind in KINDS:
            tool, reference = ("trl", "adapter_off") if kind == "trl" else ("trl", "precomputed") if kind == "trl-precomputed" \
                else ("plugtune", "precomputed" if kind.endswith("precomputed") else "adapter_off")
            if tool == "trl":
                spec = {"tool": "trl", "trl_path": str(trl_path), "settings": asdict(s), "rows": prepared["rows_file"],
                        "steps": steps, "reference": reference, "ids_out": str(ids_file) if round_ == 0 and kind == "trl" else None}
            else:
                spec = {"tool": "plugtune", "overrides": plugtune_overrides(s, train, test, reference, OUT / "runs" / kind, steps)}
            record = run_job(spec)
            runs[kind].append(record)
            print(f"round {round_ + 1} {kind}: " + (record["error"] if "error" in record else
                  f"{examples_per_second(record):.2f} ex/s, peak {record['peak_rss_mb']:,.0f} MB, "
                  f"loss {record['records'][0]['loss']:.6f} -> {record['records'][-1]['loss']:.4f}"), flush=True)
    ids = compare_ids(prepared["ours"], json.loads(ids_file.read_text())) if ids_file.is_file() else {"error": "TRL run failed"}
    return {"prepared": {k: v for k, v in prepared.items() if k != "ours"}, "ids": ids, "runs": runs}


def memory_part(s: Settings, steps: int, train: Path, test: Path | None) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for method, extra in MEMORY_METHODS.items():
        for mode in MEMORY_MODES:
            spec = {"tool": "plugtune", "overrides": plugtune_overrides(
                s, train, test, mode, OUT / "runs" / f"memory-{method}-{mode}", steps,
                [*extra, "training.learning_rate=1.0e-2"] if method == "prefix" else extra)}
            record = run_job(spec)
            runs.setdefault(method, []).append({"mode": mode, **record})
            print(f"memory {method} {mode}: " + (record["error"] if "error" in record else f"peak {record['peak_rss_mb']:,.0f} MB"),
                  flush=True)
    return runs


# -- the section -------------------------------------------------------------------------------

WHY_TRL = [
    "Where the figures come from:",
    "",
    "- **Step 0.** With LoRA's `B` at zero the policy is its reference, so the DPO loss of the first batch is "
    "`-log sigmoid(0) = log 2 = 0.693147` in both tools, whatever the ids; what equal ids show is the step-0 summed "
    "log-probabilities of the chosen and rejected answers, equal to about 2e-4 on sums near -90 (fp32 summation "
    "order: plugtune applies the LM head to the answer positions' hidden states, TRL's fused head to chunks of "
    "every position).",
    "- **Tokenization.** The same in both: the message prompt rendered with the generation prompt, prompt + answer "
    "rendered whole, the answer starting where the two token lists part; with SmolLM2's template the answer is "
    "`text<|im_end|>\\n`, both tools training the newline the template writes after the end-of-turn token. "
    "No difference was found (plugtune strips an answer's surrounding whitespace for message prompts and TRL does "
    "not; these pairs have none).",
    "- **Curves.** The same batches in the same order from the same initial adapter (the `A` matrices drawn from "
    "the seed right before `get_peft_model` in both), so the curves agree to float rounding, step by step.",
    "- **Examples/s.** TRL 1.16 scores answers with its fused LM head; on a CPU (no Triton) it projects *every* "
    "padded position through the 49,152-word head, in tiles, and also computes the entropy, mean logit and top-1 "
    "per position for its logged metrics, in the policy's forward and its backward (which recomputes each tile). "
    "plugtune's `answer_log_probs` runs the head on the answer tokens only (a pre-hook on the head gathers their "
    "hidden states): about a quarter of the padded positions of these batches (22% on the stand-in pairs, 27% on "
    "the shipped ones, whose answers are longer), so the head, about a fifth of SmolLM2-135M's "
    "compute per position, runs on about a quarter of the positions. plugtune's CPU attention is also grouped-query "
    "SDPA. Length grouping is not a difference here: TRL trains on plugtune's length-grouped batches (with its "
    "default random sampler it would pad more). With `precomputed` neither tool runs the reference forward in the "
    "step; the pass before training (128 training pairs; plugtune also scores the 16 evaluation pairs, which it "
    "does in every mode) is timed on its own: \"with the reference pass\" counts it.",
    "- **Peak RSS.** Both hold one fp32 base and no reference copy (TRL disables the PEFT adapter, plugtune switches "
    "it off). Before the first step both processes hold under 1 GB (measured on the stand-in pairs: TRL about "
    "0.6 GB, plugtune about 0.9 GB with its tokenized splits, the evaluator and the plugin registry); the rest of "
    "each peak is the training step, whose difference is the head's buffers: "
"TRL's head tiles are fp32 `[positions, 32,768]` buffers (about 180 MB "
    "for a batch here) with the same-size temporaries of its torch-op fold on the CPU, over every position; "
    "plugtune's logits are `[answer tokens, 49,152]`. Run-to-run spread of a peak here is about 150 MB; "
    "`precomputed` is within it of `adapter_off` (its reference pass runs batches of twice the training batch, "
    "without gradients).",
]

WHY_MEMORY = [
    "`copy` is the only mode that holds a second model: a frozen deep copy of the fp32 base (538 MB of weights for "
    "SmolLM2-135M, embeddings tied to the head), while `adapter_off` scores the reference through the same resident "
    "base with the method's adapter switched off (peft's `disable_adapter` for LoRA, DoRA and prefix). The peaks "
    "differ by about that copy (within the run-to-run spread of about 150 MB); the steps cost the same (one no-grad "
    "reference forward each way). Full fine-tuning has no adapter to switch off: it precomputes (`auto`) or keeps "
    "the copy.",
]


def _median(runs: list[dict[str, Any]], value: Any) -> float:
    values = [value(r) for r in runs if "error" not in r]
    return statistics.median(values) if values else float("nan")


def section(results: dict[str, Any]) -> str:
    meta, s = results["meta"], Settings(**{**results["settings"], "target_modules": tuple(results["settings"]["target_modules"])})
    lines = ["## Preference tuning (DPO)", ""]
    if "trl" in results:
        t = results["trl"]
        runs, ids, prepared, meta = t["runs"], t["ids"], t["prepared"], {**results["meta"], **t.get("meta", {})}
        ok = {k: [r for r in v if "error" not in r] for k, v in runs.items()}
        lines += [
            f"### Against TRL {meta.get('trl_version', '?')}'s `DPOTrainer`", "",
            f"Command: `{meta['command']}`. Machine: {meta['machine']}, torch {meta['torch']}, transformers "
            f"{meta['transformers']}, peft {meta['peft']}; 1-minute load average {meta['load']:.1f} at the start. "
            f"SmolLM2-135M-Instruct fp32, {meta['data']}; DPO (sigmoid) beta {s.beta}, LoRA r {s.r} / alpha {s.alpha} / "
            f"dropout 0 on {', '.join(s.target_modules)}, batch {s.batch_size} pairs, {t['steps']} steps, AdamW "
            f"{s.learning_rate:g} (no weight decay, linear decay, no warm-up, clip 1.0), seed {s.seed}, max length "
            f"{s.max_length} (longest pair {prepared['longest']} tokens: nothing truncated), {s.threads} threads each, "
            f"gradient checkpointing off. TRL gets plugtune's batches in plugtune's order (sequential sampler), so step "
            f"*k* of both trains on the same {s.batch_size} pairs. {t['rounds']} rounds, the four runs of a round in "
            "the order of the table, each a fresh process; medians over the rounds.", "",
            f"Token ids: {ids.get('identical', 0)} of {ids.get('rows', 0)} training pairs have identical prompt, chosen and "
            f"rejected ids in TRL's prepared dataset and plugtune's `encode`"
            + (f" (first difference: {ids['first_difference']})" if ids.get("first_difference") else "")
            + f"; plugtune's labels cover exactly the answer ids in {ids.get('labels_cover_answer', 0)}.", "",
            "| run | loss at step 0 | chosen / rejected log-p at step 0 | loss at the last step | examples/s (median) "
            "| vs TRL | median step | peak RSS (median) | vs TRL | runs: examples/s, peak MB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        trl_eps = _median(ok["trl"], examples_per_second)
        trl_peak = _median(ok["trl"], lambda r: r["peak_rss_mb"])
        for kind in KINDS:
            if not ok.get(kind):
                lines.append(f"| {LABELS[kind]} | failed: {runs[kind][0].get('error', '?') if runs.get(kind) else 'not run'} "
                             "| | | | | | | | |")
                continue
            first, last = ok[kind][0]["records"][0], ok[kind][0]["records"][-1]
            eps, peak = _median(ok[kind], examples_per_second), _median(ok[kind], lambda r: r["peak_rss_mb"])
            with_ref = ""
            if kind.endswith("precomputed"):
                with_ref = f" ({_median(ok[kind], lambda r: examples_per_second(r, with_reference_pass=True)):.2f} with the reference pass)"
            each = "; ".join(f"{examples_per_second(r):.2f}, {r['peak_rss_mb']:,.0f}" for r in ok[kind])
            lines.append(
                f"| {LABELS[kind]} | {first['loss']:.6f} | {first['chosen_logp']:.4f} / {first['rejected_logp']:.4f} "
                f"| {last['loss']:.4f} | {eps:.2f}{with_ref} | {eps / trl_eps:.2f}x | {_median(ok[kind], median_step):.2f} s "
                f"| {peak:,.0f} MB | {peak - trl_peak:+,.0f} MB | {each} |")
        gaps = t.get("gaps", {})
        lines += ["", "Loss curves, step by step against TRL's (first round; `|plugtune - TRL|` over every step):", ""]
        for kind, gap in gaps.items():
            if gap.get("steps"):
                lines.append(f"- {LABELS[kind]}: loss gap max {gap['max']:.2e} (step {gap['at_step']}), mean {gap['mean']:.2e}; "
                             f"chosen log-p gap max {gap['chosen_logp']['max']:.2e}")
        lines += ["", *WHY_TRL, ""]
        curve = t.get("curve")
        if curve:
            lines += ["| step | " + " | ".join(LABELS[k] for k in curve["kinds"]) + " |",
                      "| ---: | " + " | ".join("---:" for _ in curve["kinds"]) + " |"]
            lines += [f"| {row[0]} | " + " | ".join(f"{v:.4f}" for v in row[1:]) + " |" for row in curve["rows"]]
            lines.append("")
    if "memory" in results:
        m = results["memory"]
        meta = {**results["meta"], **m.get("meta", {})}
        lines += [
            "### The reference without a second model: peak RSS", "",
            f"Command: `{meta['command']}` (its memory part). plugtune alone, the same DPO settings, {m['steps']} steps "
            f"each on {m['steps'] * s.batch_size} pairs of {meta.get('data', 'the same data')} (run "
            f"{meta.get('date', 'with the section above')}; prefix: 16 virtual tokens, rate 1e-2), each run a fresh process; "
            "`adapter_off` scores the reference with the method's adapter switched off (no second model), `copy` "
            "keeps a frozen copy of the base beside the trained one.", "",
            "| method | peak RSS, adapter_off | peak RSS, copy | copy - adapter_off | s/step adapter_off / copy |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for method, runs in m["runs"].items():
            by = {r["mode"]: r for r in runs}
            if any("error" in by.get(mode, {"error": "not run"}) for mode in MEMORY_MODES):
                lines.append(f"| {method} | failed: {next(by[x].get('error') for x in MEMORY_MODES if 'error' in by.get(x, {}))} | | | |")
                continue
            off, cp = by["adapter_off"], by["copy"]
            lines.append(f"| {method} | {off['peak_rss_mb']:,.0f} MB | {cp['peak_rss_mb']:,.0f} MB "
                         f"| {cp['peak_rss_mb'] - off['peak_rss_mb']:+,.0f} MB "
                         f"| {off['train_seconds'] / off['steps']:.2f} / {cp['train_seconds'] / cp['steps']:.2f} |")
        lines += ["", *WHY_MEMORY, ""]
    return "\n".join(lines).rstrip() + "\n"


def analyse(t: dict[str, Any]) -> None:
    """The first round's curves against TRL's, per plugtune run (and TRL's precomputing run)."""
    first = {k: next((r for r in v if "error" not in r), None) for k, v in t["runs"].items()}
    if first.get("trl") is None:
        return
    t["gaps"] = {k: {**curve_gap(r["records"], first["trl"]["records"]),
                     "chosen_logp": curve_gap(r["records"], first["trl"]["records"], "chosen_logp")}
                 for k, r in first.items() if r is not None and k != "trl"}
    kinds = [k for k in KINDS if first.get(k)]
    steps = [rec["step"] for rec in first["trl"]["records"]]
    every = max(1, len(steps) // 8)
    rows = []
    for step in steps[::every] + ([steps[-1]] if (len(steps) - 1) % every else []):
        rows.append([step, *(next(r["loss"] for r in first[k]["records"] if r["step"] == step) for k in kinds)])
    t["curve"] = {"kinds": kinds, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "trl", "memory"], default="all")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--trl-path", type=Path, default=Path(os.environ.get("PLUGTUNE_TRL_PATH", DEFAULT_TRL)))
    parser.add_argument("--write-only", action="store_true", help="rewrite the section from bench/results/dpo.json")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        spec = json.loads(args.job)
        print(json.dumps(JOBS[spec["tool"]](spec)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from methods import write_section

    if args.write_only:
        results = json.loads(RESULTS.read_text())
    else:
        import peft
        import torch
        import transformers

        s = Settings(steps=args.steps)
        train, test, data = data_files()
        command = "python bench/dpo_vs_trl.py" + (f" --part {args.part}" if args.part != "all" else "") + (
            f" --rounds {args.rounds}" if args.rounds != 2 else "") + (f" --steps {args.steps}" if args.steps != Settings.steps else "") + (
            f" --memory-steps {args.memory_steps}" if args.memory_steps != 3 else "")
        meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg()[0], "data": data,
                "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
                "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
        previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        results = {"settings": asdict(s), "meta": {**previous.get("meta", {}), **meta}}
        results.update({k: previous[k] for k in ("trl", "memory") if k in previous})
        version, why = check_trl(args.trl_path) if args.part in ("all", "trl") else (None, "")
        if why and args.part == "trl":
            raise SystemExit(f"error: {why}")
        if why:  # make bench without TRL: the memory part still runs, the comparison keeps its last figures
            print(f"skipping the TRL comparison: {why}", file=sys.stderr)
        if version:
            results["meta"]["trl_version"] = version
            results["trl"] = {"rounds": args.rounds, "steps": args.steps, "meta": meta,
                              **trl_part(s, args.rounds, args.steps, args.trl_path, train, test)}
            analyse(results["trl"])
        if args.part in ("all", "memory"):
            results["memory"] = {"steps": args.memory_steps, "meta": meta, "runs": memory_part(s, args.memory_steps, train, test)}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    text = section(results)
    write_section(text, key="dpo")
    print(text)


if __name__ == "__main__":
    main()
