"""lm-evaluation-harness on the local ``support_department`` task (bench/lm_eval/), two ways, for
the bare base and one adapter: (a) through lm-eval's ``local-completions`` backend against a
running ``plugtune serve`` (``model=base`` and ``model=NAME``), (b) through the ``plugtune``
harness model (bench/lm_eval_plugtune.py, an ``AdapterHost``); the scores must be equal.
Writes the "lm-eval" section of BENCHMARKS.md.

    bash bench/setup_lm_eval.sh                              # once: bench/.venv-lmeval
    bench/.venv-lmeval/bin/python bench/lm_eval_check.py     # adapters/quickstart if trained, else a random one
    bench/.venv-lmeval/bin/python bench/lm_eval_check.py --adapter adapters/quickstart --limit 20 --no-write

The server is ``plugtune serve ADAPTER --base BASE`` started from the main .venv on a free
loopback port. local-completions sends, per (context, choice), ``prompt`` as a list of token-id
lists (its Hugging Face tokenizer, no special tokens), ``echo: true, logprobs: 1,
max_tokens: 1, temperature: 0``, and reads ``choices[i].logprobs.token_logprobs[ctxlen:-1]``
and ``top_logprobs[ctxlen:-1]`` (OpenAI's legacy shape, over prompt and completion). Exit
status 1 when a pair of scores differs or a way failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
OUT = HERE / "out"
TASK = "support_department"
METRICS = ("acc,none", "acc_norm,none")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_folder(base: str) -> Path:
    """The Hugging Face folder of ``base`` (a GGUF alias converted once), for local-completions' tokenizer."""
    from plugtune.artifacts.models import gguf_to_hf, local_location

    location = local_location(base)
    if location is None:
        raise SystemExit(f"{base} is not on this machine yet")
    return gguf_to_hf(location) if location.suffix == ".gguf" else location


def default_adapter() -> Path:
    trained = ROOT / "adapters" / "quickstart"
    if (trained / "plugtune.json").is_file():
        return trained
    # A random rank-8 LoRA on q/v, as bench/serving.py writes (serve-0).
    import torch
    from plugtune.artifacts.models import load_base
    from plugtune.data.tasks import build_task
    from plugtune.plugins.methods.lora import random_lora_adapter

    folder = OUT / "serving-adapters" / "serve-0"
    if not (folder / "plugtune.json").is_file():
        prompt = "Route this support message to billing, shipping, technical or account.\nMessage: {text}\nDepartment:"
        task = build_task(dict(type="causal-lm", prompt=prompt, response=" {label}"))
        random_lora_adapter(folder, load_base("smollm2-135m", task, dtype=torch.float32), task, r=8, seed=0)
    return folder


def start_server(adapter: Path, base: str, log: Path) -> tuple[subprocess.Popen, str]:
    import requests

    python = ROOT / ".venv" / "bin" / "python"
    port = free_port()
    command = [str(python if python.is_file() else sys.executable), "-m", "plugtune.cli", "serve", str(adapter),
               "--base", base, "--adapters-root", str(adapter.parent), "--port", str(port), "--log-level", "warning",
               "--dtype", "float32"]  # as the harness model loads the base: the same numbers are expected
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(command) + "\n")
        fh.flush()
        process = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit(f"plugtune serve exited with {process.returncode}; see {log}")
        try:
            if requests.get(f"{url}/health", timeout=5).ok:
                return process, url
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"plugtune serve did not answer in 300 s; see {log}")
        time.sleep(0.5)


