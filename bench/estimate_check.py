"""``plugtune estimate`` against real runs: every shipped recipe, estimated and then trained for
a few steps, each in a fresh child process. Writes bench/results/estimate.md (the table in
BENCHMARKS.md's "Memory estimate" section) and estimate.json (every part of every estimate
beside the measurements: what the constants of core/training/estimate.py were fitted on).

    flock /tmp/plugtune-heavy.lock .venv/bin/python bench/estimate_check.py [recipes/x.yaml ...]  # rows of x replace theirs
    .venv/bin/python bench/estimate_check.py --estimates-only   # re-estimate against the last measurements

``--estimates-only`` runs only the estimates (seconds each) and takes the measured columns from
the last full run's bench/results/estimate.json: for refitting the constants of
core/training/estimate.py without training again. A second-stage recipe is then estimated on
its first stage's base (the merged base has the same shapes and dtypes).

For each recipe: ``plugtune estimate RECIPE <overrides> --json``, then ``plugtune run RECIPE
<overrides>`` with the same overrides (``training.max_steps=STEPS training.eval_before=false
training.max_eval_examples=8``, output to a temporary folder). The measured peak is the run's
peak RSS (``os.wait4``'s ``ru_maxrss`` of that child alone: load, training and the final
evaluation of 8 rows, whose batch is no larger than a training batch); the measured s/step is
the median ``step_seconds`` of ``metrics.jsonl`` after the first step (which warms up). A
recipe whose ``base_model`` is another shipped recipe's output (a second stage) trains on
that recipe's bench output. Recipes that cannot run here are skipped with the reason (a hub
model not in the local cache). Nothing is kept: the temporary folder is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PLUGTUNE = [sys.executable, "-m", "plugtune.cli"]
STEPS = 4
TOLERANCE = 0.25
RESULTS = ROOT / "bench" / "results" / "estimate.md"


def overrides(out: Path, extra: list[str]) -> list[str]:
    return [f"training.max_steps={STEPS}", "training.eval_before=false", "training.max_eval_examples=8",
            f"output.dir={out}", *extra]


def skip_reason(raw: dict) -> str | None:
    """Why a recipe cannot run on this CPU machine offline, or None."""
    base = str(raw.get("base_model", ""))
    if "/" in base and not base.startswith(("adapters/", ".", "/")):
        from plugtune.training.preview import local_tokenizer

        found = local_tokenizer(base)
        if found.tokenizer is None:
            return f"base model {base} is on the hub, not on this machine (the hub is unreachable here)"
    return None


def measure(recipe: Path, args: list[str], env: dict[str, str]) -> dict:
    """One run in a child: its peak RSS, median step seconds, status."""
    start = time.time()
    child = subprocess.Popen([*PLUGTUNE, "run", str(recipe), *args, "--quiet"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    result = {"status": child.returncode, "peak": usage.ru_maxrss * 1024, "wall": time.time() - start}
    if child.returncode:
        result["error"] = (stderr.strip().splitlines() or ["?"])[-1][:200]
        return result
    out = next(a.split("=", 1)[1] for a in args if a.startswith("output.dir="))
    steps = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = [r["step_seconds"] for r in steps if r.get("event") == "train"]
    result["step_seconds"] = statistics.median(seconds[1:] or seconds)
    return result


def main(argv: list[str]) -> int:
    estimates_only = "--estimates-only" in argv
    argv = [a for a in argv if a != "--estimates-only"]
    previous = {}
    if estimates_only:
        previous = {r["recipe"]: r["measured"] for r in json.loads(RESULTS.with_suffix(".json").read_text())
                    if "measured" in r}
    recipes = [Path(a) for a in argv] or sorted((ROOT / "recipes").glob("*.yaml"))
    raws = {r: yaml.safe_load(r.read_text()) for r in recipes}
    outputs = {str((raw.get("output") or {}).get("dir") or f"adapters/{raw['name']}"): r for r, raw in raws.items()}
    stage_two = {r for r, raw in raws.items() if str(raw.get("base_model")) in outputs}
    order = [r for r in recipes if r not in stage_two] + [r for r in recipes if r in stage_two]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="plugtune-estimate-check-"))
    rows, done = [], {}
    try:
        for recipe in order:
            raw = raws[recipe]
            name = raw["name"]
            reason = skip_reason(raw)
            extra = []
            base = str(raw.get("base_model"))
            if recipe in stage_two and estimates_only:
                extra = [f"base_model={raws[outputs[base]]['base_model']}"]
            elif recipe in stage_two:
                parent = done.get(base)
                if parent is None:
                    reason = f"its base {base} is the output of a recipe that did not run here"
                else:
                    extra = [f"base_model={parent}"]
            if reason:
                rows.append({"recipe": name, "skipped": reason})
                print(f"{name}: skipped ({reason})", flush=True)
                continue
            out = tmp / name
            args = overrides(out, extra)
            est = subprocess.run([*PLUGTUNE, "estimate", str(recipe), *args, "--json"], cwd=ROOT, env=env,
                                 capture_output=True, text=True)
            if est.returncode:
                rows.append({"recipe": name, "skipped": f"estimate failed: {est.stderr.strip()[-200:]}"})
                print(f"{name}: estimate failed: {est.stderr.strip()[-300:]}", flush=True)
                continue
            estimate = json.loads(est.stdout)
            if estimates_only and name not in previous:
                rows.append({"recipe": name, "skipped": "no measurement in the last full run"})
                continue
            measured = previous[name] if estimates_only else measure(recipe, args, env)
            row = {"recipe": name, "estimate": estimate, "measured": measured}
            rows.append(row)
            if measured["status"] == 0:
                done[str(recipe.relative_to(ROOT) if recipe.is_absolute() else recipe)] = out
                done[f"adapters/{name}"] = out
                for key, path in outputs.items():
                    if path == recipe:
                        done[key] = out
            print(line(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if argv and RESULTS.with_suffix(".json").exists():  # some recipes: their rows replace theirs, the rest stay
        mine = {r["recipe"] for r in rows}
        kept = [r for r in json.loads(RESULTS.with_suffix(".json").read_text()) if r["recipe"] not in mine]
        rows = sorted(kept + rows, key=lambda r: r["recipe"])
    text = table(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    if not estimates_only:  # the measurements stay those of the last full run
        RESULTS.with_suffix(".json").write_text(json.dumps(rows, indent=1))  # every part, for refitting the constants
    print(text)
    measured = [r for r in rows if "measured" in r and r["measured"]["status"] == 0]
    worst = max((abs(r["estimate"]["peak_bytes"] / r["measured"]["peak"] - 1) for r in measured), default=0.0)
    print(f"worst peak error {worst:.1%} over {len(measured)} recipes (bar: {TOLERANCE:.0%})")
    return 0 if worst <= TOLERANCE else 1


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def line(row: dict) -> str:
    e, m = row["estimate"], row["measured"]
    if m["status"]:
        return f"{row['recipe']}: run failed ({m.get('error')})"
    return (f"{row['recipe']}: estimated {mb(e['peak_bytes'])} measured {mb(m['peak'])} "
            f"({e['peak_bytes'] / m['peak']:.2f}); s/step {e['seconds_per_step']:.2f} vs {m['step_seconds']:.2f} "
            f"({e['seconds_per_step'] / m['step_seconds']:.2f})")


def table(rows: list[dict]) -> str:
    out = ["| recipe | estimated peak | measured peak | ratio | estimated s/step | measured s/step | ratio |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if "skipped" in row:
            out.append(f"| {row['recipe']} | skipped: {row['skipped']} | | | | | |")
            continue
        e, m = row["estimate"], row["measured"]
        if m["status"]:
            out.append(f"| {row['recipe']} | {mb(e['peak_bytes'])} | run failed: {m.get('error')} | | | | |")
            continue
        out.append(f"| {row['recipe']} | {mb(e['peak_bytes'])} | {mb(m['peak'])} | {e['peak_bytes'] / m['peak']:.2f} | "
                   f"{e['seconds_per_step']:.2f} | {m['step_seconds']:.2f} | {e['seconds_per_step'] / m['step_seconds']:.2f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
