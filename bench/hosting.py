"""The adapter host against plain peft on SmolLM2-135M (rank-8 LoRA on q_proj/v_proj): switch,
load, unload (also with 50 adapters resident), mixed-adapter batches, and generation latency
of the bare base, an unmerged and a merged LoRA adapter. Writes the "hosting" section of
BENCHMARKS.md.

    python bench/hosting.py            # or: make bench
    python bench/hosting.py --quick    # fewer repeats (a smoke run; does not write BENCHMARKS.md)

Adapters are made here from random init (peft's key names and LoraConfig; lora_B non-zero so
they change the output) into bench/out/hosting/ and are not committed. plugtune and peft run
on two copies of the same base in one process, alternating, so both see the same machine
load; every figure is a median of repeats.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from methods import write_section

from plugtune.serving.host import AdapterHost
from plugtune.plugins.methods.lora import random_lora_adapter
from plugtune.data.tasks import build_task

OUT = ROOT / "bench" / "out" / "hosting"
BASE = "smollm2-135m"
RESIDENT = 50
NOTE = ("Absolute times on this shared machine swing 2-4x between runs (other sessions' jobs kept the load average at 5-6 "
        "on its 2 cores); compare the ratios, which come from the same run with the contenders interleaved.")
PROMPTS = ["Write a short story about a lighthouse keeper.", "List five uses of a paperclip.",
           "Explain why the sky is blue.", "Give me a recipe for pancakes.",
           "Describe the city of Paris.", "What makes a good teacher?",
           "Summarise the plot of Hamlet.", "How do bees make honey?"]


def median_ms(fn: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def make_adapters(host: AdapterHost, count: int) -> list[Path]:
    """``count`` rank-8 q/v LoRA adapters with random A and B (made before any is loaded)."""
    dirs = [OUT / f"lora-{k:02d}" for k in range(count)]
    for k, path in enumerate(dirs):
        if not (path / "plugtune.json").exists():
            random_lora_adapter(path, host.base, host.task, r=8, seed=k)
    return dirs


def bench_lifecycle(host: AdapterHost, peft_model, dirs: list[Path], repeats: int) -> dict[str, float]:
    """Switch, load, hot-swap and unload: plugtune vs peft, with 2 and with 2+50 resident."""
    from peft.utils.hotswap import hotswap_adapter

    r: dict[str, float] = {}
    first, second, probe = dirs[0], dirs[1], dirs[2]
    for d in (first, second):
        host.load(d)
    peft_model.load_adapter(str(second), adapter_name=second.name)

    def measure(tag: str) -> None:
        flip = iter(range(10**9))
        r[f"plugtune switch{tag}"] = median_ms(lambda: host.use(first.name if next(flip) % 2 else second.name), repeats * 10)
        r[f"peft set_adapter{tag}"] = median_ms(lambda: peft_model.set_adapter(first.name if next(flip) % 2 else second.name), repeats * 10)
        r[f"plugtune load{tag}"] = median_ms(lambda: host.load(probe, "probe"), repeats, setup=lambda: _unload(host, "probe"))
        _unload(host, "probe")
        r[f"peft load_adapter{tag}"] = median_ms(lambda: peft_model.load_adapter(str(probe), adapter_name="probe"), repeats,
                                                 setup=lambda: "probe" in peft_model.peft_config and peft_model.delete_adapter("probe"))
        peft_model.set_adapter(first.name)
        r[f"peft hotswap_adapter{tag}"] = median_ms(lambda: hotswap_adapter(peft_model, str(probe), adapter_name=first.name), repeats)
        peft_model.load_adapter(str(first), adapter_name="restore")  # (the hot-swapped slot now holds probe's weights)
        r[f"plugtune unload{tag}"] = median_ms(lambda: host.unload("probe"), repeats, setup=lambda: host.load(probe, "probe"))
        r[f"peft delete_adapter{tag}"] = median_ms(lambda: peft_model.delete_adapter("probe"), repeats,
                                                   setup=lambda: peft_model.load_adapter(str(probe), adapter_name="probe"))
        peft_model.delete_adapter("restore")

    measure("")
    for d in dirs[3 : 3 + RESIDENT]:
        host.load(d)
        peft_model.load_adapter(str(d), adapter_name=d.name)
    measure(f" ({RESIDENT} more resident)")
    for d in dirs[3 : 3 + RESIDENT]:
        host.unload(d.name)
        peft_model.delete_adapter(d.name)
    return r


def _unload(host: AdapterHost, name: str) -> None:
    if name in host.adapters:
        host.unload(name)


def bench_mixed(host: AdapterHost, names: list[str], repeats: int, new_tokens: int) -> dict[str, float]:
    """Tokens/s generating for 8 rows over 4 adapters in one batch, vs the same 8 rows on one
    adapter, vs the 4 groups of 2 one after another (switching in between)."""
    rows = [names[i % 4] for i in range(8)]

    def one_batch(adapters) -> int:
        stream = host.stream(PROMPTS, adapters, max_new_tokens=new_tokens, raw=True, ignore_eos=True)
        for _ in stream:
            pass
        return sum(stream.completion_tokens)

    def sequential() -> int:
        total = 0
        for name in names:
            group = [p for p, n in zip(PROMPTS, rows) if n == name]
            host.use(name)
            stream = host.stream(group, max_new_tokens=new_tokens, raw=True, ignore_eos=True)
            for _ in stream:
                pass
            total += sum(stream.completion_tokens)
        return total

    runs: dict[str, list[float]] = {"mixed": [], "one": [], "sequential": []}
    for _ in range(repeats):  # interleaved, so machine load hits all three alike
        for label, fn in (("mixed", lambda: one_batch(rows)), ("one", lambda: one_batch(names[0])), ("sequential", sequential)):
            start = time.perf_counter()
            tokens = fn()
            runs[label].append(tokens / (time.perf_counter() - start))
    return {label: statistics.median(v) for label, v in runs.items()}


def bench_latency(host: AdapterHost, name: str, repeats: int, new_tokens: int) -> dict[str, float]:
    """ms per decode step for one prompt: bare base, LoRA unmerged, LoRA merged. The three
    decode side by side, taking turns step by step (merging before each merged step and
    unmerging after it, untimed), so load from other processes hits them alike; reported:
    the median step of each, and the median of the per-step ratios to the base."""
    prompt = ["Count slowly from one to one hundred, writing every number in words: one, two, three,"]
    times: dict[str, list[float]] = {"base": [], "unmerged": [], "merged": []}
    ratios: dict[str, list[float]] = {"unmerged": [], "merged": []}
    for k in range(repeats):
        host.merge(name)
        streams = {"merged": host.stream(prompt, name, max_new_tokens=new_tokens, raw=True, ignore_eos=True)}
        host.unmerge()
        streams["base"] = host.stream(prompt, None, max_new_tokens=new_tokens, raw=True, ignore_eos=True)
        streams["unmerged"] = host.stream(prompt, name, max_new_tokens=new_tokens, raw=True, ignore_eos=True)
        labels = list(times)
        for step in range(new_tokens):
            step_ms = {}
            for label in labels[(step + k) % 3:] + labels[: (step + k) % 3]:
                if label == "merged":
                    host.merge(name)
                start = time.perf_counter()
                next(streams[label])
                step_ms[label] = (time.perf_counter() - start) * 1000
                if label == "merged":
                    host.unmerge()
            if step:  # the first step is the prompt
                for label, ms in step_ms.items():
                    times[label].append(ms)
                for label, values in ratios.items():
                    values.append(step_ms[label] / step_ms["base"])
    result = {label: statistics.median(v) for label, v in times.items()}
    result.update({f"{label} ratio": statistics.median(v) for label, v in ratios.items()})
    return result


def section(r: dict[str, float], mixed: dict[str, float], latency: dict[str, float], args: argparse.Namespace) -> str:
    def row(what: str, ours: str, theirs: str, target: str) -> str:
        ratio = r[ours] / r[theirs]
        return f"| {what} | {r[ours]:.3f} ms | {r[theirs]:.3f} ms (`{theirs.split(' (')[0].removeprefix('peft ')}`) | {ratio:.3f}x | {target} |"

    lines = [
        "## Adapter host (issue 5)",
        "",
        (f"Command: `python bench/hosting.py` (part of `make bench`). Machine: {os.cpu_count()} CPU cores "
         f"(shared with other sessions while this ran; torch limited to 1 thread), {platform.processor() or platform.machine()}, "
         f"torch {torch.__version__}, fp32. Base `{BASE}`; adapters are rank-8 LoRA on q_proj/v_proj (60 layers, random init, "
         "1.9 MB files). plugtune and peft 0.21 run on two copies of the base in the same process; medians."),
        "",
        NOTE,
        "",
        "| operation | plugtune | peft | ratio | target |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for tag in ("", f" ({RESIDENT} more resident)"):
        lines += [
            row(f"switch between resident adapters{tag}", f"plugtune switch{tag}", f"peft set_adapter{tag}", "< 1 ms and <= 0.25x"),
            row(f"load from disk{tag}", f"plugtune load{tag}", f"peft hotswap_adapter{tag}", "<= 0.5x"),
            row(f"load from disk{tag}", f"plugtune load{tag}", f"peft load_adapter{tag}", "<= 0.1x"),
            row(f"unload{tag}", f"plugtune unload{tag}", f"peft delete_adapter{tag}", "(none)"),
        ]
    lines += [
        "",
        f"Mixed batch: 8 prompts, greedy, {args.new_tokens} new tokens each (KV cache), generated tokens per second.",
        "",
        "| batch | tokens/s | mixed / this |",
        "| --- | ---: | ---: |",
        f"| 8 rows over 4 LoRA adapters, one batch | {mixed['mixed']:.1f} | 1.00 |",
        f"| the same 8 rows on one adapter | {mixed['one']:.1f} | {mixed['mixed'] / mixed['one']:.2f} (target >= 0.8) |",
        f"| the 4 groups of 2 one after another, switching | {mixed['sequential']:.1f} | {mixed['mixed'] / mixed['sequential']:.2f} (target >= 2) |",
        "",
        (f"Generation latency, one prompt, greedy, {args.new_tokens * 2} new tokens (KV cache), {args.latency_repeats} runs: "
         "the three decode side by side, taking turns step by step (merge before and unmerge after each merged step, untimed); "
         "median ms per decode step, and the median of the per-step ratios to the base step taken at the same moment:"),
        "",
        "| model | ms/step | median per-step ratio to base |",
        "| --- | ---: | ---: |",
        f"| bare base | {latency['base']:.2f} | 1.000 |",
        f"| LoRA, unmerged | {latency['unmerged']:.2f} | {latency['unmerged ratio']:.3f} (target <= 1.10) |",
        f"| LoRA, merged (`host.merge`) | {latency['merged']:.2f} | {latency['merged ratio']:.3f} (target <= 1.03) |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--latency-repeats", type=int, default=9)
    args = parser.parse_args()
    repeats = 3 if args.quick else 15
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # the cores are shared: more threads than free cores makes every figure noise
    task = build_task(dict(type="causal-lm", prompt="{text}", response=""))
    host = AdapterHost.from_base(BASE, task, device="cpu")
    dirs = make_adapters(host, 3 + RESIDENT)

    from peft import PeftModel

    peft_base = AdapterHost.from_base(BASE, task, device="cpu").base.model
    peft_model = PeftModel.from_pretrained(peft_base, str(dirs[0]), adapter_name=dirs[0].name).eval()

    r = bench_lifecycle(host, peft_model, dirs, repeats)
    del peft_model, peft_base
    names = [host.load(d) for d in dirs[3:5]] + [dirs[0].name, dirs[1].name]
    mixed = bench_mixed(host, names, 2 if args.quick else 5, args.new_tokens)
    latency = bench_latency(host, names[0], 2 if args.quick else args.latency_repeats, args.new_tokens * 2)
    text = section(r, mixed, latency, args)
    print(text)
    if not args.quick:
        write_section(text, key="hosting")


if __name__ == "__main__":
    main()
