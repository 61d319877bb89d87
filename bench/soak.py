"""``plugtune serve`` soaked: well-behaved clients and hostile ones at once, for minutes.
Writes the "soak" section of BENCHMARKS.md.

    python bench/soak.py                      # 32 clients + 4 hostile ones, 300 s
    python bench/soak.py --seconds 120        # a shorter soak

The server is SmolLM2-135M with ``--adapters`` random-init rank-8 LoRA adapters (the ones
``bench/serving.py`` writes, ``plugtune.plugins.methods.lora.random_lora_adapter``), started
as ``plugtune serve`` in a subprocess. For ``--seconds``: ``--clients`` well-behaved clients
send one completion after another (16 greedy tokens of a support ticket; every fourth
client streams, the models taken in turn), while ``--hostile`` clients send, in turn: a
20 MB body, a prompt over the character limit, 64 prompts each longer than the context,
sampling at ``temperature: 1e-39`` and ``top_p: 1e-30``, malformed JSON, a non-streaming
request whose client leaves after 0.2 s, and a streaming one that leaves after its first
chunk. A monitor asks ``/health`` every 0.1 s.

Reported: well-formed requests completed and failed (the target is 0 failed), the hostile
requests and how they were answered (no 5xx is the target), the worst and p99 ``/health``
latency during the soak (target: under 1 s), and the server's RSS after warm-up, at its
peak and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import write_section
from serving import OUT, load_prompts, make_adapters, one_request, start_server

HOSTILE_KINDS = ("20 MB body", "too many characters", "64 prompts over the context", "temperature 1e-39, top_p 1e-30",
                 "malformed JSON", "non-streaming client leaves", "streaming client leaves")


def rss_mb(pid: int) -> float:
    """The resident set size of process ``pid`` in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def hostile_request(client: httpx.AsyncClient, url: str, kind: str, model: str) -> str:
    """Send one hostile request of ``kind``; returns how it ended (a status, or what the
    client did)."""
    if kind == "20 MB body":
        r = await client.post("/v1/completions", content=b"x" * 20_000_000, headers={"content-type": "application/json"})
    elif kind == "too many characters":
        r = await client.post("/v1/completions", json={"model": model, "prompt": "ticket " * 200_000})
    elif kind == "64 prompts over the context":
        r = await client.post("/v1/completions", json={"model": model, "prompt": ["ticket " * 10_000] * 64})
    elif kind == "temperature 1e-39, top_p 1e-30":
        r = await client.post("/v1/completions", json={"model": model, "prompt": "My card was charged twice",
                                                       "max_tokens": 16, "temperature": 1e-39, "top_p": 1e-30})
    elif kind == "malformed JSON":
        r = await client.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "hi"',
                              headers={"content-type": "application/json"})
    elif kind == "non-streaming client leaves":
        try:
            async with httpx.AsyncClient(base_url=url, timeout=0.2) as leaving:
                await leaving.post("/v1/completions", json={"model": model, "prompt": "My order", "max_tokens": 64})
        except httpx.TimeoutException:
            return "left"
        return "answered before leaving"
    else:
        async with httpx.AsyncClient(base_url=url, timeout=60) as leaving, leaving.stream(
                "POST", "/v1/completions", json={"model": model, "prompt": "My order", "max_tokens": 64,
                                                 "stream": True}) as response:
            async for _ in response.aiter_lines():
                break
        return "left"
    return str(r.status_code)


async def soak(url: str, models: list[str], pid: int, clients: int, hostile: int, seconds: float) -> dict:
    prompts = load_prompts()
    latencies: list[float] = []
    failures: list[str] = []
    outcomes: dict[str, collections.Counter] = {kind: collections.Counter() for kind in HOSTILE_KINDS}
    health: list[float] = []
    rss: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def polite(c: int, client: httpx.AsyncClient) -> None:
        model, stream, k = models[c % len(models)], c % 4 == 0, c
        while time.perf_counter() < stop_at:
            prompt = prompts[k % len(prompts)]
            k += clients
            started = time.perf_counter()
            try:
                await one_request(client, model, prompt, stream)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                failures.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            latencies.append(time.perf_counter() - started)

    async def rude(h: int, client: httpx.AsyncClient) -> None:
        k = h
        while time.perf_counter() < stop_at:
            kind = HOSTILE_KINDS[k % len(HOSTILE_KINDS)]
            try:
                outcome = await hostile_request(client, url, kind, models[k % len(models)])
            except Exception as exc:  # noqa: BLE001 - the hostile side may see its connection closed
                outcome = type(exc).__name__
            outcomes[kind][outcome] += 1
            k += hostile

    async def monitor() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                (await client.get("/health")).raise_for_status()
                health.append(time.perf_counter() - started)
                rss.append(rss_mb(pid))
                await asyncio.sleep(0.1)

    limits = httpx.Limits(max_connections=(clients + hostile) * 2, max_keepalive_connections=(clients + hostile) * 2)
    rss_start = rss_mb(pid)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client, \
            httpx.AsyncClient(base_url=url, timeout=600) as rude_client:
        before = (await client.get("/health")).json()
        started = time.perf_counter()
        await asyncio.gather(monitor(), *(polite(c, client) for c in range(clients)),
                             *(rude(h, rude_client) for h in range(hostile)))
        wall = time.perf_counter() - started
        after = (await client.get("/health")).json()
    ms = lambda values, q: float(np.percentile(values, q) * 1000) if values else float("nan")
    return {"completed": len(latencies), "failed": len(failures), "failures": failures[:5], "wall_s": wall,
            "p50_ms": ms(latencies, 50), "p99_ms": ms(latencies, 99),
            "health_checks": len(health), "health_worst_ms": max(health, default=float("nan")) * 1000,
            "health_p99_ms": ms(health, 99), "rss_start_mb": rss_start, "rss_peak_mb": max(rss, default=rss_start),
            "rss_end_mb": rss_mb(pid), "hostile": {k: dict(v) for k, v in outcomes.items()},
            "hostile_5xx": sum(n for v in outcomes.values() for o, n in v.items() if o.startswith("5")),
            "batches": after["batches"] - before["batches"],
            "mean_batch": (after["rows"] - before["rows"]) / max(after["batches"] - before["batches"], 1)}


