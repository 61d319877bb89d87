"""plugtune vs transformers.Trainer + peft LoRA on SST-2 SFT: real-token throughput, s/step,
peak RSS, loss; full fine-tuning's memory; base-model load time; the quickstart before and
after the compute savers. Writes the "throughput" section of BENCHMARKS.md.

    python bench/throughput.py              # or: make bench
    python bench/throughput.py --allocator  # the kept heap against glibc's defaults, alone (about 8 minutes)
    python bench/throughput.py --section    # both sections again from bench/out/throughput/*.json

The task: SmolLM2-135M-Instruct, LoRA r=8 (alpha 16, dropout 0.05) on q_proj/v_proj, 2,000
seeded SST-2 training sentences as ``Review: {sentence}\\nSentiment: {negative|positive}``
with the loss on the response (label word + EOS) only, batch 8, sequence cap 128, AdamW at
1e-3 with a linear schedule, gradient clipping at 1.0 (Trainer's default), `precision: auto` on the CPU,
WARMUP + TIMED steps of which the first WARMUP are left out of the timings. The peer is what
a user would write: ``Trainer`` with a pad-to-longest ``DataCollatorForSeq2Seq`` and default
settings otherwise, no evaluation. Peer and plugtune runs alternate, each in a fresh process
(peak RSS is that process's ``ru_maxrss``). "Real" tokens are the examples' own tokens
(attention_mask == 1), the same count for both whatever the padding.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "throughput"
# ../shared/data/sst2 (CI and the dev machines); THROUGHPUT_SST2 where it lies elsewhere (a GPU
# machine gets a copy carried in bench/out/sst2, see bench/gpu_check.sh)
SST2 = Path(os.environ.get("THROUGHPUT_SST2", ROOT.parent / "shared" / "data" / "sst2"))
WARMUP = 3
TIMED = int(os.environ.get("THROUGHPUT_TIMED_STEPS", "15"))  # smaller for a smoke test of the harness
ROUNDS = int(os.environ.get("THROUGHPUT_ROUNDS", "2"))
BATCH, CAP, LR, TRAIN_ROWS, DEV_ROWS = 8, 128, 1e-3, 2000, 64
WORDS = {"0": "negative", "1": "positive"}
PROMPT, RESPONSE = "Review: {sentence}\nSentiment:", " {label}"
PLAIN = ["training.group_by_length=false", "training.logits_on_labels_only=false", "training.cache_tokenized=false",
         "training.attention=sdpa"]
GLIBC_DEFAULTS = "training.malloc_mmap_threshold=0"  # glibc's allocator left alone: what ran before the kept heap
BEFORE_20 = ["training.packing=false", GLIBC_DEFAULTS]  # issue 20's CPU savers, off
LOW_MEMORY = "training.malloc_mmap_threshold=1048576"  # opt-in
DEVICE = os.environ.get("THROUGHPUT_DEVICE", "cpu")  # cuda: bench/gpu_check.sh's comparison (both sides in bf16)


# -- data and recipe -----------------------------------------------------------------------


def write_data() -> tuple[Path, Path]:
    """A seeded 2,000-row subset of SST-2 train and 64 dev rows, as TSV files both sides read."""
    OUT.mkdir(parents=True, exist_ok=True)
    if not (SST2 / "train.tsv").is_file() or not (SST2 / "dev.tsv").is_file():
        raise SystemExit(f"SST-2 not found in {SST2} (train.tsv, dev.tsv); set THROUGHPUT_SST2 to its folder")

    def rows(path: Path) -> list[str]:
        return [line for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]

    train, dev = OUT / "sst2-train-2k.tsv", OUT / "sst2-dev-64.tsv"
    train.write_text("sentence\tlabel\n" + "\n".join(random.Random(0).sample(rows(SST2 / "train.tsv"), TRAIN_ROWS)) + "\n")
    dev.write_text("sentence\tlabel\n" + "\n".join(rows(SST2 / "dev.tsv")[:DEV_ROWS]) + "\n")
    return train, dev


def write_recipe(train: Path, dev: Path) -> Path:
    import yaml

    recipe = {
        "name": "throughput-sst2",
        "base_model": "smollm2-135m",
        "task": {"type": "causal-lm", "prompt": PROMPT, "response": RESPONSE, "label_words": WORDS},
        "data": {"loader": "table", "options": {"path": str(train), "test_path": str(dev)}},
        "method": {"name": "lora", "options": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}},
        "evaluators": ["loss"],
        "training": {"max_steps": WARMUP + TIMED, "batch_size": BATCH, "learning_rate": LR, "scheduler": "linear",
                     "warmup_steps": 0, "max_grad_norm": 1.0, "seed": 0, "max_length": CAP, "eval_before": False,
                     "device": DEVICE},
    }
    path = OUT / "throughput-sst2.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# -- the peer, as a user would write it (runs in its own process) ---------------------------


def peer_main(train: str, dev: str) -> None:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from plugtune.artifacts.models import gguf_to_hf
    from plugtune.plugins.models.builtin import SMOLLM2
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    folder = gguf_to_hf(SMOLLM2.locate())  # the same safetensors plugtune loads
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))

    def tokenize(example: dict) -> dict:
        prompt = tokenizer(PROMPT.format(sentence=example["sentence"]))["input_ids"]
        response = tokenizer(RESPONSE.format(label=WORDS[str(example["label"])]), add_special_tokens=False)["input_ids"]
        response = response + [tokenizer.eos_token_id]
        ids = (prompt + response)[:CAP]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ([-100] * len(prompt) + response)[:CAP]}

    data = load_dataset("csv", data_files={"train": train, "dev": dev}, delimiter="\t", quoting=3)
    data = data.map(tokenize, remove_columns=["sentence", "label"])
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest")
    real_tokens: list[int] = []
    step_ends: list[float] = []
    cpu_ends: list[float] = []
    losses: list[float] = []

    def counting_collator(features: list[dict]) -> dict:  # instrumentation only: counts real tokens
        batch = collator(features)
        real_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():  # the step's kernels done, as plugtune's step record waits for its loss
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = TrainingArguments(output_dir=str(OUT / "peer"), per_device_train_batch_size=BATCH, max_steps=WARMUP + TIMED,
                             learning_rate=LR, logging_steps=1, save_strategy="no", report_to="none",
                             use_cpu=DEVICE == "cpu", bf16=DEVICE == "cuda", seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], data_collator=counting_collator,
                      callbacks=[Timer()])
    trainer.train()
    steps = [b - a for a, b in itertools.pairwise(step_ends)]
    dev_loss = held_out_loss(model, [data["dev"][i] for i in range(len(data["dev"]))], collator)
    cpu = [b - a for a, b in itertools.pairwise(cpu_ends)]
    report(steps, real_tokens[: len(steps)], cpu, losses, dev_loss, threads=torch.get_num_threads(), step_list=steps)


def held_out_loss(model, rows: list[dict], collator) -> float:
    """Mean cross-entropy over the dev rows' response tokens (plugtune's ``loss`` metric)."""
    import torch
    from plugtune.training.loss import full_logits_token_losses

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            batch = {k: v.to(model.device) for k, v in collator(rows[start : start + 16]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += float(full_logits_token_losses(logits, batch["labels"]).sum())
            count += int((batch["labels"][:, 1:] != -100).sum())
    return total / count


SPIKE = 2.5  # a timed step slower per real token than this many times the run's median is a contention spike


def rates(step_seconds: list[float], tokens: list[int], cpu_seconds: list[float]) -> dict[str, float]:
    """Throughput over the timed steps. The machine is shared, so besides the plain totals
    (``raw_*``) the wall-clock figures leave out steps that took over SPIKE times the run's
    median time per real token (another job took the cores); how many is reported. The CPU
    figures (process CPU time of all threads) measure the work itself and hardly depend on
    what else runs."""
    seconds, counts, cpu = step_seconds[WARMUP:], tokens[WARMUP:], cpu_seconds[WARMUP:]
    per_token = [t / max(n, 1) for t, n in zip(seconds, counts)]
    limit = SPIKE * statistics.median(per_token)
    kept = [i for i, v in enumerate(per_token) if v <= limit]
    return {
        "real_tokens_per_s": sum(counts[i] for i in kept) / sum(seconds[i] for i in kept),
        "seconds_per_step": statistics.mean(seconds[i] for i in kept),
        "raw_real_tokens_per_s": sum(counts) / sum(seconds),
        "raw_seconds_per_step": statistics.mean(seconds),
        "real_tokens_per_cpu_s": sum(counts) / sum(cpu),
        "cpu_seconds_per_step": statistics.mean(cpu),
        "timed_steps": len(seconds),
        "spikes_left_out": len(seconds) - len(kept),
    }


def report(step_seconds: list[float], tokens: list[int], cpu_seconds: list[float], losses: list[float], dev_loss: float,
           **extra: object) -> None:
    print(json.dumps({
        **rates(step_seconds, tokens, cpu_seconds),
        "steps": len(step_seconds),
        "final_loss": statistics.mean(losses[-5:]),
        "dev_loss": dev_loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **extra,
    }))


# -- per-example loss parity and load times (own processes) ---------------------------------


def seeded_lora_rows(count: int = 32) -> tuple:
    """The base with a seeded non-zero LoRA (eval mode), the first ``count`` training rows
    encoded, and the pad id: what the parity checks compare losses on."""
    import plugtune
    import torch
    from peft import LoraConfig, get_peft_model
    from plugtune.artifacts.models import load_base
    from plugtune.data.encoding import encode_split

    recipe = plugtune.load_recipe(str(OUT / "throughput-sst2.yaml"))
    base = load_base("smollm2-135m", recipe.task)
    model = get_peft_model(base.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.eval()
    examples = recipe.loader.build().load(0)["train"][:count]
    rows, _ = encode_split(examples, recipe.task, base.tokenizer, CAP, "train")
    return model, rows, base.tokenizer.pad_token_id


def parity_main(train: str) -> None:
    """Per-example loss of 32 training rows: the peer's way (pad-to-longest batches of 8 in file
    order, full logits) vs plugtune's (length-grouped batches, logits at label positions only),
    same model (the base with a seeded non-zero LoRA)."""
    import torch
    from plugtune.data.batching import epoch_batches
    from plugtune.data.labels import per_example_loss
    from plugtune.training.loss import full_logits_token_losses, label_token_losses
    from plugtune.data.tasks import collate

    model, rows, pad = seeded_lora_rows()
    plain, head_only, grouped = torch.zeros(len(rows)), torch.zeros(len(rows)), torch.zeros(len(rows))
    with torch.no_grad():
        for start in range(0, len(rows), BATCH):
            batch = collate(rows[start : start + BATCH], pad, False)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            token_losses = full_logits_token_losses(logits, batch["labels"])
            plain[start : start + BATCH] = token_losses.sum(-1) / (batch["labels"][:, 1:] != -100).sum(-1)
            token_losses, positions = label_token_losses(model, batch)
            head_only[start : start + BATCH] = per_example_loss(token_losses, positions)
        for indices in epoch_batches(len(rows), BATCH, seed=0, epoch=0, lengths=[len(r["input_ids"]) for r in rows]):
            batch = collate([rows[i] for i in indices], pad, False)
            token_losses, positions = label_token_losses(model, batch)
            grouped[indices] = per_example_loss(token_losses, positions)
    print(json.dumps({"examples": len(rows), "max_abs_diff": float((plain - grouped).abs().max()),
                      "head_only_max_abs_diff": float((plain - head_only).abs().max()),
                      "grouping_max_abs_diff": float((head_only - grouped).abs().max()),
                      "max_rel_diff": float(((plain - grouped).abs() / plain).max()), "mean_loss": float(plain.mean())}))


def load_times_main() -> None:
    """Base-model load: straight from the GGUF (what every run would pay without the cache)
    vs plugtune's cached safetensors conversion."""
    import torch
    from plugtune.artifacts.models import gguf_to_hf
    from plugtune.plugins.models.builtin import SMOLLM2
    from transformers import AutoModelForCausalLM

    gguf = SMOLLM2.locate()
    folder = gguf_to_hf(gguf)
    started = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cached = time.perf_counter() - started
    started = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    from_gguf = time.perf_counter() - started
    print(json.dumps({"gguf_seconds": from_gguf, "cached_seconds": cached}))


