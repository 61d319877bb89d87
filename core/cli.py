"""The ``plugtune`` command.

User errors (:class:`~plugtune.kernel.errors.PlugtuneError`) print ``error: ...`` without a
traceback and exit with the error's code; Ctrl-C exits 130. Any other exception is a bug: the
last guard in :func:`main` prints one line naming the command, the exception and where it was
raised, and exits 70 (``--debug`` or ``PLUGTUNE_DEBUG=1``: the traceback instead). Plugins are loaded only by the
subcommands that need them, so ``plugtune --help`` works even when a plugin is broken.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from plugtune import __version__
from plugtune.kernel.errors import PlugtuneError

EPILOG = "Recipes: recipes/*.yaml. Docs: README.md. Set PLUGTUNE_STRICT_PLUGINS=1 to fail on broken plugins."


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


# -- subcommands ------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from plugtune.training.recipe import load_recipe

    from rich.markup import escape

    from plugtune.training.preview import validate_summary

    recipe = load_recipe(args.recipe, args.overrides)
    console = _console()
    data = (f"{recipe.mix.how} of {len(recipe.sources)} sources ({', '.join(s.name for s in recipe.sources)})"
            if recipe.mix else f"loader {recipe.loader.name}")
    console.print(f"[green]ok[/] {escape(str(args.recipe))}: {recipe.name} — {recipe.method.name} on "
                  f"{escape(recipe.spec.base_model)}, {recipe.task.type}, {escape(data)}, "
                  f"evaluators {', '.join(b.name for b in recipe.evaluators) or 'none'}, "
                  f"regularizers {', '.join(b.name for b in recipe.regularizers) or 'none'} -> {escape(str(recipe.output_dir))}")
    print_estimate_line(recipe, console)  # before the data line, which stays last
    console.print(validate_summary(recipe), markup=False, highlight=False, soft_wrap=True)  # one line, piped or not
    return 0


# -- estimate (core/training/estimate.py) -------------------------------------------------------


def print_estimate_line(recipe: Any, console: Any) -> None:
    """``validate``'s estimate line (peak and s/step), a warning line when the peak exceeds
    the available memory, or why it was skipped; never a failure."""
    from plugtune.training.estimate import EstimateUnavailable, estimate, summary_line, warning_line

    try:
        est = estimate(recipe)
    except EstimateUnavailable as exc:
        console.print(f"estimate skipped: {exc}", markup=False, highlight=False, soft_wrap=True)
        return
    except PlugtuneError:
        raise  # the recipe's own problem (its data): validate reports it as it would without the estimate
    except Exception as exc:  # noqa: BLE001 - the estimate is advice: a bug in it never fails validation
        console.print(f"estimate skipped: {internal_error_line('estimate', exc).removeprefix('error: ')}",
                      markup=False, highlight=False, soft_wrap=True)
        return
    console.print(summary_line(est), markup=False, highlight=False, soft_wrap=True)
    warning = warning_line(est)
    if warning:
        console.print(f"[yellow]{warning}[/]", highlight=False, soft_wrap=True)


def cmd_estimate(args: argparse.Namespace) -> int:
    from plugtune.training.estimate import estimate, render
    from plugtune.training.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    est = estimate(recipe)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    render(est, _console())
    return 0


def add_estimate_parser(sub: Any) -> None:
    p = sub.add_parser("estimate", help="peak memory and seconds per step of a recipe, before any weights load",
                       epilog="Set PLUGTUNE_AVAILABLE_MEMORY (bytes, 512M, 8G) to compare with another machine's memory.")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)
    p.add_argument("--json", action="store_true", help="the parts and totals as JSON")
    p.set_defaults(func=cmd_estimate)


def cmd_preview(args: argparse.Namespace) -> int:
    from plugtune.training.preview import preview
    from plugtune.training.recipe import load_recipe

    check_count(args.rows, "--rows", least=0)
    recipe = load_recipe(args.recipe, args.overrides)
    preview(recipe, _console(), split=args.split, rows=args.rows)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from plugtune.kernel.errors import RecipeError
    from plugtune.training.launch import in_distributed_run, is_main_process, launch
    from plugtune.training.recipe import load_recipe
    from plugtune.training.train import comparison_table, run

    recipe = load_recipe(args.recipe, args.overrides)  # errors show once, before any process starts
    if args.nproc < 1:
        raise RecipeError([f"--nproc: {args.nproc} is not a process count; use 1 or more"])
    if args.nproc > 1 and not in_distributed_run():
        flags = [f for f, on in (("--overwrite", args.overwrite), ("--quiet", args.quiet), ("--resume", args.resume)) if on]
        return launch(args.nproc, ["run", args.recipe, *args.overrides, *flags])
    console = _console(stderr=True)
    result = run(recipe, console=console, overwrite=args.overwrite or None, show_progress=not args.quiet, resume=args.resume)
    if not is_main_process():
        return 0
    out = _console()
    out.print(comparison_table({"base": result.before, recipe.name: result.after},
                               title=f"{recipe.name}: held-out metrics before and after training",
                               directions=recipe.metric_directions()))
    out.print(f"adapter saved to [bold]{result.adapter_dir}[/] ({result.steps} steps in {result.train_seconds:.1f} s, "
              f"{result.trainable_parameters:,} of {result.total_parameters:,} parameters trained)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    import subprocess

    from plugtune.training.sweep import DEFAULT_VALIDATION, Sweep, label_of, versus_baseline

    console = _console(stderr=True)
    sweep = Sweep(args.recipe, args.overrides, args.space, trials=args.trials, budget=args.budget, metric=args.metric,
                  validation=args.validation or DEFAULT_VALIDATION, folder=args.dir, overwrite=args.overwrite,
                  fresh=args.fresh, seed=args.seed, console=console, baseline=not args.no_baseline)
    results = sweep.run()
    out = _console()
    out.print(sweep.table(results))
    board = sweep.write_leaderboard(results)
    best = sweep.keep_best(results)
    if best is None:
        raise PlugtuneError(f"no trial finished; their logs are in {sweep.folder / 'logs'}")
    out.print(f"best: {label_of(best)} ({sweep.metric} {best.value:.4f} on the validation rows), copied to "
              f"[bold]{sweep.output}[/]; leaderboard: {board}")
    comparison = versus_baseline(sweep, results, best)
    if comparison:
        out.print(comparison)
    if args.no_test:
        return 0
    console.print("evaluating the best adapter once on the recipe's test split")
    return subprocess.run([sys.executable, "-m", "plugtune.cli", "eval", args.recipe, *args.overrides,
                           "--adapter", str(sweep.output), "--json", str(sweep.folder / "test.json")]).returncode


def cmd_plugins(args: argparse.Namespace) -> int:
    from plugtune.kernel.registry import KIND_LABELS, get_plugin_system

    system = get_plugin_system()
    rows = []
    for info in system.plugins.values():
        provides = {kind: [c.name for c in comps.values() if c.plugin.name == info.name]
                    for kind, comps in system.components.items()}
        rows.append({"name": info.name, "module": info.module, "distribution": info.distribution,
                     "version": info.version, "builtin": info.builtin,
                     "components": {k: v for k, v in provides.items() if v}})
    if args.json:
        print(json.dumps({"plugins": rows, "problems": system.problems}, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="plugtune plugins")
    for col in ("plugin", "distribution", "provides"):
        table.add_column(col)
    for row in rows:
        provides = "; ".join(f"{KIND_LABELS[k]}: {', '.join(v)}" for k, v in row["components"].items()) or "(hooks only)"
        table.add_row(row["name"], f"{row['distribution']} {row['version']}".strip(), provides)
    console = _console()
    console.print(table)
    for problem in system.problems:
        console.print(f"[yellow]problem:[/] {problem}")
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    from rich.table import Table

    from plugtune.artifacts.adapters import WEIGHTS_FILE, list_adapters, read_manifest

    found = list_adapters(args.dir)
    records = []
    for path in found:
        try:
            m = read_manifest(path)
        except PlugtuneError as exc:
            records.append({"path": str(path), "error": str(exc)})
            continue
        after = m.metrics.get("after", {})
        records.append({"path": str(path), "name": m.name, "method": m.method.name, "base": m.base_model.id,
                        "task": m.task.get("type"), "bytes": (path / WEIGHTS_FILE).stat().st_size if (path / WEIGHTS_FILE).exists() else 0,
                        "metrics": after})
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        _console().print(f"no adapters under {args.dir}")
        return 0
    table = Table(title=f"adapters under {args.dir}")
    for col in ("adapter", "method", "base", "task", "size", "metrics (after)"):
        table.add_column(col)
    for r in records:
        if "error" in r:
            table.add_row(r["path"], "[red]unreadable[/]", r["error"], "", "", "")
            continue
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items() if isinstance(v, (int, float)))
        table.add_row(r["path"], r["method"], r["base"], r["task"] or "", _size(r["bytes"]), metrics)
    _console().print(table)
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_eval(args: argparse.Namespace) -> int:
    import copy

    from plugtune.artifacts.adapters import read_manifest
    from plugtune.data.datacheck import bind_tokenizer
    from plugtune.data.encoding import encode_split
    from plugtune.training.evaluation import evaluate
    from plugtune.training.reference import has_reference, precompute
    from plugtune.serving.host import AdapterHost
    from plugtune.training.recipe import load_recipe
    from plugtune.training.train import comparison_table

    if args.json:
        check_output_file(args.json, "--json")  # before the evaluation, not after it
    recipe = load_recipe(args.recipe, args.overrides) if args.recipe else None
    manifests = [read_manifest(a) for a in args.adapters]
    if recipe is None:
        if not manifests:
            raise PlugtuneError("give a recipe (for the data and evaluators) or at least one adapter")
        recipe_dir = getattr(manifests[0], "recipe_dir", None) or Path.cwd()
        recipe = load_recipe(raw=manifests[0].recipe, overrides=args.overrides, base_dir=recipe_dir)
    task = copy.deepcopy(recipe.task)
    if manifests:
        task.labels = manifests[0].task.get("labels")
    splits = recipe.load_data(task=task).splits  # every source, normalized
    task.setup(splits["train"])
    host = AdapterHost.from_base(recipe.spec.base_model, task)
    bind_tokenizer(task, host.tokenizer)
    names = [host.load(a) for a in args.adapters]
    rows, _ = encode_split(splits["test"], task, host.tokenizer, recipe.training.max_length, "test")
    if recipe.training.max_eval_examples:
        rows = rows[: recipe.training.max_eval_examples]
    evaluators = [b.build(task) for b in recipe.evaluators]
    if has_reference(task):  # the reference is the base, as in training
        with host.using(None):
            precompute(host.model, rows, task, batch_size=recipe.training.batch_size * 2,
                       pad_id=host.tokenizer.pad_token_id, device=host._device())
    columns = {}
    for name in [None, *names]:
        with host.using(name):
            columns[name or "base"] = evaluate(
                host.model, rows, task, evaluators, batch_size=recipe.training.batch_size * 2,
                pad_id=host.tokenizer.pad_token_id, device=host._device(), tokenizer=host.tokenizer,
                max_new_tokens=recipe.training.max_new_tokens, max_length=recipe.training.max_length)
    _console().print(comparison_table(columns, title=f"{recipe.name}: {len(rows)} held-out rows",
                                      directions=recipe.metric_directions()))
    if args.json:
        Path(args.json).write_text(json.dumps(columns, indent=2))
    return 0


def check_output_file(path: str | Path, flag: str) -> None:
    """Refuse an output file that cannot be written, before the work whose result it holds:
    its folder missing or not a folder, the path itself a folder, the folder not writable."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise PlugtuneError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    if path.is_dir():
        raise PlugtuneError(f"{flag} {path}: is a folder; give a file name")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PlugtuneError(f"{flag} {path}: not writable")


