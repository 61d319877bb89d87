"""fp32 or bf16 on this CPU, measured: the matrix-product limit, the SFT throughput benchmark in
each precision (beside the peer), the achieved FLOP/s as a fraction of the limit, and the
per-example loss in bf16 against fp32. Writes the "precision" section of BENCHMARKS.md on a CPU
with native bf16, the "precision-no-bf16" section on one without (AVX2-only: there bf16 is
emulated, about 75x slower than fp32 here, so auto is fp32: only the default, the default with
glibc's allocator defaults (``training.malloc_mmap_threshold=0``: what ran before the kept heap,
core/training/runtime.py) and the peer are run). The quickstart runs before (fp32 where bf16 is
native, glibc's allocator defaults) and after (the defaults).

    python bench/precision.py            # about 15 minutes on 2 cores (12 without native bf16)
    python bench/precision.py --section  # the sections again from bench/out/throughput/precision*.json
    python bench/precision.py --attention  # torch's CPU attention, fp32 against bf16 (a few seconds)

* **The limit:** the sustained rate of ``(tokens, hidden) @ (hidden, intermediate)`` and back at
  SmolLM2-135M's shapes (576, 1536), for the tokens one of the benchmark's batches computes, in
  fp32 and in bf16 (:func:`plugtune.training.estimate.matmul_rate`: the best of a few repeats).
* **The benchmark:** ``bench/throughput.py``'s (SmolLM2-135M, LoRA r 8 on q/v, SST-2 as
  label words, batch 8, 18 steps of which 3 untimed), run with ``training.precision`` fp32,
  bf16 with ``training.base_dtype=fp32`` (autocast over fp32 weights), bf16 with
  ``training.base_dtype=bf16`` (the frozen base held in bf16, the adapter and optimizer in fp32:
  what ``auto`` does where it chooses bf16), and ``auto``; the peer (Trainer + peft,
  its defaults) in the same rounds. Every run is a fresh process, the configurations take turns.
* **FLOPs:** counted from the model's shapes for the positions the model ran over (padding
  included, ``computed_tokens`` in metrics.jsonl): per position, the decoder's linear layers
  forward (2 x their weights) and the gradient of their input backward (2 x; the frozen weights
  get no gradient; LoRA's own products are under 1% and left out), attention's two products
  (2 x 2 x length x hidden per layer forward, twice that backward), and the LM head at the label
  positions only (6 x its weights per label token, real tokens minus prompt tokens being
  unknown here: 2 per row, the label word and EOS).
* **Loss parity:** 32 training rows through the base with a seeded non-zero LoRA: per-example
  loss in fp32, under bf16 autocast, and with bf16 base weights under autocast.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import throughput  # noqa: E402  (the benchmark's data, recipe, peer and harness)

ROUNDS = int(os.environ.get("PRECISION_ROUNDS", "2"))
CONFIGS = [  # label, overrides
    ("fp32", ["training.precision=fp32"]),
    ("bf16 autocast, fp32 base weights", ["training.precision=bf16", "training.base_dtype=fp32"]),
    ("bf16 autocast, bf16 base weights", ["training.precision=bf16", "training.base_dtype=bf16"]),
    ("auto (the default)", []),
]
NO_BF16_CONFIGS = [  # a CPU without native bf16 emulates it (about 75x slower here): auto is fp32 there
    ("auto, glibc's allocator defaults (before the kept heap)", [throughput.GLIBC_DEFAULTS]),
    ("auto (the default: fp32 on this CPU)", []),  # last: the default the target is read from
]
LABEL_TOKENS_PER_ROW = 2


def configs_for(native_bf16: bool) -> list[tuple[str, list[str]]]:
    """The configurations measured on this CPU: the bf16 ones only where it has bf16 instructions."""
    return CONFIGS if native_bf16 else NO_BF16_CONFIGS


def quickstart_configs(native_bf16: bool) -> dict[str, list[str]]:
    """The quickstart before and after issue 20's defaults: fp32 with glibc's allocator defaults
    (where auto is fp32 anyway, only the allocator) against auto."""
    before = ["training.precision=fp32", throughput.GLIBC_DEFAULTS] if native_bf16 else [throughput.GLIBC_DEFAULTS]
    return {"before": before, "auto": []}


def saved_results(native_bf16: bool) -> Path:
    return throughput.OUT / ("precision.json" if native_bf16 else "precision-no-bf16.json")


def section_key(native_bf16: bool) -> str:
    """BENCHMARKS.md keeps one section per kind of CPU: one run does not overwrite the other's."""
    return "precision" if native_bf16 else "precision-no-bf16"