# -- the harness -------------------------------------------------------------------------


def child(args: list[str]) -> dict:
    cmd = [sys.executable, *args]
    print("$", " ".join(Path(a).name if a.startswith("/") else a for a in cmd[1:]), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plugtune_run(recipe: Path, label: str, overrides: list[str]) -> dict:
    out = OUT / label
    result = child([str(ROOT / "bench" / "run_one.py"), str(recipe), *overrides, f"output.dir={out}"])
    result["precision"] = json.loads((out / "plugtune.json").read_text())["training"].get("precision", {})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    if not train or "step_seconds" not in train[0]:
        return result
    return {**result, **rates([r["step_seconds"] for r in train], [r["tokens"] for r in train], [r["step_cpu_seconds"] for r in train]),
            "final_loss": statistics.mean(r["loss"] for r in train[-5:]), "dev_loss": result["after"]["loss"],
            "step_list": [r["step_seconds"] for r in train]}


def machine() -> str:
    """This machine for a section's header, taken when a run starts: cores, the CPU's name,
    whether it has native bf16, and the 1-minute load average (other jobs on shared cores)."""
    from plugtune.kernel.hardware import cpu_name, native_bf16

    return (f"{os.cpu_count()} CPU cores, {cpu_name()} (native bf16: {'yes' if native_bf16() else 'no'}), "
            f"1-minute load average {os.getloadavg()[0]:.1f} at the start")


def chosen_precision(runs: list[dict]) -> str:
    """What ``precision: auto`` chose in plugtune's runs, with the range of its start-up
    probe's bf16 speed-ups where it probed (their manifests' ``training.precision``)."""
    records = [r.get("precision", {}) for r in runs]
    chosen = sorted({p.get("chosen", "") for p in records} - {""})
    if not chosen:
        return "not recorded"
    speeds = sorted(p["bf16_speedup"] for p in records if "bf16_speedup" in p)
    text = " or ".join(chosen) + (" in every run" if len(chosen) == 1 else "")
    if speeds:
        return text + f": its start-up probe measured bf16 at {speeds[0]:.2f}-{speeds[-1]:.2f}x fp32's speed"
    return text + f": {records[0].get('reason', '')}"


def usage_exit(doc: str | None) -> None:
    """A benchmark script's answer to arguments it does not take (``--help``, a typo): its
    docstring and exit 0 for help, 2 otherwise, rather than starting a long run."""
    print((doc or "").strip(), file=sys.stderr)
    sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)