def check_count(value: int | None, flag: str, *, least: int = 1, most: int | None = None) -> None:
    """A numeric flag outside ``least..most``: one line naming the flag."""
    if value is None:
        return
    if value < least or (most is not None and value > most):
        span = f"{least} to {most}" if most is not None else f"{least} or more"
        raise PlugtuneError(f"{flag}: {value} is out of range; use {span}")


def _host_for(args: argparse.Namespace, classification: bool) -> tuple[Any, list[str | None]]:
    from plugtune.serving.host import AdapterHost
    from plugtune.data.tasks import raw_prompt_task

    if not args.adapter and not args.base:
        raise PlugtuneError("give --adapter DIR (repeatable) or --base MODEL")
    if args.adapter:
        host = AdapterHost.from_adapters(*args.adapter, base_model=args.base, allow_pickle=args.allow_pickle)
        names = list(host.adapters)
    else:
        if classification:
            raise PlugtuneError("classification needs an adapter (the labels live in it): --adapter DIR")
        host = AdapterHost.from_base(args.base, raw_prompt_task())
        names = []
    n = len(args.inputs)
    if args.per_input:
        if len(names) != n:
            raise PlugtuneError(f"--per-input needs one --adapter per input ({n} inputs, {len(names)} adapters)")
        return host, list(names)
    return host, names or [None]


