"""Every tuning method side by side on MiniLM-L6, SST-2 and AG News: the methods table in
BENCHMARKS.md ("methods" section), from one command.

    python bench/methods.py                    # or: make bench; about 30 minutes on 2 idle CPU cores
    python bench/methods.py --methods lora,dora  # those rows again; the others are kept
    python bench/methods.py --quick            # smoke run: tiny sizes, one process, no BENCHMARKS.md
    python bench/methods.py --rewrite          # the sections again from bench/results/methods.json

What every method gets alike (``FULL`` below): its recipe in ``bench/recipes/methods/<name>.yaml``
(MiniLM-L6, ``minilm-l6``, with a new classifier head; BERT module names query/key/value/dense),
1,024 seeded training rows, batch 16, one epoch (64 steps), 6 warm-up steps then linear decay,
sequences cut at 64 tokens, seed 0, no regularizer.

The learning rate, by one rule for every method (``choose_rate``): each method has a centre
rate, the usual one for its family (``Method.centre``), and trains at centre/3, centre and 3 x
centre on SST-2; the rate with the best accuracy on a 500-row validation split carved from
SST-2 *train* (the recipe's ``test_size: 0.1`` split, disjoint from the training rows; ties go
to the lower validation loss) wins. The winning run is the SST-2 row (no retraining), and
AG News trains once at the same rate: the search is never run on AG News or on a dev file.

What the columns are and where they come from:

* SST-2 dev accuracy: the winning adapter loaded on an ``AdapterHost`` and run over the whole
  ``../shared/data/sst2/dev.tsv`` (6,735 rows), and over its rows of 15 words or more (1,496
  full sentences: ``../shared/data/README.md`` explains why the short phrases overstate it).
* AG News dev accuracy: the run's own evaluation on all 2,001 rows of ``agnews/dev.tsv``
  (1,024 training rows of ``agnews/train.tsv``, the same steps and the rate SST-2 chose).
* trainable parameters and adapter file (``adapter_model.safetensors``): of the SST-2 run.
* s/step and peak RSS: of the AG News run, alone in a fresh process (its inputs are the longer
  ones), so the peak is that run's own.
* resident bytes: what the adapter's tensors take on the host (``host.list()``, where the
  method's handler reports it); switch: ``host.use`` between the best and the second-best
  search adapters of the method, median of ``SWITCHES`` switches.
* mixes rows / merges / combines: read from the hosting handler's capabilities
  (``plugtune.testing.handler_capabilities``: ``MixesRows``; ``Folds`` or ``Merges``;
  ``Combines``), never from a list kept here.

Time: about 100 s per LoRA-sized method on 2 idle cores (3 SST-2 trainings of 64 steps at
0.16 s/step with their loading and validation, the 6,735-row dev pass, one AG News training,
two process starts), so about 30 minutes for the 17 methods (estimated from idle-machine
step times and the cost ratios of a measured run; the runs here so far shared the cores with
other jobs and took 5-20x longer). ``Sizes`` is the one knob: fewer training rows shorten
every method alike.

A method in ``METHODS`` whose plugin is not installed is listed as such; one that fails says
how in its row, and the run goes on (and exits 1 at the end). ``EXCLUDED`` names registered
methods left out, with the reason; tests/test_bench_methods.py checks that every registered
method is in one of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
RECIPES = ROOT / "bench" / "recipes" / "methods"
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results" / "methods.json"  # what the table is made from (kept for --methods)
LONG_WORDS = 15  # SST-2 dev rows of at least this many words are full sentences
SWITCHES = 201


@dataclass(frozen=True)
class Method:
    """One row of the table: the method's registered name and its family's usual rate."""

    name: str
    centre: float
    purpose: str  # one line: what it is for (the README's methods table says the same)

    @property
    def recipe(self) -> Path:
        return RECIPES / f"{self.name}.yaml"


METHODS = [
    Method("lora", 1e-3, "the default: low-rank updates, mixes rows in one batch, folds into the base"),
    Method("dora", 1e-3, "LoRA with a learned magnitude per output; closer to full fine-tuning at low rank"),
    Method("ia3", 1e-2, "fewest parameters: one scaling vector per targeted layer"),
    Method("loha", 3e-3, "LoRA's budget with a higher effective rank (Hadamard product of two pairs)"),
    Method("lokr", 3e-3, "Kronecker-factored update: tiny files for wide layers"),
    Method("vera", 1e-2, "frozen shared random matrices, only scaling vectors train: very small adapters"),
    Method("oft", 3e-3, "orthogonal rotation of the weights: keeps their norms and angles"),
    Method("boft", 3e-3, "OFT with butterfly-factored blocks: denser rotations per parameter"),
    Method("adalora", 3e-3, "LoRA whose rank budget moves to the layers that need it during training"),
    Method("ln_tuning", 3e-3, "only the LayerNorms train: a cheap baseline"),
    Method("prompt_tuning", 3e-2, "trained input embeddings; nothing inside the model changes"),
    Method("p_tuning", 1e-2, "virtual tokens produced by a small encoder"),
    Method("prefix", 1e-2, "trained keys/values prepended at every layer"),
    Method("full", 1e-4, "every weight trains; the reference point, saved as a delta"),
    Method("int8", 1e-3, "LoRA on an 8-bit base: less memory for the frozen weights"),
    Method("qlora", 1e-3, "LoRA on a 4-bit NF4 base: the least memory for the frozen weights"),
    Method("peft", 1e-3, "any other peft tuner by type (here HRA, Householder reflections)"),
]
EXCLUDED: dict[str, str] = {}  # registered method name -> why it has no row
GRID = (1 / 3, 1.0, 3.0)  # rates searched: centre times these


@dataclass(frozen=True)
class Sizes:
    train_rows: int = 1024
    val_rows: int = 500
    batch_size: int = 16
    warmup_steps: int = 6
    max_length: int = 64
    dev_rows: int | None = None  # SST-2 dev rows evaluated (None: all)
    agnews_dev_rows: int | None = None
    grid: tuple[float, ...] = GRID
    switches: int = SWITCHES


FULL = Sizes()
QUICK = Sizes(train_rows=48, val_rows=32, batch_size=16, warmup_steps=1, dev_rows=128, agnews_dev_rows=64,
              grid=(1.0,), switches=21)


# -- one job (run in a fresh process, or in this one with --quick) ---------------------------


def _overrides(m: Method, sizes: Sizes, lr: float, out: Path) -> list[str]:
    return [f"data.options.max_train_rows={sizes.train_rows}", f"data.options.max_test_rows={sizes.val_rows}",
            f"training.batch_size={sizes.batch_size}", f"training.warmup_steps={sizes.warmup_steps}",
            f"training.max_length={sizes.max_length}", "training.epochs=1", "training.eval_before=false",
            f"training.learning_rate={lr!r}", f"output.dir={out}"]


def _train(recipe: Path, overrides: list[str]) -> dict[str, Any]:
    import plugtune
    from plugtune.artifacts.adapters import WEIGHTS_FILE

    loaded = plugtune.load_recipe(recipe, overrides)
    result = plugtune.run(loaded, show_progress=False, overwrite=True)
    return {"adapter_dir": str(result.adapter_dir), "steps": result.steps,
            "seconds_per_step": result.train_seconds / max(result.steps, 1),
            "trainable_parameters": result.trainable_parameters, "total_parameters": result.total_parameters,
            "adapter_bytes": (Path(result.adapter_dir) / WEIGHTS_FILE).stat().st_size,
            "accuracy": result.after["accuracy"], "loss": result.after["loss"]}


def choose_rate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The search's rule: best validation accuracy, ties to the lower validation loss."""
    return max(runs, key=lambda r: (round(r["accuracy"], 6), -r["loss"]))


