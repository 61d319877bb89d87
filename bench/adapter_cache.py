"""``plugtune serve``'s adapter cache under load: 100 adapters on disk, 8 resident at most,
requests picking adapters by a Zipf law, against all 8 adapters resident. Writes the
"adapter-cache" section of BENCHMARKS.md.

    python bench/adapter_cache.py                          # 32 clients, 60 s per case
    python bench/adapter_cache.py --clients 8 --seconds 10 --no-write   # a quick look

Steps: write ``--adapters`` (100) random-init rank-8 LoRA adapters for SmolLM2-135M into
bench/out/cache-adapters (``cache-0`` ...; seeds 1000 + i; not committed; written once).
Then two servers, each started fresh, on the load of bench/serving.py (``--clients`` clients
for ``--seconds``, 16 greedy tokens, a quarter streaming):

- **cached**: ``plugtune serve --base smollm2-135m --adapters-root bench/out/cache-adapters
  --max-adapters 8`` with no adapter named: each request names an adapter folder under the
  root as ``model`` and the server loads it on first use, evicting the least recently used
  past 8. Request ``k`` of the run picks adapter rank ``r`` (``cache-{r-1}``) with probability
  proportional to ``r ** -s`` (Zipf, ``--zipf`` s = 1.1 over the 100), from one seeded list.
- **resident**: ``plugtune serve cache-0 ... cache-7`` (all named, so all resident), the same
  Zipf law over those 8, the same seeded picks.

Reported: tokens/s of each and their ratio (target >= 0.7x), failed requests (target 0),
latency p50/p99, distinct adapters asked for, and adapter loads and evictions during the load
read from ``/metrics`` (``plugtune_adapter_loads_total``, ``plugtune_adapter_evictions_total``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import write_section
from serving import OUT, ROOT, _start, Running, load_test, make_adapters, MAX_TOKENS

CACHE_ADAPTERS = OUT / "cache-adapters"
METRICS = {"loads": "plugtune_adapter_loads_total", "evictions": "plugtune_adapter_evictions_total"}
TARGET_RATIO = 0.7


def zipf_picks(n: int, count: int, s: float, seed: int) -> list[int]:
    """``count`` adapter indices in ``range(n)``, index ``i`` drawn with probability
    proportional to ``(i + 1) ** -s`` (a Zipf law truncated to ``n``), from a seeded generator."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -s
    return np.random.default_rng(seed).choice(n, size=count, p=weights / weights.sum()).tolist()