def evaluate(model: object, model_args: dict | None, limit: int | None) -> dict:
    """Scores and per-request loglikelihoods of the task through ``model``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], limit=limit,
                                  task_manager=TaskManager(include_path=str(HERE / "lm_eval")),
                                  log_samples=True, bootstrap_iters=0, random_seed=0)
    scores = {m: out["results"][TASK][m] for m in METRICS}
    logliks = [float(r[0]) for s in sorted(out["samples"][TASK], key=lambda s: s["doc_id"]) for r in s["filtered_resps"]]
    return {"scores": scores, "logliks": logliks}


def compare(a: dict, b: dict) -> dict:
    equal = all(a["scores"][m] == b["scores"][m] for m in METRICS)
    diff = max((abs(x - y) for x, y in zip(a["logliks"], b["logliks"])), default=float("nan"))
    return {"equal": equal and len(a["logliks"]) == len(b["logliks"]), "max_loglik_diff": diff}


def section(rows: list[dict], args: argparse.Namespace, command: str, adapter: Path) -> str:
    import lm_eval

    lines = [
        "## lm-evaluation-harness: the same scores through `plugtune serve` and through `AdapterHost`",
        "",
        f"Command: `{command}` (lm-eval {getattr(lm_eval, '__version__', '0.4.13')} in bench/.venv-lmeval).",
        "",
        (f"Task `{TASK}` (bench/lm_eval/: 80 support messages written for it, loglikelihood of each of the four "
         "department words after the quickstart prompt; nothing downloaded)"
         + (f", first {args.limit} documents" if args.limit else "")
         + f". Base `{args.base}`; adapter `{adapter.relative_to(ROOT) if adapter.is_relative_to(ROOT) else adapter}`. "
         f"(a) lm-eval's `local-completions` against {'the server at ' + args.url if args.url else '`plugtune serve`'} "
         "(`echo`, `logprobs`, token-id prompts); "
         "(b) lm-eval with the `plugtune` harness model (bench/lm_eval_plugtune.py)."),
        "",
        "| model | way | acc | acc_norm | equal to (b) | largest loglikelihood difference |",
        "| --- | --- | ---: | ---: | --- | ---: |",
    ]
    for r in rows:
        for way in ("server", "host"):
            got = r.get(way)
            if got is None:
                lines.append(f"| {r['model']} | {'(a) server' if way == 'server' else '(b) AdapterHost'} | failed: "
                             f"{r.get(way + '_error', '?')} | | | |")
                continue
            same = "" if way == "host" else ("yes" if r["compare"]["equal"] else "**no**")
            diff = "" if way == "host" else f"{r['compare']['max_loglik_diff']:.2e}"
            lines.append(f"| {r['model']} | {'(a) server' if way == 'server' else '(b) AdapterHost'} "
                         f"| {got['scores']['acc,none']:.4f} | {got['scores']['acc_norm,none']:.4f} | {same} | {diff} |")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--adapter", type=Path, default=None, help="default: adapters/quickstart if trained, else a random LoRA")
    parser.add_argument("--limit", type=int, default=None, help="only the first N documents")
    parser.add_argument("--skip-server", action="store_true", help="only (b), the AdapterHost model")
    parser.add_argument("--url", default=None,
                        help="(a) against this running server (http://127.0.0.1:PORT) instead of starting plugtune serve; "
                             "it must answer to `base` and to the adapter's name")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    command = "bench/.venv-lmeval/bin/python bench/lm_eval_check.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    from lm_eval_plugtune import PlugtuneLM
    from plugtune.artifacts.adapters import read_manifest

    adapter = (args.adapter or default_adapter()).resolve()
    name = read_manifest(adapter).name
    models = [("base", None), (name, adapter)]
    rows = [{"model": m} for m, _ in models]
    for row, (model, path) in zip(rows, models):
        print(f"[lm-eval] (b) AdapterHost: {model}", file=sys.stderr, flush=True)
        row["host"] = evaluate(PlugtuneLM(adapter=str(path) if path else None, base=args.base), None, args.limit)
    if not args.skip_server:
        process, url = (None, args.url.rstrip("/")) if args.url else start_server(adapter, args.base, OUT / "lm-eval-server.log")
        try:
            for row in rows:
                print(f"[lm-eval] (a) plugtune serve: model={row['model']}", file=sys.stderr, flush=True)
                model_args = {"model": row["model"], "base_url": f"{url}/v1/completions",
                              "tokenizer": str(base_folder(args.base)), "tokenizer_backend": "huggingface",
                              "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1, "batch_size": 1}
                try:
                    row["server"] = evaluate("local-completions", model_args, args.limit)
                    row["compare"] = compare(row["server"], row["host"])
                except Exception as exc:  # noqa: BLE001 - reported in the table, the other way still counts
                    row["server"], row["server_error"] = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        finally:
            if process is not None:
                process.terminate()
                process.wait(60)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "lm_eval_check.json").write_text(json.dumps(rows, indent=2, default=str))
    text = section(rows, args, command, adapter)
    print(text)
    if not args.no_write and not args.skip_server and not args.url:
        from methods import write_section

        write_section(text, key="lm-eval")
    bad = [r for r in rows if not args.skip_server and (r.get("server") is None or not r["compare"]["equal"])]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