def cmd_generate(args: argparse.Namespace) -> int:
    from plugtune.data.datacheck import context_length

    check_count(args.max_new_tokens, "--max-new-tokens")
    host, names = _host_for(args, classification=False)
    context = context_length(host.base.model)
    if context is not None and args.max_new_tokens >= context:
        raise PlugtuneError(f"--max-new-tokens: {args.max_new_tokens} is past the model's context ({context} tokens, "
                            f"prompt included); use at most {context - 1}")
    console = _console()
    if args.per_input:
        outputs = host.generate(args.inputs, names, max_new_tokens=args.max_new_tokens, raw=args.raw)
        for prompt, name, text in zip(args.inputs, names, outputs):
            console.print(f"[bold]{name}[/] <- {prompt!r}\n  {text}")
        return 0
    for name in names:
        for prompt, text in zip(args.inputs, host.generate(args.inputs, name, max_new_tokens=args.max_new_tokens, raw=args.raw)):
            console.print(f"[bold]{name or 'base'}[/] <- {prompt!r}\n  {text}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    host, names = _host_for(args, classification=True)
    console = _console()
    pairs = list(zip(args.inputs, names)) if args.per_input else [(t, n) for n in names for t in args.inputs]
    results = host.classify([p for p, _ in pairs], [n for _, n in pairs])
    for (text, name), result in zip(pairs, results):
        if "label" not in result:  # a scoring adapter (a reward model): one number per text
            console.print(f"[bold]{name}[/] score {result['score']:.4f} <- {text!r}")
            continue
        score = result["scores"][result["label"]]
        console.print(f"[bold]{name}[/] {result['label']} ({score:.2f}) <- {text!r}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from plugtune.artifacts.hub import is_hub_ref
    from plugtune.artifacts.sharing import fetch_adapter
    from plugtune.artifacts.models import gguf_to_hf, resolve

    for name in args.models:
        if is_hub_ref(name):  # an adapter on the hub: downloaded into the HF cache, then verified
            _console().print(f"{name}: {fetch_adapter(name, endpoint=args.endpoint, token=args.token)}",
                             markup=False, highlight=False, soft_wrap=True)
            continue
        path = resolve(name)
        if isinstance(path, Path) and path.suffix == ".gguf":
            path = gguf_to_hf(path)
        _console().print(f"{name}: {path}")
    return 0


# -- push (an adapter to the Hugging Face hub: core/artifacts/hub.py) --------------------------------


def cmd_push(args: argparse.Namespace) -> int:
    from plugtune.artifacts.sharing import push_adapter

    url, files = push_adapter(args.adapter, args.repo, private=args.private, revision=args.revision,
                              endpoint=args.endpoint, token=args.token)
    _console().print(f"pushed {args.adapter} to {args.repo} ({len(files)} files: {', '.join(files)}): {url}",
                     markup=False, highlight=False, soft_wrap=True)
    return 0


def add_push_parser(sub: Any) -> None:
    p = sub.add_parser("push", help="upload an adapter (weights, config, manifest, model card) to a hub model repo",
                       epilog="The token comes from --token, HF_TOKEN or `hf auth login`; load it back with hf://ORG/NAME.")
    p.add_argument("adapter", metavar="ADAPTER_DIR")
    p.add_argument("repo", metavar="ORG/NAME")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--revision", metavar="BRANCH", help="push to this branch (created from main when missing)")
    p.add_argument("--endpoint", help="hub endpoint (default: HF_ENDPOINT, else huggingface.co)")
    p.add_argument("--token", help="hub token with write access (default: HF_TOKEN or `hf auth login`)")
    p.set_defaults(func=cmd_push)


# -- serve (plugtune serve: the HTTP server, core/server.py) ------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    check_serve_args(args)
    from plugtune.serving.server import serve

    serve(args.adapters, base=args.base, adapters_root=args.adapters_root, host=args.host, port=args.port,
          max_batch=args.max_batch, allow_pickle=args.allow_pickle, log_level=args.log_level, threads=args.threads,
          api_key=os.environ.get("PLUGTUNE_API_KEY"), dtype=args.dtype, max_adapters=args.max_adapters,
          prefix_cache_bytes=args.prefix_cache_mb * 2**20)
    return 0


def check_serve_args(args: argparse.Namespace) -> None:
    """``serve``'s numbers, refused with one line before the model loads (a port past 65535
    would otherwise fail inside the event loop with a traceback)."""
    check_count(args.port, "--port", least=0, most=65535)
    check_count(args.max_batch, "--max-batch", most=4096)
    check_count(args.threads, "--threads", most=4096)
    check_count(args.max_adapters, "--max-adapters", most=100_000)
    check_count(args.prefix_cache_mb, "--prefix-cache-mb", least=0, most=1_000_000)


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a base and its adapters over an OpenAI-shaped HTTP API",
                       epilog="Set PLUGTUNE_API_KEY to require 'Authorization: Bearer <key>' (OpenAI clients send their api_key so).")
    p.add_argument("adapters", nargs="*", metavar="ADAPTER_DIR", help="adapters to load at start (they share one base)")
    p.add_argument("--base", help="base model (default: the one the first adapter names); alone: a causal LM with no adapters")
    p.add_argument("--adapters-root", default="adapters", metavar="DIR",
                   help="adapter folders under it load when a request names them (model=FOLDER), and POST "
                        "/v1/adapters loads only from inside it (default: adapters)")
    p.add_argument("--max-adapters", type=int, metavar="N",
                   help="most adapters resident at once; the least recently used is unloaded to make room "
                        "(adapters named on the command line stay; default: no limit)")
    p.add_argument("--prefix-cache-mb", type=int, default=256, metavar="MB",
                   help="room for prompt prefixes' keys and values: a request that starts like an earlier one on "
                        "the same adapter feeds only the rest (default 256; 0: off)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights' precision; auto: bf16 where this CPU has native bf16 and a start-up probe "
                        "shows it faster (bf16 on a GPU), fp32 otherwise")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=64, metavar="N",
                   help="most rows decoding at once; new requests join the running batch at the next step")
    p.add_argument("--allow-pickle", action="store_true", help="let adapters load pickled (.bin) weights; only for files you trust")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's; 1 suits a shared machine)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