def flops_per_step(config: dict, record: dict, rows: int) -> float:
    """Forward + backward FLOPs of one LoRA step (see the module docstring)."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    kv_width = h // heads * kv
    linear = layers * (2 * h * h + 2 * h * kv_width + 3 * h * i)
    positions = record["computed_tokens"]
    length = positions / max(rows, 1)
    attention = layers * 2 * 2 * length * h
    head = 6 * h * config["vocab_size"] * LABEL_TOKENS_PER_ROW * rows
    return positions * (4 * linear + 3 * attention) + head


def smollm2_config() -> dict:
    """SmolLM2-135M's config.json, from plugtune's cached conversion of the packaged GGUF."""
    from plugtune.artifacts.models import gguf_to_hf
    from plugtune.plugins.models.builtin import SMOLLM2

    return json.loads((Path(gguf_to_hf(SMOLLM2.locate())) / "config.json").read_text())


def achieved(label: str, out: Path, config: dict) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"][throughput.WARMUP:]
    flops = sum(flops_per_step(config, r, throughput.BATCH) for r in train)
    return {"flops_per_s": flops / sum(r["step_seconds"] for r in train),
            "flops_per_cpu_s": flops / sum(r["step_cpu_seconds"] for r in train)}


def probe_main() -> None:
    """The machine's matmul rate in fp32 and bf16 at SmolLM2's shapes, and what it reports."""
    import torch

    from plugtune.kernel.hardware import cpu_flags, cpu_name, native_bf16
    from plugtune.training.estimate import matmul_rate
    from plugtune.training.runtime import choose_threads

    threads = choose_threads(None)
    rows = 8 * 22  # a batch of 8 at about the benchmark's mean padded length (computed_tokens: 3056 in 18 steps)
    rates = {dtype: matmul_rate(rows, 576, 1536, dtype, "cpu", threads) for dtype in ("float32", "bfloat16")}
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx2")))
    print(json.dumps({"fp32": rates["float32"], "bf16": rates["bfloat16"], "threads": threads, "rows": rows,
                      "native_bf16": native_bf16(), "flags": flags, "torch": torch.__version__,
                      "cpu": cpu_name()}))


def attention_main() -> None:
    """torch's CPU attention (SDPA with a causal mask and grouped-query keys, forward and
    backward) at the benchmark's shapes, fp32 against bf16: why bf16 runs keep it in fp32."""
    import time

    import torch

    def best_ms(dtype: torch.dtype, length: int) -> float:
        q = torch.randn(8, 9, length, 64, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(8, 3, length, 64, dtype=dtype, requires_grad=True) for _ in range(2))
        mask = torch.ones(8, 1, length, length, dtype=torch.bool).tril()
        times = []
        for _ in range(12):
            start = time.perf_counter()
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).sum().backward()
            times.append(time.perf_counter() - start)
        return min(times[2:]) * 1000

    rows = {length: {"fp32_ms": best_ms(torch.float32, length), "bf16_ms": best_ms(torch.bfloat16, length)}
            for length in (48, 96)}
    print(json.dumps({str(n): {**r, "bf16_slower": r["bf16_ms"] / r["fp32_ms"]} for n, r in rows.items()}))


def parity_main(train: str) -> None:
    """Per-example loss of 32 training rows in fp32, under bf16 autocast, and with bf16 base
    weights under autocast (the same model: the base with a seeded non-zero LoRA)."""
    import torch

    from plugtune.data.labels import per_example_loss
    from plugtune.data.tasks import collate
    from plugtune.training.loss import label_token_losses

    model, rows, pad = throughput.seeded_lora_rows()

    def losses() -> torch.Tensor:
        out = torch.zeros(len(rows))
        for start in range(0, len(rows), throughput.BATCH):
            batch = collate(rows[start : start + throughput.BATCH], pad, False)
            token_losses, positions = label_token_losses(model, batch)
            out[start : start + throughput.BATCH] = per_example_loss(token_losses.float(), positions)
        return out

    with torch.no_grad():
        fp32 = losses()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = losses()
        for name, p in model.named_parameters():
            if "lora_" not in name:
                p.data = p.data.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_base = losses()

    def gap(other: torch.Tensor) -> dict:
        return {"max_abs_diff": float((other - fp32).abs().max()), "max_rel_diff": float(((other - fp32).abs() / fp32).max()),
                "mean_abs_diff": float((other - fp32).abs().mean())}

    print(json.dumps({"examples": len(rows), "mean_loss": float(fp32.mean()), "autocast": gap(autocast),
                      "bf16_base": gap(bf16_base)}))


