"""Does an exported adapter answer on the servers as it does in plugtune?

    flock /tmp/plugtune-heavy.lock .venv/bin/python bench/export_check.py [--prompts 16] [--write]

1. Trains the quickstart recipe for ``--steps`` steps (20) with rsLoRA on, so the export has a
   scaling to fold (``--adapter DIR`` takes an existing adapter instead).
2. ``plugtune export --to vllm`` and starts vLLM's CPU build (bench/.venv-vllm, ``bash
   bench/setup_vllm.sh``) with ``--lora-modules exported=OUT --dtype float32``, the
   preload its CPU docs recommend; asks the prompts greedy (temperature 0, 16 tokens) through
   the adapter, and compares every answer with ``AdapterHost.generate`` in fp32.
3. If llama.cpp's Python binding is installed in bench/.venv-llamacpp, ``plugtune export --to
   gguf`` and the same prompts through ``llama_cpp.Llama(base GGUF, lora_path=...)``
   greedy; the base GGUF is the Q4_1 file the ``smollm2-135m`` alias ships, which plugtune
   dequantizes, so both run the same weights, in different kernels.

Prints one line per server (answers equal / differing) and the first differences;
``--json FILE`` writes them; ``--write`` replaces the "export" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import write_section  # noqa: E402
from serving import _start, base_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = ROOT / "bench" / ".venv-vllm"
LLAMA_CPP_VENV = ROOT / "bench" / ".venv-llamacpp"
MAX_TOKENS = 16

LLAMA_CPP_SCRIPT = r"""
import json, sys
from llama_cpp import Llama
base, lora, prompts, max_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=base, lora_path=lora, n_ctx=512, n_threads=2, verbose=False, seed=0)
out = [llm.create_completion(p, max_tokens=max_tokens, temperature=0.0, top_k=1)["choices"][0]["text"] for p in prompts]
print(json.dumps(out))
"""


def held_out_texts(n: int) -> list[str]:
    """The last ``n`` support tickets (raw message text; each adapter wraps it in its prompt)."""
    with open(ROOT / "recipes" / "data" / "support_tickets.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [row["text"] for row in rows[-n:]]


def train(work: Path, steps: int) -> Path:
    import plugtune

    out = work / "quickstart"
    result = plugtune.run(str(ROOT / "recipes" / "quickstart.yaml"),
                          [f"training.max_steps={steps}", "training.eval_before=false", "method.options.use_rslora=true",
                           f"output.dir={out}"])
    return Path(result.adapter_dir)


def compare(name: str, ours: list[str], theirs: list[str], prompts: list[str]) -> dict:
    differing = [{"prompt": p, "plugtune": a, name: b} for p, a, b in zip(prompts, ours, theirs) if a.strip() != b.strip()]
    return {"equal": len(prompts) - len(differing), "differing": differing}


def vllm_answers(exported: Path, prompts: list[str]) -> tuple[list[str], float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}"}
    env.pop("LD_PRELOAD", None)
    preload = VLLM_VENV / "preload.env"
    if preload.is_file():
        key, _, value = preload.read_text().strip().partition("=")
        if key == "LD_PRELOAD" and value:
            env["LD_PRELOAD"] = value
    command = [str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_folder()),
               "--served-model-name", "base", "--dtype", "float32", "--max-model-len", "1024", "--enable-lora",
               "--max-lora-rank", "8", "--max-loras", "1", "--lora-modules", f"exported={exported}",
               "--uvicorn-log-level", "warning", "--host", "127.0.0.1"]
    process, url, startup, rss, log = _start("vLLM", command, env, "/v1/models", "export-check-vllm")
    try:
        answers = []
        for prompt in prompts:
            response = httpx.post(f"{url}/v1/completions", timeout=300, json={
                "model": "exported", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
            response.raise_for_status()
            answers.append(response.json()["choices"][0]["text"])
        return answers, startup
    finally:
        rss.stop()
        os.killpg(process.pid, 15)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)


def llama_cpp_answers(exported_gguf: Path, prompts: list[str]) -> list[str]:
    from plugtune.artifacts.models import local_location

    base = local_location("smollm2-135m")
    done = subprocess.run([str(LLAMA_CPP_VENV / "bin" / "python"), "-c", LLAMA_CPP_SCRIPT, str(base), str(exported_gguf),
                           json.dumps(prompts), str(MAX_TOKENS)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp failed: {done.stderr.strip()[-600:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, help="an existing SmolLM2 adapter instead of training one")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--work", type=Path, help="folder for the adapter and exports (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON")
    parser.add_argument("--servers", default="vllm,llama_cpp",
                        help="comma-separated: vllm, llama_cpp (default both); with --json, the servers not run keep "
                             "their result from that file when it was for the same adapter")
    parser.add_argument("--write", action="store_true", help="replace the export section of BENCHMARKS.md")
    args = parser.parse_args()
    servers = set(args.servers.split(","))
    if servers - {"vllm", "llama_cpp"}:
        raise SystemExit(f"--servers: vllm, llama_cpp (got {args.servers!r})")

    from plugtune.artifacts.export import export_adapter
    from plugtune.serving.host import AdapterHost

    work = args.work or Path(tempfile.mkdtemp(prefix="export-check-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    adapter = (args.adapter or train(work, args.steps)).resolve()
    import torch

    host = AdapterHost.from_adapters(adapter, device="cpu", dtype=torch.float32)
    name = next(iter(host.adapters))
    texts = held_out_texts(args.prompts)
    prompts = [host.format_prompt(t, name) for t in texts]
    ours = host.generate(texts, name, max_new_tokens=MAX_TOKENS)
    report: dict = {"prompts": len(prompts), "adapter": str(adapter), "max_tokens": MAX_TOKENS,
                    "distinct_answers": sorted(set(ours))}

    previous = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}
    if previous.get("adapter") != str(adapter) or previous.get("prompts") != len(prompts):
        previous = {}
    if "vllm" not in servers:
        report["vllm"] = previous.get("vllm", {"skipped": "not asked for (--servers)"})
    elif (VLLM_VENV / "bin" / "python").is_file():
        vllm_dir = export_adapter(adapter, "vllm", work / "exported-vllm", overwrite=True)
        theirs, startup = vllm_answers(vllm_dir.folder, prompts)
        report["vllm"] = {**compare("vllm", ours, theirs, prompts), "notes": vllm_dir.notes, "startup_s": round(startup, 1),
                          "dtype": "float32", "version": _version(VLLM_VENV, "vllm_cpu")}
    else:
        report["vllm"] = {"skipped": f"no {VLLM_VENV} (bash bench/setup_vllm.sh)"}
    if "llama_cpp" not in servers:
        report["llama_cpp"] = previous.get("llama_cpp", {"skipped": "not asked for (--servers)"})
    elif (LLAMA_CPP_VENV / "bin" / "python").is_file():
        gguf_dir = export_adapter(adapter, "gguf", work / "exported-gguf", overwrite=True)
        theirs = llama_cpp_answers(gguf_dir.folder / gguf_dir.files[0], prompts)
        report["llama_cpp"] = {**compare("llama_cpp", ours, theirs, prompts), "version": _version(LLAMA_CPP_VENV, "llama_cpp_python")}
    else:
        report["llama_cpp"] = {"skipped": f"no {LLAMA_CPP_VENV} (flock /tmp/plugtune-heavy.lock bash bench/setup_llamacpp.sh)"}
    report["seconds"] = round(time.monotonic() - started, 1)

    for server in ("vllm", "llama_cpp"):
        r = report[server]
        line = r.get("skipped") or f"{r['equal']}/{len(prompts)} answers equal, {len(r['differing'])} differing"
        print(f"{server}: {line}")
        for d in r.get("differing", [])[:3]:
            print(f"  {d['prompt'][-60:]!r}: plugtune {d['plugtune']!r} vs {d[server]!r}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.write:
        write_section(section(report, args), key="export")
    return 0


def _version(venv: Path, dist: str) -> str:
    found = next(venv.glob(f"lib/python3*/site-packages/{dist}-*.dist-info"), None)
    return found.name.removeprefix(f"{dist}-").removesuffix(".dist-info") if found else "?"


def section(report: dict, args: argparse.Namespace) -> str:
    command = "flock /tmp/plugtune-heavy.lock .venv/bin/python bench/export_check.py " + shlex.join(
        [*(["--adapter", str(args.adapter)] if args.adapter else ["--steps", str(args.steps)]), "--prompts", str(args.prompts), "--write"])
    rows = []
    for server, label in (("vllm", "vLLM CPU (`--dtype float32`, `--lora-modules`)"), ("llama_cpp", "llama.cpp (llama-cpp-python, base Q4_1 GGUF + LoRA GGUF)")):
        r = report[server]
        if "skipped" in r:
            rows.append(f"| {label} | not run: {r['skipped']} | |")
        else:
            example = r["differing"][0] if r["differing"] else None
            shown = f"{example['plugtune']!r} vs {example[server]!r}" if example else ""
            rows.append(f"| {label} {r.get('version', '')} | {r['equal']} / {report['prompts']} | {len(r['differing'])} {shown} |")
    return "\n".join([
        "## Export: the same answers on other servers",
        "",
        f"`{command}`: the quickstart recipe trained {args.steps} steps with rsLoRA on (so the export folds a scaling), "
        f"exported with `plugtune export`, and {report['prompts']} held-out support tickets asked greedy "
        f"({report['max_tokens']} tokens) on each server and through `AdapterHost` (fp32). Answers compared as text "
        "(leading/trailing space ignored).",
        "",
        "| server | answers equal | differing |",
        "| --- | --- | --- |",
        *rows,
    ])


if __name__ == "__main__":
    sys.exit(main())