# -- combine and merge (adapter tools: core/combine.py, core/models.py) ---------------------------


def cmd_combine(args: argparse.Namespace) -> int:
    from plugtune.artifacts.combine import combine_adapters
    from plugtune.artifacts.outputs import describe_written
    from plugtune.training.signals import terminate_as_interrupt

    weights = args.weights or [1.0] * len(args.adapters)
    with terminate_as_interrupt():  # SIGTERM mid-write: the staging folder is removed, the output untouched
        out = combine_adapters(args.out, args.adapters, weights, method=args.method, density=args.density,
                               svd_rank=args.svd_rank, name=args.name, overwrite=args.overwrite)
    _console().print(f"combined {len(args.adapters)} adapters ({args.method}, weights {weights}) into "
                     f"{describe_written(out)}", soft_wrap=True, markup=False, highlight=False)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Write the adapter's base with the adapter merged in, under the output policy
    (core/artifacts/outputs.py): never into the adapter or its bases, an existing folder only
    with --overwrite, through a staging folder swapped in whole."""
    from plugtune.artifacts.adapters import read_manifest
    from plugtune.artifacts.models import load_base
    from plugtune.artifacts.inputs import base_inputs
    from plugtune.artifacts.outputs import check_output, describe_written, staged_output
    from plugtune.data.tasks import build_task
    from plugtune.training.signals import terminate_as_interrupt

    manifest = read_manifest(args.adapter)
    out = Path(args.out)
    inputs = [("the adapter", Path(args.adapter)), *base_inputs(manifest.base_model.id)]
    check_output(out, overwrite=args.overwrite, inputs=inputs)
    base = load_base(str(args.adapter), build_task(manifest.task, where=f"adapter {args.adapter}: task"))  # an adapter folder: its base, merged
    check_output(out, overwrite=args.overwrite, inputs=inputs)  # again: the folder may have appeared while loading
    with terminate_as_interrupt(), staged_output(out) as staging:
        base.model.save_pretrained(staging)
        base.tokenizer.save_pretrained(staging)
    _console().print(f"{manifest.name} merged into {manifest.base_model.id}: a plain model folder at {describe_written(out)}",
                     soft_wrap=True, markup=False, highlight=False)
    return 0


def add_adapter_tool_parsers(sub: Any) -> None:
    p = sub.add_parser("combine", help="combine adapters into a new one (for LoRA: weighted sum, TIES, DARE via peft)")
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR")
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="one per adapter (default: 1 each); finite numbers")
    p.add_argument("--method", default="linear",
                   help="how to combine; the adapters' method checks it (LoRA: linear, cat, svd, ties, dare_linear, "
                        "dare_ties, magnitude_prune and their _svd forms)")
    p.add_argument("--density", type=float, help="fraction of each update kept (ties, dare_*, magnitude_prune)")
    p.add_argument("--svd-rank", type=int, help="rank of the result for the *svd methods")
    p.add_argument("--name", help="the new adapter's name (default: the folder's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder at OUT_DIR (never a parent)")
    p.set_defaults(func=cmd_combine)

    p = sub.add_parser("merge", help="write an adapter's base with the adapter merged in, as a plain model folder")
    p.add_argument("adapter", metavar="ADAPTER_DIR")
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder at OUT_DIR (never the base or the adapter)")
    p.set_defaults(func=cmd_merge)


def cmd_report(args: argparse.Namespace) -> int:
    """``plugtune report``: the runs read, then one HTML page and its PNG written
    (core/reporting); a warning line for each log line or file it had to skip."""
    from plugtune.reporting.report import default_output, png_path, write_report
    from plugtune.reporting.runs import ReportError, read_runs

    runs = read_runs(args.runs)  # first: a missing run folder is named as such, not as the default output's folder
    out = Path(args.output) if args.output else default_output(args.runs)
    if png_path(out) == out:
        raise ReportError(f"-o {out}: the PNG of the loss is written beside the page as <stem>.png; give an .html file")
    for path in (out, png_path(out)):
        check_output_file(path, "-o")
    for run in runs:
        for warning in run.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    page, png = write_report(runs, out)
    print(f"wrote {page} and {png} ({len(runs)} run{'s' if len(runs) != 1 else ''})")
    return 0


def add_report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page of runs' curves, evaluations and data, and a PNG of the loss")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_ADAPTER_DIR", help="run or adapter folders; several are overlaid")
    p.add_argument("-o", "--output", metavar="FILE.html",
                   help="the page (default: DIR/report.html for one run, ./report.html for several); the PNG goes beside it as <stem>.png")
    p.set_defaults(func=cmd_report)


# -- export (llama.cpp GGUF, Ollama, vLLM: core/artifacts/export.py) ----------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from plugtune.artifacts.export import export_adapter
    from plugtune.training.signals import terminate_as_interrupt

    with terminate_as_interrupt():  # SIGTERM mid-write: the staging folder is removed, the output untouched
        done = export_adapter(args.adapter, args.to, args.out, dtype=args.dtype, base_gguf=args.base_gguf,
                              overwrite=args.overwrite)
    console = _console()
    console.print(f"exported {args.adapter} for {args.to}: {done.folder} ({', '.join(done.files)})",
                  soft_wrap=True, markup=False, highlight=False)
    for note in done.notes:
        console.print(f"  note: {note}", soft_wrap=True, markup=False, highlight=False)
    return 0


def add_export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="export an adapter for llama.cpp (GGUF), Ollama (GGUF + Modelfile) or vLLM (peft LoRA folder)")
    p.add_argument("adapter", metavar="ADAPTER_DIR")
    p.add_argument("--to", required=True, choices=["gguf", "ollama", "vllm"], help="the server to export for")
    p.add_argument("-o", "--out", metavar="OUT_DIR", help="output folder (default: ADAPTER_DIR-<target> beside the adapter)")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"], help="GGUF tensor type (gguf, ollama; default f32)")
    p.add_argument("--base-gguf", metavar="PATH_OR_NAME",
                   help="ollama: the Modelfile's FROM (a GGUF of the base, or an Ollama model name); default: the base's GGUF when it is one")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder at OUT_DIR (never the adapter or its base)")
    p.set_defaults(func=cmd_export)


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plugtune", description="Parameter-efficient fine-tuning from recipes; adapters swapped on one base.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"plugtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="train a recipe and save its adapter")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in the output folder")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in the output folder from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train data-parallel in N local processes (DDP through accelerate; gloo on CPUs)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="search recipe fields with optuna; every trial an adapter, the best one kept")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)
    p.add_argument("--space", required=True, metavar="FILE",
                   help="YAML: recipe field -> list of choices or {low, high, log, step}")
    p.add_argument("--trials", type=_positive_int, default=8, metavar="N", help="trials to finish (default 8)")
    p.add_argument("--budget", metavar="TIME", help="the whole sweep's time (30m, 2h): shared among the trials left, "
                                                    "each training under training.budget")
    p.add_argument("--metric", help="select on this metric (default: the first one the recipe's evaluators declare)")
    p.add_argument("--validation", type=float, metavar="F",
                   help="the fraction (or count) of training rows the trials are scored on (default 0.1); the test "
                        "split is read once, for the best trial")
    p.add_argument("--dir", metavar="DIR", help="the sweep's folder (default: the recipe's output folder + .sweep)")
    p.add_argument("--seed", type=int, help="the sampler's and trials' seed (default: training.seed)")
    p.add_argument("--overwrite", action="store_true", help="replace the recipe's output folder with the best trial")
    p.add_argument("--fresh", action="store_true", help="discard an earlier sweep in --dir instead of continuing it")
    p.add_argument("--no-test", action="store_true", help="skip the best trial's evaluation on the test split")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the run of the recipe as written that the trials are compared with")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("validate", help="check a recipe without loading any model")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("preview", help="show encoded examples with the trained tokens highlighted, lengths and mixture shares (tokenizer only)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)
    p.add_argument("--rows", type=int, default=3, metavar="N", help="examples to show (default 3)")
    p.add_argument("--split", choices=["train", "test"], default="train", help="which split's examples to show")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("plugins", help="list plugins, their distributions and components")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("adapters", help="list trained adapters")
    p.add_argument("dir", nargs="?", default="adapters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_adapters)

    p = sub.add_parser("eval", help="evaluate the base and adapters side by side on a recipe's held-out data")
    p.add_argument("recipe", nargs="?", help="recipe giving data and evaluators (default: the first adapter's)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)
    p.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="DIR",
                   help="an adapter to evaluate beside the base; repeatable, all share one base")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    p.set_defaults(func=cmd_eval)

    for name, func, helptext in (("generate", cmd_generate, "generate text with the base and/or adapters"),
                                 ("classify", cmd_classify, "classify texts with classification adapters (scores, with reward adapters)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("inputs", nargs="+", metavar="TEXT")
        p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                       help="an adapter to use; repeatable, all share one base")
        p.add_argument("--base", help="base model (default: the one the adapters name)")
        p.add_argument("--per-input", action="store_true", help="the i-th adapter handles the i-th input")
        p.add_argument("--allow-pickle", action="store_true", help="accept pickled adapter weights (read with torch.load(weights_only=True))")
        if name == "generate":
            p.add_argument("--max-new-tokens", type=int, default=32)
            p.add_argument("--raw", action="store_true", help="do not wrap inputs in the adapter's prompt template")
        p.set_defaults(func=func)

    p = sub.add_parser("fetch", help="fetch and cache base models (aliases) and hub adapters (hf://ORG/NAME) for offline use")
    p.add_argument("models", nargs="+", metavar="ALIAS_OR_HF_URL")
    p.add_argument("--endpoint", help="hub endpoint for hf:// adapters (default: HF_ENDPOINT, else huggingface.co)")
    p.add_argument("--token", help="hub token for private hf:// adapters (default: HF_TOKEN or `hf auth login`)")
    p.set_defaults(func=cmd_fetch)

    add_push_parser(sub)

    add_serve_parser(sub)
    add_estimate_parser(sub)
    add_adapter_tool_parsers(sub)
    add_report_parser(sub)
    add_export_parser(sub)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    for command in sub.choices.values():  # also after the command: plugtune run R --debug
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


DEBUG_HELP = "show the traceback of an internal error (also: PLUGTUNE_DEBUG=1)"


OVERRIDES_HELP = "key.sub=value overrides of the recipe, anywhere after it (between flags too)"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a count; use 1 or more")
    return value


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, with ``key=value`` overrides accepted anywhere after the recipe,
    in any order with flags (``run R --quiet training.max_steps=3 --overwrite method.options.r=4``).

    argparse takes the positional ``overrides`` only where they follow the recipe directly;
    the rest come back unrecognised and join them here, in command-line order (a later value
    of the same key wins). ``eval``'s recipe is optional, so an override in its place moves
    to the overrides."""
    args, extras = parser.parse_known_args(argv)
    if not hasattr(args, "overrides"):
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return args
    unknown = [e for e in extras if not _is_override(e)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    recipe = getattr(args, "recipe", None)
    if args.command == "eval" and isinstance(recipe, str) and _is_override(recipe) and not Path(recipe).exists():
        args.recipe, args.overrides = None, [recipe, *args.overrides]
    args.overrides = [*args.overrides, *extras]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except PlugtuneError as exc:
        print(f"{'' if exc.exit_code == 130 else 'error: '}{exc}", file=sys.stderr)  # 130: stopped on request
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os._exit(0)
    except Exception as exc:  # noqa: BLE001 - the last guard: a bug is one line, the traceback on request
        if getattr(args, "debug", False) or os.environ.get("PLUGTUNE_DEBUG", "") not in ("", "0"):
            raise
        print(internal_error_line(args.command, exc), file=sys.stderr)
        return INTERNAL_ERROR_EXIT


INTERNAL_ERROR_EXIT = 70  # sysexits' EX_SOFTWARE: a bug in plugtune or a plugin, not a user error (1-7)


def internal_error_line(command: str, exc: BaseException) -> str:
    """The one line the last guard prints for an exception no layer turned into a
    :class:`PlugtuneError`: the command, the exception's type, where it was raised (the
    innermost frame in plugtune or a plugin, else the innermost), its message's first line."""
    where = _raised_at(exc)
    message = (str(exc).strip().splitlines() or [""])[0][:300]
    return (f"error: internal error in 'plugtune {command}' ({type(exc).__name__}{f' at {where}' if where else ''}"
            f"{f': {message}' if message else ''}); rerun with --debug or PLUGTUNE_DEBUG=1 for the traceback")


def _raised_at(exc: BaseException) -> str:
    """``plugtune/training/train.py:123``: the innermost frame of ``exc``'s traceback in a
    ``plugtune`` module (its file named by the module, wherever it is installed), else the
    innermost frame of all (a library's own file, by its last two path parts)."""
    import traceback

    frames = [(frame.f_globals.get("__name__", ""), frame.f_code.co_filename, line)
              for frame, line in traceback.walk_tb(exc.__traceback__)]
    if not frames:
        return ""
    ours = [f for f in frames if f[0] == "plugtune" or f[0].startswith("plugtune.")]
    module, filename, line = (ours or frames)[-1]
    if ours:
        shown = module.replace(".", "/") + ("/__init__.py" if filename.endswith("__init__.py") else ".py")
    else:
        shown = "/".join(Path(filename).parts[-2:])
    return f"{shown}:{line}"


if __name__ == "__main__":
    sys.exit(main())