def mean_of(runs: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in runs)


def section(peer: list[dict], ours: list[dict], ablation: list[tuple[str, dict]], full: dict, parity: dict,
            loads: dict, quick: dict, host: str = "") -> str:
    ratio_tps = mean_of(ours, "real_tokens_per_s") / mean_of(peer, "real_tokens_per_s")
    ratio_step = mean_of(peer, "seconds_per_step") / mean_of(ours, "seconds_per_step")
    lines = [
        "## Throughput: plugtune vs Trainer + PEFT (issue 7)",
        "",
        f"Command: `python bench/throughput.py` (part of `make bench`). Machine: {host or machine()}, `precision: auto` ({chosen_precision(ours)}; the precision sections below). The "
        "cores are shared with other jobs (absolute figures are noisy when the load is high; peer and plugtune runs "
        "alternate so both see the same load, and process CPU time, which counts the work done rather than the waiting, is reported beside wall-clock time).",
        "",
        f"SmolLM2-135M-Instruct, LoRA r=8 on q_proj/v_proj, {TRAIN_ROWS:,} seeded SST-2 training sentences as "
        "`Review: {sentence}\\nSentiment: {negative|positive}` (loss on the label word + EOS), batch "
        f"{BATCH}, sequence cap {CAP}, lr {LR}, {WARMUP + TIMED} steps per run of which the first {WARMUP} are not timed, "
        f"{len(peer)} runs each, alternating, each in a fresh process. Peer: `transformers.Trainer` + peft LoRA, "
        "pad-to-longest `DataCollatorForSeq2Seq`, default settings otherwise. Real tokens = the examples' own tokens "
        "(attention_mask == 1). Dev loss = mean cross-entropy over the response tokens of 64 SST-2 dev rows after training.",
        "",
        "| run | real tokens per CPU-second | CPU-s/step | real tokens/s (wall) | s/step (wall) "
        "| all timed steps: tokens/s, s/step (spikes left out) | peak RSS | final train loss (last 5 steps) | dev loss after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, (p, o) in enumerate(zip(peer, ours), 1):
        for label, r in ((f"Trainer + PEFT, run {i}", p), (f"plugtune, run {i}", o)):
            lines.append(f"| {label} | {r['real_tokens_per_cpu_s']:.1f} | {r['cpu_seconds_per_step']:.3f} "
                         f"| {r['real_tokens_per_s']:.1f} | {r['seconds_per_step']:.3f} "
                         f"| {r['raw_real_tokens_per_s']:.1f}, {r['raw_seconds_per_step']:.3f} ({r['spikes_left_out']} of {r['timed_steps']}) "
                         f"| {r['peak_rss_mb']:.0f} MB | {r['final_loss']:.4f} | {r['dev_loss']:.4f} |")
    lines += [
        "",
        f"**plugtune / peer: {mean_of(ours, 'real_tokens_per_cpu_s') / mean_of(peer, 'real_tokens_per_cpu_s'):.2f}x real tokens "
        f"per CPU-second; wall clock {ratio_tps:.2f}x real tokens/s, {ratio_step:.2f}x faster per step, "
        f"{mean_of(ours, 'peak_rss_mb') / mean_of(peer, 'peak_rss_mb'):.2f}x peak RSS** (means of the runs; target 1.5x tokens/s). "
        f"Over all timed steps, spikes included: {mean_of(ours, 'raw_real_tokens_per_s') / mean_of(peer, 'raw_real_tokens_per_s'):.2f}x "
        f"real tokens/s. Real tokens/s and s/step leave out contention spikes: timed steps that took over {SPIKE}x the run's "
        "median time per real token (other jobs on the shared cores); the count is in the table.",
        "",
        f"Per-example loss: {parity['examples']} training rows through the base + a seeded non-zero LoRA, the peer's way "
        "(pad-to-longest batches in file order, full logits) and plugtune's (length-grouped batches, LM head at the "
        f"label positions only): max |difference| {parity['max_abs_diff']:.2e}, max relative {parity['max_rel_diff']:.1e} "
        f"(mean loss {parity['mean_loss']:.4f}); of which the LM head at label positions alone (same batches) "
        f"{parity['head_only_max_abs_diff']:.2e} and regrouping alone {parity['grouping_max_abs_diff']:.2e}. These are fp32 "
        "rounding differences (other matrix shapes, other summation order through 30 layers), not a different loss; "
        "on the tiny test model the same comparisons agree within 1e-5 (tests/test_performance.py).",
        "",
        f"Which change bought how much (same settings; each row the mean of {len(peer)} runs, the configurations taking turns):",
        "",
        "| plugtune configuration | real tokens per CPU-second | vs peer | real tokens/s (wall) | vs peer | peak RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    peer_tps, peer_cpu = mean_of(peer, "real_tokens_per_s"), mean_of(peer, "real_tokens_per_cpu_s")
    for label, r in ablation:
        lines.append(f"| {label} | {r['real_tokens_per_cpu_s']:.1f} | {r['real_tokens_per_cpu_s'] / peer_cpu:.2f}x "
                     f"| {r['real_tokens_per_s']:.1f} | {r['real_tokens_per_s'] / peer_tps:.2f}x | {r['peak_rss_mb']:.0f} MB |")
    lora_rss = mean_of(ours, "peak_rss_mb")
    lines += [
        "",
        f"Full fine-tuning vs LoRA (plugtune, same benchmark, {full['steps']} steps): full {full['peak_rss_mb']:.0f} MB peak RSS, "
        f"{full['real_tokens_per_s']:.1f} real tokens/s; LoRA {lora_rss:.0f} MB: **LoRA / full = {lora_rss / full['peak_rss_mb']:.3f}x** "
        f"(target at most 0.45x: {'met' if lora_rss / full['peak_rss_mb'] <= 0.45 else 'missed'}). With the opt-in "
        f"`{LOW_MEMORY}` on both sides: full {full['low_memory']['peak_rss_mb']:.0f} MB, LoRA "
        f"{ablation[-1][1]['peak_rss_mb']:.0f} MB, {ablation[-1][1]['peak_rss_mb'] / full['low_memory']['peak_rss_mb']:.3f}x. "
        "It gives freed activations back to the OS instead of keeping them in a heap that batches of other lengths "
        "fragment (core/training/runtime.py); the last row of the table above, against the one before it, shows what it costs in speed.",
        "",
        f"Base-model load (SmolLM2-135M): from the GGUF file {loads['gguf_seconds']:.2f} s, from plugtune's cached "
        f"safetensors conversion {loads['cached_seconds']:.2f} s.",
        "",
        f"Quickstart (`recipes/quickstart.yaml`, {quick['after']['steps']} steps): training time before (main's behaviour: "
        f"`{' '.join([*PLAIN, *BEFORE_20])}`) {quick['before']['train_seconds']:.1f} s, after (defaults) {quick['after']['train_seconds']:.1f} s "
        f"({quick['before']['train_seconds'] / quick['after']['train_seconds']:.2f}x); whole command "
        f"{quick['before']['wall_seconds']:.1f} s -> {quick['after']['wall_seconds']:.1f} s; held-out accuracy "
        f"{quick['before']['after'].get('accuracy', float('nan')):.4f} -> {quick['after']['after'].get('accuracy', float('nan')):.4f}.",
        "",
        "GPU (bf16, SDPA defaults): not measured; no GPU was available to this run.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from methods import write_section

    host = machine()
    train, dev = write_data()
    recipe = write_recipe(train, dev)
    me = str(Path(__file__).resolve())
    parity = child([me, "--parity", str(train)])
    peer, ours = [], []
    for _ in range(ROUNDS):
        peer.append(child([me, "--peer", str(train), str(dev)]))
        ours.append(plugtune_run(recipe, "plugtune", []))
    steps = [  # each adds one compute saver; the configurations take turns, ROUNDS times, and the table shows means
        ("plain (before issue 7: padded random batches, full logits, transformers' SDPA with repeated keys/values)",
         "plain", [*PLAIN, *BEFORE_20]),
        ("+ length-grouped batches", "grouped", [*PLAIN[1:], *BEFORE_20]),
        ("+ LM head and loss at label positions", "label-head", [*PLAIN[3:], *BEFORE_20]),
        ("+ grouped-query SDPA, keys/values not repeated", "gqa", BEFORE_20),
        ("+ packing (issue 20)", "packed", BEFORE_20[1:]),
        ("+ freed memory kept for the next step (issue 20; plugtune default)", "default", []),
        (f"opt-in instead: `{LOW_MEMORY}`", "low-memory", [LOW_MEMORY]),
    ]
    runs: dict[str, list[dict]] = {name: [] for _, name, _ in steps}
    for _ in range(ROUNDS):
        for _, name, overrides in steps:
            runs[name].append(plugtune_run(recipe, f"ablation-{name}", overrides))
    ablation = [(label, {key: mean_of(runs[name], key) for key in ("real_tokens_per_cpu_s", "real_tokens_per_s", "peak_rss_mb")})
                for label, name, _ in steps]
    full_run = ["method.name=full", "method.options={}", f"training.max_steps={min(8, WARMUP + TIMED)}"]
    full = plugtune_run(recipe, "full", full_run)
    full["low_memory"] = plugtune_run(recipe, "full-low-memory", [*full_run, LOW_MEMORY])
    loads = child([me, "--load-times"])
    quick = {
        "before": child([str(ROOT / "bench" / "run_one.py"), "recipes/quickstart.yaml", *PLAIN, *BEFORE_20, f"output.dir={OUT / 'qs-before'}"]),
        "after": child([str(ROOT / "bench" / "run_one.py"), "recipes/quickstart.yaml", f"output.dir={OUT / 'qs-after'}"]),
    }
    (OUT / "throughput.json").write_text(json.dumps({"peer": peer, "plugtune": ours, "ablation": ablation, "full": full,
                                                     "parity": parity, "loads": loads, "quickstart": quick,
                                                     "machine": host}, indent=2))
    text = section(peer, ours, ablation, full, parity, loads, quick, host)
    write_section(text, key="throughput")
    print(text)


ALLOCATOR_ROUNDS = int(os.environ.get("THROUGHPUT_ALLOCATOR_ROUNDS", "4"))
ALLOCATOR_CONFIGS = [  # label, overrides; each kept-heap row is followed by its glibc-defaults twin
    ("`precision: auto`, freed memory kept (the defaults)", []),
    ("`precision: auto`, glibc's allocator defaults", [GLIBC_DEFAULTS]),
    ("`precision: fp32`, freed memory kept", ["training.precision=fp32"]),
    ("`precision: fp32`, glibc's allocator defaults", ["training.precision=fp32", GLIBC_DEFAULTS]),
]


def allocator_main() -> None:
    """The kept heap (``malloc_mmap_threshold: auto``, the default) against glibc's defaults
    (``0``), under the default precision and under fp32: ALLOCATOR_ROUNDS rounds, the order
    reversed every other round, each run a fresh process. Beside tokens/s and tokens per
    CPU-second, the run's minor page faults (the process's ``ru_minflt``: loading and the
    final evaluation included), which do not depend on what else runs on the machine.
    Writes the "allocator" section of BENCHMARKS.md."""
    from methods import write_section

    host = machine()
    train, dev = write_data()
    recipe = write_recipe(train, dev)
    runs: dict[str, list[dict]] = {label: [] for label, _ in ALLOCATOR_CONFIGS}
    numbered = list(enumerate(ALLOCATOR_CONFIGS))
    for round_ in range(ALLOCATOR_ROUNDS):
        for number, (label, overrides) in numbered if round_ % 2 == 0 else numbered[::-1]:
            faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
            result = plugtune_run(recipe, f"allocator-{number}", overrides)
            result["minor_faults"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults
            runs[label].append(result)
    (OUT / "allocator.json").write_text(json.dumps({"machine": host, "runs": runs}, indent=2))
    text = allocator_section(runs, host)
    write_section(text, key="allocator")
    print(text)


def allocator_section(runs: dict[str, list[dict]], host: str = "") -> str:
    lines = ["## The kept heap against glibc's allocator defaults (issue 20)", "",
             f"Command: `python bench/throughput.py --allocator`. Machine: {host or machine()}; `precision: auto` chose {chosen_precision(runs[ALLOCATOR_CONFIGS[0][0]])}. "
             f"The throughput benchmark's LoRA run (above), {len(runs[ALLOCATOR_CONFIGS[0][0]])} rounds, the configurations taking turns (the order "
             "reversed every other round), each run a fresh process. Minor page faults: the whole process's (`ru_minflt`: "
             "loading and the final evaluation included).", "",
             "| configuration | real tokens/s (wall) | each round | real tokens per CPU-second | minor page faults | peak RSS |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, _ in ALLOCATOR_CONFIGS:
        rs = runs[label]
        rounds = ", ".join(f"{r['real_tokens_per_s']:.0f}" for r in rs)
        lines.append(f"| {label} | {mean_of(rs, 'real_tokens_per_s'):.1f} | {rounds} "
                     f"| {mean_of(rs, 'real_tokens_per_cpu_s'):.1f} | {mean_of(rs, 'minor_faults') / 1e3:,.0f}K "
                     f"| {mean_of(rs, 'peak_rss_mb'):.0f} MB |")
    lines.append("")
    for (kept, _), (glibc, _) in zip(ALLOCATOR_CONFIGS[::2], ALLOCATOR_CONFIGS[1::2]):
        a, b = runs[kept], runs[glibc]
        lines.append(f"* {kept.split(',')[0]}: kept / glibc's defaults {mean_of(a, 'real_tokens_per_s') / mean_of(b, 'real_tokens_per_s'):.2f}x "
                     f"real tokens/s, {mean_of(a, 'real_tokens_per_cpu_s') / mean_of(b, 'real_tokens_per_cpu_s'):.2f}x per CPU-second, "
                     f"{mean_of(a, 'minor_faults') / mean_of(b, 'minor_faults'):.2f}x the page faults.")
    return "\n".join(lines) + "\n"


def compare_main() -> None:
    """Only the peer against plugtune's defaults, ROUNDS each, alternating (bench/gpu_check.sh
    runs it with THROUGHPUT_DEVICE=cuda); prints one JSON line with the means and the ratio."""
    train, dev = write_data()
    recipe = write_recipe(train, dev)
    me = str(Path(__file__).resolve())
    peer, ours = [], []
    for _ in range(ROUNDS):
        peer.append(child([me, "--peer", str(train), str(dev)]))
        ours.append(plugtune_run(recipe, f"compare-{DEVICE}", []))
    keys = ("real_tokens_per_s", "seconds_per_step", "dev_loss")
    result = {"device": DEVICE, "peer": {k: mean_of(peer, k) for k in keys}, "plugtune": {k: mean_of(ours, k) for k in keys}}
    result["ratio_real_tokens_per_s"] = result["plugtune"]["real_tokens_per_s"] / result["peer"]["real_tokens_per_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compare"]:
        compare_main()
    elif sys.argv[1:2] == ["--allocator"]:
        allocator_main()
    elif sys.argv[1:2] == ["--section"]:  # the sections again from the last runs' saved results
        from methods import write_section

        if (OUT / "throughput.json").exists():
            saved = json.loads((OUT / "throughput.json").read_text())
            write_section(section(saved["peer"], saved["plugtune"], saved["ablation"], saved["full"], saved["parity"],
                                  saved["loads"], saved["quickstart"], saved.get("machine", "")), key="throughput")
        if (OUT / "allocator.json").exists():
            saved = json.loads((OUT / "allocator.json").read_text())
            write_section(allocator_section(saved["runs"], saved.get("machine", "")), key="allocator")
    elif sys.argv[1:2] == ["--peer"]:
        peer_main(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["--parity"]:
        parity_main(sys.argv[2])
    elif sys.argv[1:2] == ["--load-times"]:
        load_times_main()
    elif sys.argv[1:]:
        usage_exit(__doc__)
    else:
        main()