def section(probe: dict, parity: dict, peer: list[dict], runs: dict[str, list[dict]], flops: dict[str, list[dict]],
            chosen: list[str], quickstart: dict | None = None) -> str:
    mean = throughput.mean_of
    configs = configs_for(probe["native_bf16"])
    peer_tps, peer_cpu = mean(peer, "real_tokens_per_s"), mean(peer, "real_tokens_per_cpu_s")
    lines = [
        "## Precision on a CPU: fp32 or bf16, measured (issue 20)" if probe["native_bf16"]
        else "## A CPU without native bf16 (AVX2): fp32, measured (issue 20)", "",
        f"Command: `python bench/precision.py`. Machine: {probe['cpu']}, {probe['threads']} threads, torch "
        f"{probe['torch']}; flags: {', '.join(probe['flags']) or 'none of avx2/avx512/amx'} (native bf16: "
        f"{'yes' if probe['native_bf16'] else 'no'}). {ROUNDS} rounds, the configurations and the peer taking turns, "
        "each run a fresh process.", "",
        f"**The limit** (matrix products at SmolLM2-135M's shapes, {probe['rows']} rows, the best of a few repeats): "
        f"fp32 {probe['fp32'] / 1e9:.1f} GFLOP/s, bf16 {probe['bf16'] / 1e9:.1f} GFLOP/s "
        f"({probe['bf16'] / probe['fp32']:.2f}x).", "",
        "The SFT throughput benchmark (`bench/throughput.py`'s task: SmolLM2-135M, LoRA r 8 on q/v, batch 8, 15 timed "
        "steps); FLOP/s counted from the model's shapes for the positions computed (module docstring):", "",
        "| run | real tokens/s (wall) | each round | vs peer | real tokens per CPU-second | vs peer | s/step | achieved GFLOP/s | "
        "of the limit | dev loss after | peak RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| Trainer + peft (its defaults, fp32) | {peer_tps:.1f} | {_rounds(peer)} | 1.00x | {peer_cpu:.1f} | 1.00x | "
        f"{mean(peer, 'seconds_per_step'):.3f} | | | {mean(peer, 'dev_loss'):.4f} | {mean(peer, 'peak_rss_mb'):.0f} MB |",
    ]
    for label, _ in configs:
        r, f = runs[label], flops[label]
        rate = statistics.mean(x["flops_per_s"] for x in f)
        in_bf16 = "bf16" in label or (label.startswith("auto") and chosen and chosen[0].startswith("bf16"))
        limit = probe["bf16"] if probe["native_bf16"] and in_bf16 else probe["fp32"]
        lines.append(f"| plugtune, {label} | {mean(r, 'real_tokens_per_s'):.1f} | {_rounds(r)} | {mean(r, 'real_tokens_per_s') / peer_tps:.2f}x | "
                     f"{mean(r, 'real_tokens_per_cpu_s'):.1f} | {mean(r, 'real_tokens_per_cpu_s') / peer_cpu:.2f}x | "
                     f"{mean(r, 'seconds_per_step'):.3f} | {rate / 1e9:.1f} | {rate / limit:.0%} | "
                     f"{mean(r, 'dev_loss'):.4f} | {mean(r, 'peak_rss_mb'):.0f} MB |")
    lines += ["", "Each round's figure is in the column \"each round\": the machine is shared, and rounds can differ by a fifth.",
              "", f"`precision: auto` chose, in its runs: {'; '.join(sorted(set(chosen))) or 'not recorded'}.", ""]
    if parity:
        lines += [
              f"Per-example loss, {parity['examples']} training rows (mean fp32 loss {parity['mean_loss']:.4f}): bf16 autocast "
              f"max |difference| {parity['autocast']['max_abs_diff']:.2e} (relative {parity['autocast']['max_rel_diff']:.1e}, "
              f"mean {parity['autocast']['mean_abs_diff']:.1e}); bf16 base weights under autocast max "
              f"{parity['bf16_base']['max_abs_diff']:.2e} (relative {parity['bf16_base']['max_rel_diff']:.1e}, mean "
              f"{parity['bf16_base']['mean_abs_diff']:.1e}). The base with a seeded LoRA is untrained for the task "
              "(loss about 6), where bf16's 8-bit mantissa moves a loss by a few tenths of a percent per layer; after "
              f"training the dev losses are the table's: within {_spread(runs, configs):.1%} of fp32's.", ""]
    auto = mean(runs[configs[-1][0]], "real_tokens_per_s") / peer_tps
    target = 2.5 if probe["native_bf16"] else 2.0
    lines.append(f"Target (issue 20): {target}x the peer's real tokens/s on a CPU {'with' if probe['native_bf16'] else 'without'} "
                 f"native bf16; the default (`auto`) reached {auto:.2f}x: {'met' if auto >= target else 'not met'}.")
    if quickstart:
        before, after = quickstart.get("before") or quickstart["fp32"], quickstart["auto"]  # "fp32": files saved before 12-03
        first = " ".join(f"`{o}`" for o in quickstart_configs(probe["native_bf16"])["before"])
        lines += ["", f"Quickstart (`recipes/quickstart.yaml`, {after['steps']} steps, `bench/run_one.py` with {first}, "
                  f"then the defaults): training {before['train_seconds']:.1f} s -> {after['train_seconds']:.1f} s "
                  f"({before['train_seconds'] / after['train_seconds']:.2f}x), held-out accuracy {before['after']['accuracy']:.4f} -> "
                  f"{after['after']['accuracy']:.4f}, loss {before['after']['loss']:.4f} -> {after['after']['loss']:.4f}, peak RSS "
                  f"{before['peak_rss_mb']:.0f} MB -> {after['peak_rss_mb']:.0f} MB"
                  + (" (the frozen base held in bf16)." if probe["native_bf16"] and after["peak_rss_mb"] < before["peak_rss_mb"] else ".")]
    return "\n".join(lines)


