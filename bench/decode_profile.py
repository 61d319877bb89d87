"""One decode step at batch 16, profiled: SmolLM2-135M with 4 random rank-8 LoRA adapters
(q/v) and bare-base rows mixed in one batch, as ``plugtune serve`` runs it.

    python bench/decode_profile.py                  # fp32 and bf16, 1 thread
    python bench/decode_profile.py --threads 2 --profile

Reports the matrix products' rate at a projection's and the LM head's shapes, milliseconds per decode step (median over ``--steps`` steps after the prefill) for
fp32 and bf16 weights, the greedy answers' agreement between the two, and with
``--profile`` the top operators of one step (torch.profiler). The weights' bytes read per
step and the step time give the achieved memory bandwidth, beside what
``torch.empty(...).copy_`` reaches on this machine (the ceiling a decode step can approach).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from serving import PROMPT, make_adapters  # noqa: E402


def copy_bandwidth(megabytes: int = 256) -> float:
    """GB/s of a large tensor copy: the memory ceiling."""
    src = torch.empty(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / min(times) / 1e9


def matmul_rates(rows: int) -> None:
    """GFLOP/s of one projection shape and of the LM head at ``rows`` rows, fp32 and bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        for n_out in (1536, 49152):
            x, w = torch.randn(rows, 576, dtype=dtype), torch.randn(n_out, 576, dtype=dtype)
            torch.nn.functional.linear(x, w)
            repeats = 50 if n_out < 10_000 else 5
            start = time.perf_counter()
            for _ in range(repeats):
                torch.nn.functional.linear(x, w)
            seconds = (time.perf_counter() - start) / repeats
            print(f"  {str(dtype).removeprefix('torch.')} {rows} x 576 x {n_out}: {seconds * 1000:.2f} ms, "
                  f"{2 * rows * 576 * n_out / seconds / 1e9:.0f} GFLOP/s")


def measure(dtype: torch.dtype, adapters: list[Path], rows: int, steps: int, profile: bool) -> tuple[float, list[list[int]], int]:
    from plugtune.serving.engine import RowSpec
    from plugtune.serving.host import AdapterHost

    host = AdapterHost.from_adapters(*adapters, dtype=dtype)
    host.use(None)
    names = [None, *(f"serve-{i}" for i in range(len(adapters)))]
    tickets = ["My card was charged twice", "The parcel never arrived", "I cannot log in", "Change my email address"]
    engine = host.decode_engine(max_rows=rows)
    specs = [RowSpec(host.tokenizer(PROMPT.format(text=tickets[i % 4]))["input_ids"], names[i % len(names)], steps + 2,
                     ignore_eos=True) for i in range(rows)]
    out = [engine.add(s) for s in specs]
    engine.step()  # prefill
    engine.step()  # the first decode (merges, restacks the LoRA rows)
    times = []
    for _ in range(steps - 1):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    if profile:
        from torch.profiler import ProfilerActivity, profile as run_profile

        with run_profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    while not engine.idle:
        engine.step()
    for spec, row in zip(specs, out):  # each row again alone: batching must not change a greedy answer
        single = host.decode_engine(max_rows=1)
        again = single.add(spec)
        while not single.idle:
            single.step()
        if again.generated != row.generated:
            print(f"  {str(dtype).removeprefix('torch.')}: row {row.id} ({spec.adapter}) differs batched vs alone")
    weight_bytes = sum(p.numel() * p.element_size() for p in host.base.model.parameters())
    return statistics.median(times) * 1000, [r.generated for r in out], weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from plugtune.kernel.hardware import choose_cpu_dtype, native_bf16

    adapters = make_adapters(4)
    print(f"native bf16: {native_bf16()}; probe: {choose_cpu_dtype(576, 1536, rows=args.rows).reason}")
    print(f"copy bandwidth: {copy_bandwidth():.1f} GB/s")
    matmul_rates(args.rows)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        ms, answers, weight_bytes = measure(dtype, adapters, args.rows, args.steps, args.profile)
        results[dtype] = answers
        print(f"{str(dtype).removeprefix('torch.')}: {ms:.1f} ms per decode step at batch {args.rows} "
              f"({args.rows / ms * 1000:.0f} tokens/s); weights {weight_bytes / 1e6:.0f} MB read per step = "
              f"{weight_bytes / ms / 1e6:.1f} GB/s")
    same = sum(a == b for a, b in zip(results[torch.float32], results[torch.bfloat16]))
    print(f"greedy answers equal in bf16 and fp32: {same} of {args.rows}")


if __name__ == "__main__":
    main()