def read_metrics(url: str) -> dict[str, float]:
    """The adapter load and eviction counters in ``/metrics`` (summed over their labels);
    NaN for a counter the server does not export."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{url}/metrics", timeout=30)
    if response.status_code != 200:
        return {k: float("nan") for k in METRICS}
    found = {k: float("nan") for k in METRICS}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            for key, name in METRICS.items():
                if sample.name == name:
                    found[key] = (0.0 if np.isnan(found[key]) else found[key]) + sample.value
    return found


def start(args: argparse.Namespace, cached: bool, tag: str) -> Running:
    command = [sys.executable, "-m", "plugtune.cli", "serve"]
    if cached:
        command += ["--base", "smollm2-135m", "--max-adapters", str(args.max_adapters)]
        names = [f"cache-{i}" for i in range(args.adapters)]
    else:
        names = [f"cache-{i}" for i in range(args.max_adapters)]
        command += [str(CACHE_ADAPTERS / n) for n in names]
    command += ["--adapters-root", str(CACHE_ADAPTERS), "--max-batch", str(args.max_batch), "--log-level", "warning"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.dtype:
        command += ["--dtype", args.dtype]
    process, url, startup, rss, log = _start("plugtune serve", command, {**os.environ, "HF_HUB_OFFLINE": "1"}, "/health", tag)
    return Running("plugtune", process, url, names, startup, rss, log, {"ignore_eos": True})


def measure(args: argparse.Namespace, cached: bool) -> dict:
    tag = "cache-cached" if cached else "cache-resident"
    server = start(args, cached, tag)
    picks = zipf_picks(len(server.models), 100_000, args.zipf, args.seed)
    pick = lambda c, k: server.models[picks[k % len(picks)]]  # noqa: E731
    try:
        # Warm-up on the first adapter only, so the cache starts as cold as it can.
        asyncio.run(load_test(server.url, server.models[:1], clients=min(args.clients, 4), seconds=3, extra=server.extra))
        before = read_metrics(server.url)
        result = asyncio.run(load_test(server.url, server.models, args.clients, args.seconds, extra=server.extra, pick=pick))
        after = read_metrics(server.url)
    finally:
        peak = server.stop()
    answers = result.pop("answers")
    result.update(case="cached" if cached else "resident", startup_s=server.startup_s, peak_rss_mb=peak / 2**20,
                  distinct_adapters=len({model for model, _ in answers}),
                  loads=after["loads"] - before["loads"], evictions=after["evictions"] - before["evictions"],
                  log=str(server.log.relative_to(ROOT)))
    return result


def section(results: dict[str, dict], args: argparse.Namespace, command: str) -> str:
    cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    cached, resident = results["cached"], results["resident"]
    ratio = cached["tokens_per_s"] / resident["tokens_per_s"] if resident["tokens_per_s"] else float("nan")
    count = lambda v: "not exported" if np.isnan(v) else f"{v:.0f}"  # noqa: E731
    lines = [
        "## Adapter cache: adapters loaded on request under load",
        "",
        f"Command: `{command}` (on {cpu}; the machine may have been shared with other jobs).",
        "",
        (f"SmolLM2-135M, {args.adapters} random-init rank-8 LoRA adapters (q/v) under `--adapters-root`; "
         f"{args.clients} concurrent clients for {args.seconds:.0f} s, {MAX_TOKENS} greedy tokens per request, a quarter "
         f"streaming. **cached**: `--max-adapters {args.max_adapters}`, no adapter named at start, requests name "
         f"an adapter folder as `model`, picked by a Zipf law (s = {args.zipf}, seed {args.seed}) over all "
         f"{args.adapters}. **resident**: the first {args.max_adapters} adapters named on the command line, the same "
         f"Zipf law over those {args.max_adapters}. Loads and evictions: `/metrics` counters during the load (after "
         "a 3 s warm-up on one adapter)."),
        "",
        "| case | completed | failed | tokens/s | latency p50 | latency p99 | first token p50 | adapters asked for | loads | evictions | peak RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in (cached, resident):
        lines.append(f"| {r['case']} | {r['completed']} | {r['failed']} | {r['tokens_per_s']:.1f} | {r['p50_ms']:.0f} ms "
                     f"| {r['p99_ms']:.0f} ms | {r['ttft_p50_ms']:.0f} ms | {r['distinct_adapters']} | {count(r['loads'])} "
                     f"| {count(r['evictions'])} | {r['peak_rss_mb']:,.0f} MB |")
    failed = cached["failed"] + resident["failed"]
    lines += ["", (f"Cached / resident tokens/s: **{ratio:.2f}x** (target >= {TARGET_RATIO}x: "
                   f"{'met' if ratio >= TARGET_RATIO else 'not met'}); failed requests: {failed} (target 0: "
                   f"{'met' if failed == 0 else 'not met'}).")]
    if failed:
        lines.append("First failures: " + "; ".join(f"{r['case']}: {r['failures'][:2]}" for r in (cached, resident) if r["failed"]))
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=100, help="adapters under the root")
    parser.add_argument("--max-adapters", type=int, default=8, help="plugtune serve --max-adapters (and the resident count)")
    parser.add_argument("--zipf", type=float, default=1.1, help="the Zipf exponent s")
    parser.add_argument("--seed", type=int, default=0, help="seed of the adapter picks")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="plugtune serve --threads (default: its own)")
    parser.add_argument("--dtype", default=None, help="plugtune serve --dtype; passed only when given")
    parser.add_argument("--cases", default="cached,resident", help="comma-separated: cached, resident (default both)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or set(cases) - {"cached", "resident"}:
        raise SystemExit(f"--cases: give cached, resident or both (got {args.cases!r})")
    if not 1 <= args.max_adapters <= args.adapters:
        raise SystemExit(f"--max-adapters must be between 1 and --adapters ({args.adapters}); got {args.max_adapters}")
    command = "python bench/adapter_cache.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    OUT.mkdir(parents=True, exist_ok=True)
    make_adapters(args.adapters, root=CACHE_ADAPTERS, prefix="cache", seeds=range(1000, 1000 + args.adapters))
    results = {}
    for case in cases:
        print(f"[adapter-cache] {case}", file=sys.stderr, flush=True)
        results[case] = measure(args, case == "cached")
        (OUT / "adapter_cache.json").write_text(json.dumps(results, indent=2))
    if len(results) < 2:
        print(json.dumps(results, indent=2))
        return
    text = section(results, args, command)
    print(text)
    if not args.no_write:
        write_section(text, key="adapter-cache")


if __name__ == "__main__":
    main()