def _rounds(runs: list[dict]) -> str:
    return ", ".join(f"{r['real_tokens_per_s']:.0f}" for r in runs)


def _spread(runs: dict[str, list[dict]], configs: list[tuple[str, list[str]]]) -> float:
    """The largest relative gap between a configuration's mean dev loss and fp32's."""
    fp32 = throughput.mean_of(runs[configs[0][0]], "dev_loss")
    return max(abs(throughput.mean_of(r, "dev_loss") - fp32) / fp32 for r in runs.values())


def main() -> None:
    from methods import write_section

    train, dev = throughput.write_data()
    recipe = throughput.write_recipe(train, dev)
    me = str(Path(__file__).resolve())
    probe = throughput.child([me, "--probe"])
    native = bool(probe["native_bf16"])
    configs = configs_for(native)
    # bf16 against fp32 per example; where bf16 is emulated (minutes per pass) it is never chosen
    parity = throughput.child([me, "--parity", str(train)]) if native else None
    peer: list[dict] = []
    runs: dict[str, list[dict]] = {label: [] for label, _ in configs}
    flops: dict[str, list[dict]] = {label: [] for label, _ in configs}
    chosen: list[str] = []
    config = smollm2_config()
    for round_ in range(ROUNDS):
        peer.append(throughput.child([str(ROOT / "bench" / "throughput.py"), "--peer", str(train), str(dev)]))
        for number, (label, overrides) in enumerate(configs):
            name = f"precision-{number}-{label.split()[0].strip(',')}-{round_}"
            result = throughput.plugtune_run(recipe, name, overrides)
            out = throughput.OUT / name
            manifest = json.loads((out / "plugtune.json").read_text())
            runs[label].append(result)
            flops[label].append(achieved(label, out, config))
            if not overrides:
                chosen.append(str(manifest["training"].get("precision", {}).get("reason", "")))
    quickstart = {key: throughput.child([str(ROOT / "bench" / "run_one.py"), "recipes/quickstart.yaml", *overrides,
                                         f"output.dir={throughput.OUT / f'quickstart-{key}'}"])
                  for key, overrides in quickstart_configs(native).items()}
    saved_results(native).write_text(json.dumps({"probe": probe, "parity": parity, "peer": peer, "runs": runs, "flops": flops,
                                                 "chosen": chosen, "quickstart": quickstart}, indent=2))
    text = section(probe, parity, peer, runs, flops, chosen, quickstart)
    write_section(text, key=section_key(native))
    print(text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--section"]:  # the sections again from the last runs' saved results, for each kind of CPU
        from methods import write_section

        for native in (True, False):
            if saved_results(native).exists():
                saved = json.loads(saved_results(native).read_text())
                write_section(section(saved["probe"], saved["parity"], saved["peer"], saved["runs"], saved["flops"],
                                      saved["chosen"], saved.get("quickstart")),
                              key=section_key(native))
    elif sys.argv[1:2] == ["--attention"]:
        attention_main()
    elif sys.argv[1:2] == ["--probe"]:
        probe_main()
    elif sys.argv[1:2] == ["--parity"]:
        parity_main(sys.argv[2])
    elif sys.argv[1:]:
        throughput.usage_exit(__doc__)
    else:
        main()