def _read_tsv(path: Path, text: str, limit: int | None) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:] if line.strip()]
    rows = [(r[text].strip(), r["label"].strip()) for r in rows]
    return rows[:limit] if limit else rows


def _host_measures(m: Method, winner: dict[str, Any], second: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """Load the winning (and second) adapter on one AdapterHost: dev accuracy, resident bytes,
    switch time, the handler's capabilities."""
    from plugtune.serving.host import AdapterHost
    from plugtune.testing import handler_capabilities, hosted_handler

    host = AdapterHost.from_adapters(winner["adapter_dir"], device="cpu")
    name = host.active
    other = host.load(second["adapter_dir"], "second")
    dev = _read_tsv(DATA / "sst2" / "dev.tsv", "sentence", sizes.dev_rows)
    started = time.perf_counter()
    order = sorted(range(len(dev)), key=lambda i: len(dev[i][0]))  # similar lengths per batch: less padding
    right = [False] * len(dev)
    for i in range(0, len(order), 64):
        batch = order[i:i + 64]
        for j, got in zip(batch, host.classify([dev[j][0] for j in batch], adapters=name)):
            right[j] = str(got["label"]) == dev[j][1]
    long = [i for i, (text, _) in enumerate(dev) if len(text.split()) >= LONG_WORDS]
    record = {"dev_accuracy": sum(right) / len(dev), "dev_rows": len(dev),
              "dev_long_accuracy": sum(right[i] for i in long) / max(len(long), 1), "dev_long_rows": len(long),
              "dev_eval_seconds": time.perf_counter() - started,
              "resident_bytes": next(r["resident_bytes"] for r in host.list() if r["name"] == name),
              "capabilities": handler_capabilities(hosted_handler(host, name))}
    times = []
    for k in range(sizes.switches):
        target = name if k % 2 else other
        t0 = time.perf_counter_ns()
        host.use(target)
        times.append(time.perf_counter_ns() - t0)
    record["switch_ms"] = statistics.median(times) / 1e6
    return record


def job_sst2(m: Method, sizes: Sizes) -> dict[str, Any]:
    """The rate search on SST-2 (validation split), then the host measurements of the winner."""
    runs = []
    for factor in sizes.grid:
        lr = float(f"{m.centre * factor:.3g}")
        run = _train(m.recipe, _overrides(m, sizes, lr, OUT / "methods" / m.name / f"sst2-lr{lr:g}"))
        runs.append({"learning_rate": lr, **run})
    winner = choose_rate(runs)
    rest = sorted((r for r in runs if r is not winner), key=lambda r: (-r["accuracy"], r["loss"]))
    # the second adapter to switch to: the runner-up (with one rate, the winner again under another name)
    return {"search": runs, "winner": winner, **_host_measures(m, winner, rest[0] if rest else winner, sizes)}


def job_agnews(m: Method, sizes: Sizes, lr: float) -> dict[str, Any]:
    """AG News at the rate SST-2 chose; peak RSS is this process's (run it in a fresh one)."""
    agnews = DATA / "agnews"
    overrides = _overrides(m, sizes, lr, OUT / "methods" / m.name / "agnews") + [
        f"name=agnews-minilm-{m.name.replace('_', '-')}", f"data.options.path={agnews / 'train.tsv'}",
        f"data.options.test_path={agnews / 'dev.tsv'}", "data.options.columns={sentence: text}",
        f"data.options.max_test_rows={sizes.agnews_dev_rows or 'null'}"]
    run = _train(m.recipe, overrides)
    dev_rows = len(_read_tsv(agnews / "dev.tsv", "text", None))
    return {**run, "test_rows": min(dev_rows, sizes.agnews_dev_rows or dev_rows), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


JOBS = {"sst2": job_sst2, "agnews": job_agnews}


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if not type(exc).__module__.startswith("plugtune") else str(exc)
    return " ".join(text.split())[:300]


def run_job(kind: str, m: Method, sizes: Sizes, fresh: bool, **kwargs: Any) -> dict[str, Any]:
    """One job's record (``{"error": ...}`` when it failed), in a fresh process or in this one."""
    started, cpu = time.perf_counter(), _cpu_seconds()
    if not fresh:
        try:
            record = JOBS[kind](m, sizes, **kwargs)
        except Exception as exc:  # noqa: BLE001 - one method failing is reported in its row
            traceback.print_exc()
            record = {"error": _one_line(exc)}
    else:
        spec = json.dumps({"kind": kind, "method": m.name, "sizes": asdict(sizes), "kwargs": kwargs})
        done = subprocess.run([sys.executable, __file__, "--job", spec], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            record = json.loads(lines[-1])
        else:
            tail = [l for l in done.stderr.strip().splitlines() if l.strip()] or [f"exit status {done.returncode}"]
            print(done.stderr[-4000:], file=sys.stderr)
            record = {"error": " ".join(tail[-1].split())[:300]}
    record["wall_seconds"] = time.perf_counter() - started
    record["cpu_seconds"] = _cpu_seconds() - cpu
    return record


def _cpu_seconds() -> float:
    """CPU time of this process and of the job processes it waited for."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _job_main(spec: str) -> None:
    job = json.loads(spec)
    m = next(x for x in METHODS if x.name == job["method"])
    sizes = Sizes(**{**job["sizes"], "grid": tuple(job["sizes"]["grid"])})
    print(json.dumps(JOBS[job["kind"]](m, sizes, **job["kwargs"])))


# -- the whole run ----------------------------------------------------------------------------


def installed_methods() -> set[str]:
    from plugtune.kernel.registry import get_plugin_system

    return set(get_plugin_system().names("method"))


def bench_method(m: Method, sizes: Sizes, fresh: bool, installed: set[str]) -> dict[str, Any]:
    if m.name not in installed:
        return {"method": m.name, "status": "not installed"}
    print(f"== {m.name}", flush=True)
    sst2 = run_job("sst2", m, sizes, fresh)
    if "error" in sst2:
        return {"method": m.name, "status": "failed", "error": sst2["error"], "sst2": sst2}
    agnews = run_job("agnews", m, sizes, fresh, lr=sst2["winner"]["learning_rate"])
    status = "failed" if "error" in agnews else "ok"
    return {"method": m.name, "status": status, "error": agnews.get("error"), "sst2": sst2, "agnews": agnews}


def size(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _rate(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def _row(r: dict[str, Any]) -> str:
    if r["status"] in ("not installed", "not run"):
        label = "not installed on this branch" if r["status"] == "not installed" else "not run yet (`--methods`)"
        return f"| {r['method']} | {label} |" + " |" * 12
    if r["status"] == "failed" and "winner" not in r.get("sst2", {}):
        return f"| {r['method']} | failed: {r['error']} |" + " |" * 12
    s, a = r["sst2"], r.get("agnews", {})
    w = s["winner"]
    caps = s["capabilities"]
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    agnews = f"{a['accuracy']:.3f}" if "accuracy" in a else f"failed: {r['error']}"
    resident = size(s["resident_bytes"]) if s.get("resident_bytes") is not None else "not reported"
    return (f"| {r['method']} | {s['dev_accuracy']:.3f} | {s['dev_long_accuracy']:.3f} | {agnews} | {_rate(w['learning_rate'])} "
            f"| {w['trainable_parameters']:,} ({100 * w['trainable_parameters'] / w['total_parameters']:.2f}%) "
            f"| {size(w['adapter_bytes'])} | {a.get('seconds_per_step', float('nan')):.3f} "
            f"| {a.get('peak_rss_mb', float('nan')):.0f} MB | {resident} "
            f"| {s['switch_ms']:.3f} ms | {yes('MixesRows' in caps)} | {yes('Folds' in caps or 'Merges' in caps)} "
            f"| {yes('Combines' in caps)} |")


def section(results: dict[str, Any]) -> str:
    sizes = Sizes(**{**results["sizes"], "grid": tuple(results["sizes"]["grid"])})
    rows = [r for r in results["rows"]]
    meta = results["meta"]
    lines = [
        "## Tuning methods (issue 15)",
        "",
        f"Command: `python bench/methods.py` (part of `make bench`). Machine: {meta['machine']}; {runs_line(meta['runs'], rows)}.",
        "",
        f"MiniLM-L6 (`minilm-l6`) with a new classifier head; every method on the same rows and steps: {sizes.train_rows:,} "
        f"seeded training rows, batch {sizes.batch_size}, one epoch ({-(-sizes.train_rows // sizes.batch_size)} steps), "
        f"{sizes.warmup_steps} warm-up steps then linear decay, {sizes.max_length} tokens at most, seed 0; recipes in "
        "`bench/recipes/methods/`. Learning rate: each method trains at centre/3, centre and 3 x centre (its family's "
        f"usual rate) on SST-2 and keeps the one with the best accuracy on {sizes.val_rows} validation rows carved from "
        "SST-2 train (ties: lower validation loss); that run is the SST-2 row, and AG News trains once at the same rate.",
        "",
        f"SST-2 dev: all {rows_of(rows, 'dev_rows')} rows of `../shared/data/sst2/dev.tsv`, and its {rows_of(rows, 'dev_long_rows')} "
        f"rows of {LONG_WORDS}+ words (full sentences; the short phrases overlap train, see `../shared/data/README.md`). "
        f"AG News dev: {agnews_rows(rows)} rows of `../shared/data/agnews/dev.tsv` ({sizes.train_rows:,} training rows of its train file). "
        "s/step and peak RSS: the AG News run (longer inputs), alone in a fresh process. Resident: the adapter's tensors on an "
        f"`AdapterHost`; switch: `host.use` between two adapters of the method, median of {sizes.switches}. "
        "Mixes / merges / combines: the hosting handler's declared capabilities (`MixesRows`; `Folds` or `Merges`; `Combines`). "
        "The peft tuners' handler combines through an exact conversion to LoRA, so at combine time it refuses, with the "
        "reason, adapters whose update is not an added matrix (IA3, OFT, BOFT, DoRA, LN tuning).",
        "",
        "| method | SST-2 dev acc | SST-2 dev acc, 15+ words | AG News dev acc | lr | trainable parameters | adapter file "
        "| s/step | peak RSS | resident on host | switch | mixes rows | merges | combines |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | :---: | :---: |",
    ]
    lines += [_row(r) for r in rows]
    if any(run.get("load_max", run["load"]) > 2.5 for run in meta["runs"]):
        lines += ["", "Other jobs shared the 2 cores while rows were measured (the load averages above): seconds per step "
                  "are several times an idle machine's (LoRA's SST-2 step: 0.16 s idle), and rows from different runs "
                  "saw different loads; accuracy, sizes, parameters and capabilities do not depend on it."]
    searched = [r for r in rows if "search" in r.get("sst2", {})]
    if searched:
        lines += ["", "The search (SST-2 validation accuracy at each rate; the chosen one in bold):", ""]
        for r in searched:
            w = r["sst2"]["winner"]["learning_rate"]
            cells = [(f"**{_rate(s['learning_rate'])}: {s['accuracy']:.3f}**" if s["learning_rate"] == w
                      else f"{_rate(s['learning_rate'])}: {s['accuracy']:.3f}") for s in r["sst2"]["search"]]
            wall = r["sst2"].get("wall_seconds", 0) + r.get("agnews", {}).get("wall_seconds", 0)
            rates = [x["learning_rate"] for x in r["sst2"]["search"]]
            edge = "; at the edge of its grid, so a wider search may find a better rate" if len(rates) > 1 and w in (min(rates), max(rates)) else ""
            lines.append(f"* {r['method']}: " + ", ".join(cells) + f" ({wall / 60:.1f} min for the method's runs{edge})")
    if EXCLUDED:
        lines += ["", "Registered but not in the table: " + "; ".join(f"`{k}` ({v})" for k, v in sorted(EXCLUDED.items())) + "."]
    lines += ["", "On a CPU, int8 and 4-bit run bitsandbytes' CPU kernels: they hold the base in less memory but are not "
              "faster than fp32 there; their GPU figures come from `bench/gpu_check.sh`.", ""]
    return "\n".join(lines)


def runs_line(runs: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """When the rows were measured: the whole table in one run, or rows from --methods runs."""
    parts = []
    for run in runs:
        which = "every method" if set(run["methods"]) >= {m.name for m in METHODS} else ", ".join(run["methods"])
        peak = f", up to {run['load_max']:.1f} during it" if "load_max" in run else ""
        parts.append(f"{which} in {run['wall_minutes']:.1f} min wall time ({run['date']}; 1-minute load average "
                     f"{run['load']:.1f} at the start{peak})")
    return "; ".join(parts)


def agnews_rows(rows: list[dict[str, Any]]) -> str:
    found = [r["agnews"]["test_rows"] for r in rows if "test_rows" in r.get("agnews", {})]
    return f"all {found[0]:,}" if found and found[0] == 2001 else f"{found[0]:,}" if found else "?"


def rows_of(rows: list[dict[str, Any]], key: str) -> str:
    found = [r["sst2"][key] for r in rows if key in r.get("sst2", {})]
    return f"{found[0]:,}" if found else "?"


def readme_table(results: dict[str, Any]) -> str:
    """The README's methods table: what each method is for, with its figures from the run."""
    found = {r["method"]: r for r in results["rows"]}
    lines = ["| method | what it is for | SST-2 dev, full sentences | AG News dev | trainable parameters | adapter file "
             "| mixes rows / merges |", "| --- | --- | ---: | ---: | ---: | ---: | :---: |"]
    for m in METHODS:
        r = found.get(m.name, {"status": "not run"})
        s = r.get("sst2", {})
        if "winner" not in s:
            lines.append(f"| `{m.name}` | {m.purpose} | | | | | |")
            continue
        caps, w, a = s["capabilities"], s["winner"], r.get("agnews", {})
        agnews = f"{a['accuracy']:.3f}" if "accuracy" in a else ""
        both = f"{'yes' if 'MixesRows' in caps else 'no'} / {'yes' if 'Folds' in caps or 'Merges' in caps else 'no'}"
        lines.append(f"| `{m.name}` | {m.purpose} | {s['dev_long_accuracy']:.3f} | {agnews} | {w['trainable_parameters']:,} "
                     f"| {size(w['adapter_bytes'])} | {both} |")
    return "\n".join(lines)


def write_section(text: str, key: str = "methods", path: Path | None = None) -> None:
    path = path or ROOT / "BENCHMARKS.md"
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    current = path.read_text() if path.exists() else "# Benchmarks\n\nEvery figure here comes from a command in this repository; each section names its command.\n"
    block = f"{start}\n{text}\n{end}"
    if start in current:
        head, rest = current.split(start, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(current)


def comparable(previous: dict[str, Any], sizes: Sizes, machine: str) -> bool:
    """Whether rows kept in RESULTS were measured with these sizes on this kind of machine."""
    return previous["sizes"] == json.loads(json.dumps(asdict(sizes))) and previous["meta"].get("machine") == machine


def merged(rows: list[dict[str, Any]], previous: dict[str, Any] | None, meta: dict[str, Any], sizes: Sizes,
           whole: bool) -> dict[str, Any]:
    """The table's records: this run's rows, then (for a --methods run) the previous run's
    rows of the other methods, in METHODS order; a method run by neither is "not run"."""
    fresh = {r["method"]: r for r in rows}
    old = {r["method"]: r for r in previous["rows"]} if previous else {}
    if previous:
        meta = {**meta, "runs": [run for run in previous["meta"]["runs"] if set(run["methods"]) - set(fresh)] + meta["runs"]}
    names = [m.name for m in METHODS] if whole or previous else [r["method"] for r in rows]
    return {"sizes": asdict(sizes), "meta": meta,
            "rows": [fresh.get(n) or old.get(n) or {"method": n, "status": "not run"} for n in names]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one rate, all in this process; prints, writes no BENCHMARKS.md")
    parser.add_argument("--methods", help="comma-separated method names (default: all); their rows replace those in the table")
    parser.add_argument("--rewrite", action="store_true", help=f"only rewrite the sections from {RESULTS.relative_to(ROOT)}")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:
        _job_main(args.job)
        return 0
    if args.rewrite:
        kept = json.loads(RESULTS.read_text())
        sizes = Sizes(**{**kept["sizes"], "grid": tuple(kept["sizes"]["grid"])})
        results = merged([], kept, {"machine": kept["meta"]["machine"], "runs": []}, sizes, whole=True)
        write_section(section(results))
        write_section(readme_table(results), key="methods-table", path=ROOT / "README.md")
        return 0
    chosen = METHODS
    if args.methods:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        unknown = [n for n in names if n not in {m.name for m in METHODS}]
        if unknown:
            print(f"bench/methods.py: unknown method(s) {', '.join(unknown)}; known: {', '.join(m.name for m in METHODS)}", file=sys.stderr)
            return 2
        chosen = [m for m in METHODS if m.name in names]
    if not (DATA / "sst2" / "train.tsv").is_file() or not (DATA / "agnews" / "train.tsv").is_file():
        print(f"bench/methods.py: needs the SST-2 and AG News files in {DATA} (beside this checkout)", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    installed = installed_methods()
    load, started = os.getloadavg()[0], time.perf_counter()
    loads = [load]
    rows = []
    machine = f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__}, fp32"
    previous = json.loads(RESULTS.read_text()) if args.methods and not args.quick and RESULTS.is_file() else None
    if previous is not None and not comparable(previous, sizes, machine):
        previous = None  # other sizes or another machine: the old rows cannot stand beside the new ones
    for m in chosen:
        rows.append(bench_method(m, sizes, fresh=not args.quick, installed=installed))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "sst2"} | {"summary": _row(rows[-1])}), flush=True)
        loads.append(os.getloadavg()[0])  # other jobs on the machine slow every figure here: say how busy it was
        run = {"methods": [r["method"] for r in rows], "wall_minutes": (time.perf_counter() - started) / 60, "load": load,
               "load_max": max(loads), "date": time.strftime("%Y-%m-%d")}
        results = merged(rows, previous, {"machine": machine, "runs": [run]}, sizes, whole=not args.methods)
        if not args.quick:  # after every method, so a stopped run keeps the rows it finished
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
            write_section(section(results))
            write_section(readme_table(results), key="methods-table", path=ROOT / "README.md")
    results = merged(rows, previous, {"machine": machine, "runs": [run]}, sizes, whole=not args.methods)
    if args.quick:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "methods-quick.md").write_text(section(results))
    print(section(results))
    failed = [r["method"] for r in rows if r["status"] == "failed"]
    if failed:
        print(f"bench/methods.py: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