def section(r: dict, args: argparse.Namespace, command: str) -> str:
    cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    hostile_rows = [f"| {kind} | {sum(v.values())} | "
                    + ", ".join(f"{o}: {n}" for o, n in sorted(v.items())) + " |" for kind, v in r["hostile"].items()]
    verdict = lambda ok: "met" if ok else "**missed**"
    return "\n".join([
        "## Soak: `plugtune serve` with hostile clients mixed in (issue 13)",
        "",
        f"Command: `{command}` (on {cpu}; the machine was shared with other jobs, so latencies are noisy).",
        "",
        (f"SmolLM2-135M (fp32, CPU, `--threads {args.threads}`) with {args.adapters} random-init rank-8 LoRA adapters; "
         f"{args.clients} well-behaved clients (16 greedy tokens per request, every fourth streams) and {args.hostile} "
         f"hostile ones for {r['wall_s']:.0f} s, the server's default request limits; `/health` asked every 0.1 s."),
        "",
        "| figure | value | target |",
        "| --- | ---: | --- |",
        f"| well-formed requests completed | {r['completed']} | |",
        f"| well-formed requests failed | {r['failed']} | 0: {verdict(r['failed'] == 0)} |",
        f"| well-formed latency p50 / p99 | {r['p50_ms']:.0f} ms / {r['p99_ms']:.0f} ms | |",
        f"| worst `/health` latency ({r['health_checks']} checks) | {r['health_worst_ms']:.0f} ms "
        f"(p99 {r['health_p99_ms']:.0f} ms) | under 1 s: {verdict(r['health_worst_ms'] < 1000)} |",
        f"| hostile requests answered 5xx | {r['hostile_5xx']} | 0: {verdict(r['hostile_5xx'] == 0)} |",
        f"| server RSS after warm-up / peak / end | {r['rss_start_mb']:.0f} / {r['rss_peak_mb']:.0f} / "
        f"{r['rss_end_mb']:.0f} MiB | |",
        f"| batches run, mean rows per batch | {r['batches']}, {r['mean_batch']:.1f} | |",
        "",
        "| hostile request | sent | answered (status, or what the client did) |",
        "| --- | ---: | --- |",
        *hostile_rows,
        "",
        ("The 20 MB body is refused from its `Content-Length` with a 413 before a byte of it is read, and the "
         "connection is closed; the client, still sending, sees that as a ReadError. The 64 long prompts are caught "
         "by the character budget before any token is counted."),
        "",
        (f"Failures: {r['failures']}." if r["failed"] else "No well-formed request failed."),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--hostile", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (plugtune serve --threads)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    command = "python bench/soak.py" + "".join(f" {a}" for a in sys.argv[1:])
    OUT.mkdir(parents=True, exist_ok=True)
    adapter_dirs = make_adapters(args.adapters)
    process, url, models = start_server(adapter_dirs, 16, args.threads)
    try:
        prompts = load_prompts()
        async def warm_up() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=600) as client:
                await asyncio.gather(*(one_request(client, m, prompts[0], False) for m in models))
        asyncio.run(warm_up())
        result = asyncio.run(soak(url, models, process.pid, args.clients, args.hostile, args.seconds))
    finally:
        process.terminate()
        process.wait(60)
    (OUT / "soak.json").write_text(json.dumps(result, indent=2))
    text = section(result, args, command)
    print(text)
    if not args.no_write:
        write_section(text, key="soak")


if __name__ == "__main__":
    main()
