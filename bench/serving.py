"""``plugtune serve`` under load: SmolLM2-135M with several LoRA adapters, many concurrent
clients, for a fixed time. Writes the "serving" section of BENCHMARKS.md.

    python bench/serving.py                       # 4 adapters, 32 clients, 60 s per server
    python bench/serving.py --clients 8 --seconds 10   # a quick look

Steps: write ``--adapters`` random-init rank-8 LoRA adapters (q/v, different seeds) for
SmolLM2-135M into bench/out/serving-adapters (not committed); start ``plugtune serve`` on them as a subprocess on a free loopback port; run
``--clients`` concurrent clients for ``--seconds``, each sending one request after another
to its own model (the adapters and the bare base in turn): a quarter of the clients stream
(``stream: true``), the rest do not; every request asks for 16 greedy tokens of a support
ticket in the quickstart prompt. Then the same load against the same server started with
``--max-batch 1`` (one request at a time: the peer baseline without batching).

Reported per server: requests completed and failed, latency p50/p99 (to the last byte),
time to the first streamed token p50, generated tokens per second, the mean batch the
worker ran, and how many answers differed from the first answer to the same request (greedy
decoding should give the same text whatever it was batched with).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import write_section

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
ADAPTERS = OUT / "serving-adapters"
PROMPT = "Route this support message to billing, shipping, technical or account.\nMessage: {text}\nDepartment:"
MAX_TOKENS = 16


def make_adapters(count: int) -> list[Path]:
    """``count`` random-init rank-8 LoRA adapters (q/v) for SmolLM2-135M with the quickstart
    task, written as ordinary plugtune adapters (``plugtune.plugins.methods.lora.random_lora_adapter``)."""
    from plugtune.artifacts.models import load_base
    from plugtune.plugins.methods.lora import random_lora_adapter
    from plugtune.data.tasks import build_task

    task = build_task(dict(type="causal-lm", prompt=PROMPT, response=" {label}"))
    base = load_base("smollm2-135m", task, dtype=torch.float32)
    return [random_lora_adapter(ADAPTERS / f"serve-{i}", base, task, r=8, seed=i) for i in range(count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(adapter_dirs: list[Path], max_batch: int, threads: int) -> tuple[subprocess.Popen, str, list[str]]:
    port = free_port()
    command = [sys.executable, "-m", "plugtune.cli", "serve", *map(str, adapter_dirs), "--port", str(port),
               "--adapters-root", str(ADAPTERS), "--max-batch", str(max_batch), "--log-level", "warning",
               "--threads", str(threads)]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            health = httpx.get(f"{url}/health").json()
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                process.kill()
                raise SystemExit("the server did not come up in 300 s") from None
            time.sleep(0.5)
    return process, url, [health["base_model"], *health["adapters"]]


def load_prompts(n: int = 64) -> list[str]:
    with open(ROOT / "recipes" / "data" / "support_tickets.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [PROMPT.format(text=row["text"]) for row in rows[:n]]


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, stream: bool) -> tuple[str, int, float | None]:
    """Send one completion; return its text, generated tokens, and time to the first text."""
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    started = time.perf_counter()
    if not stream:
        response = await client.post("/v1/completions", json=body)
        response.raise_for_status()
        data = response.json()
        return data["choices"][0]["text"], data["usage"]["completion_tokens"], None
    body.update(stream=True, stream_options={"include_usage": True})
    text, tokens, first = "", 0, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["text"] and first is None:
                    first = time.perf_counter() - started
                text += choice["text"]
    return text, tokens, first


async def load_test(url: str, models: list[str], clients: int, seconds: float) -> dict:
    prompts = load_prompts()
    latencies: list[float] = []
    first_token: list[float] = []
    failures: list[str] = []
    answers: dict[tuple[str, str], str] = {}
    differing = 0
    tokens = 0
    stop_at = time.perf_counter() + seconds

    async def client_loop(c: int, client: httpx.AsyncClient) -> None:
        nonlocal tokens, differing
        model, stream, k = models[c % len(models)], c % 4 == 0, c
        while time.perf_counter() < stop_at:
            prompt = prompts[k % len(prompts)]
            k += clients
            started = time.perf_counter()
            try:
                text, n, first = await one_request(client, model, prompt, stream)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - started)
            tokens += n
            if first is not None:
                first_token.append(first)
            if answers.setdefault((model, prompt), text) != text:
                differing += 1

    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        before = (await client.get("/health")).json()
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
        wall = time.perf_counter() - started
        health = (await client.get("/health")).json()
    ms = lambda values, q: float(np.percentile(values, q) * 1000) if values else float("nan")
    return {"completed": len(latencies), "failed": len(failures), "failures": failures[:5], "wall_s": wall,
            "p50_ms": ms(latencies, 50), "p99_ms": ms(latencies, 99), "ttft_p50_ms": ms(first_token, 50),
            "tokens": tokens, "tokens_per_s": tokens / wall, "requests_per_s": len(latencies) / wall,
            "differing": differing, "batches": health["batches"] - before["batches"],
            "mean_batch": (health["rows"] - before["rows"]) / max(health["batches"] - before["batches"], 1),
            "largest_batch": health["largest_batch"]}


def run_server(adapter_dirs: list[Path], max_batch: int, clients: int, seconds: float, threads: int) -> dict:
    process, url, models = start_server(adapter_dirs, max_batch, threads)
    try:
        asyncio.run(load_test(url, models, clients=min(clients, 4), seconds=3))  # warm up
        result = asyncio.run(load_test(url, models, clients, seconds))
    finally:
        process.terminate()
        process.wait(60)
    result.update(models=models, max_batch=max_batch)
    return result


def section(results: list[dict], args: argparse.Namespace, command: str) -> str:
    cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    lines = [
        "## Serving: `plugtune serve` under concurrent clients",
        "",
        (f"Command: `{command}` (on {cpu}; the machine was shared with other jobs, so absolute figures are low "
        "and noisy; both servers ran back to back in the same run)."),
        "",
        (f"SmolLM2-135M (fp32, CPU) with {args.adapters} random-init rank-8 LoRA adapters on q/v; "
        f"{args.clients} concurrent clients for {args.seconds:.0f} s, each sending one request after another to its "
        "own model (the adapters and the bare base in turn; a quarter of them stream), "
        f"{MAX_TOKENS} greedy tokens per request; the server runs with `--threads {args.threads}`. "
        "The baseline is the same server with `--max-batch 1` "
        "(one request at a time). Each run stops sending after the time is up and waits for the requests in "
        "flight; tokens/s and requests/s are over that whole wall time."),
        "",
        "| server | completed | failed | latency p50 | latency p99 | first token p50 (streamed) | tokens/s | requests/s | wall | mean batch | answers differing |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        label = f"`--max-batch {r['max_batch']}`" + (" (baseline)" if r["max_batch"] == 1 else "")
        lines.append(f"| {label} | {r['completed']} | {r['failed']} | {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms "
                     f"| {r['ttft_p50_ms']:.0f} ms | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | {r['wall_s']:.0f} s "
                     f"| {r['mean_batch']:.1f} | {r['differing']} |")
    batched, single = results[0], results[-1]
    if single is not batched and single["tokens_per_s"]:
        lines += ["", (f"Batching gives {batched['tokens_per_s'] / single['tokens_per_s']:.2f}x the tokens/s of one "
                  f"request at a time, and a p50 latency {single['p50_ms'] / batched['p50_ms']:.2f}x lower.")]
    failed = sum(r["failed"] for r in results)
    lines += ["", f"Failed requests: {failed}." + (f" First failures: {results[0]['failures'] or results[-1]['failures']}" if failed else ""),
              ("\"Answers differing\" counts answers that differ from the first answer the same server gave to the same "
              "(model, prompt): greedy decoding in a mixed batch should not depend on the other rows."), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (plugtune serve --threads)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the --max-batch 1 server")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    command = "python bench/serving.py" + "".join(f" {a}" for a in sys.argv[1:])
    OUT.mkdir(parents=True, exist_ok=True)
    adapter_dirs = make_adapters(args.adapters)
    results = [run_server(adapter_dirs, args.max_batch, args.clients, args.seconds, args.threads)]
    if not args.no_baseline:
        results.append(run_server(adapter_dirs, 1, args.clients, args.seconds, args.threads))
    (OUT / "serving.json").write_text(json.dumps(results, indent=2))
    text = section(results, args, command)
    print(text)
    if not args.no_write:
        write_section(text, key="serving")


if __name__ == "__main__":
    main()
