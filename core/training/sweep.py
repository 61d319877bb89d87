"""``plugtune sweep RECIPE --space space.yaml``: a hyperparameter search over recipe fields.

The search is optuna's (TPE, seeded), its study kept in ``<sweep dir>/study.db`` (SQLite
through optuna's own storage), so a sweep that crashed or was stopped continues where it was
when the same command runs again: finished trials are kept, a trial that was running is run
again with the same values. Each trial is a ``plugtune run`` in a child process (a trial that
runs out of memory or crashes fails alone) with the recipe's overrides, the trial's values,
``data.validation`` (a seeded slice of the training rows, so choosing never reads the test
split) and its own output folder ``<sweep dir>/trial-N``, a whole adapter with its manifest and
metrics. The metric is the recipe's evaluators' (their declared direction decides better);
``--budget`` splits the time among the trials left, each trial training under
``training.budget`` (the time it leaves after the model loading and evaluations measured on
earlier trials). The budget covers the trials, baseline included; the final scoring on the test
split comes after it. Before the first trial the recipe as written runs once the same way (its own
row, ``recipe``, in the leaderboard, and a candidate for best like any trial), so the
leaderboard shows what the search bought; ``--no-baseline`` skips it. At the end: a leaderboard (printed, and ``leaderboard.json``/``.md`` in the
sweep folder), the best trial copied to the recipe's output folder, and that adapter evaluated
once on the recipe's test split beside the base.

The space file maps recipe field paths (as in overrides) to a list of choices or a range::

    training.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}
    method.options.r: [4, 8, 16]
    training.warmup_steps: {low: 0, high: 20, step: 5}   # whole numbers: an integer range
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plugtune.artifacts.adapters import MANIFEST_FILE, is_adapter_dir, read_manifest
from plugtune.artifacts.outputs import make_staging, replace_dir
from plugtune.kernel.errors import PlugtuneError, RecipeError
from plugtune.training.budget import format_seconds, parse_budget
from plugtune.training.recipe import Recipe, load_recipe, read_recipe_file

STUDY_FILE = "study.db"
BASELINE_FILE = "baseline.json"
BASELINE_NUMBER = -1  # the recipe as written: shown as "recipe", never an optuna trial
SETUP_FILE = "sweep.json"
DEFAULT_VALIDATION = 0.1
DEFAULT_OVERHEAD = 0.25  # the share of a trial's time guessed for loading and evaluating, until one is measured
RANGE_KEYS = frozenset({"low", "high", "log", "step"})


class SweepError(PlugtuneError):
    """A sweep that cannot start or continue (its space, its folder, its metric)."""


@dataclass(frozen=True)
class Dimension:
    """One searched field: a list of ``choices`` or a ``low``..``high`` range."""

    path: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def integer(self) -> bool:
        return self.choices is None and all(isinstance(v, int) and not isinstance(v, bool)
                                            for v in (self.low, self.high)) and not self.log \
            and (self.step is None or float(self.step).is_integer())

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1))
        return trial.suggest_float(self.path, float(self.low), float(self.high), log=self.log, step=self.step)

    def probes(self) -> list[Any]:
        """The values validation tries: every choice, or both ends of the range."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def read_space(path: str | Path) -> list[Dimension]:
    """The space file, every mistake reported at once with its key."""
    raw = read_recipe_file(path)  # bounded YAML, duplicate keys refused, one-line errors
    if not isinstance(raw, dict) or not raw:
        raise SweepError(f"{path}: a space is a mapping of recipe fields to choices or ranges, e.g. "
                         f"'training.learning_rate: {{low: 1.0e-4, high: 1.0e-2, log: true}}'")
    dims, problems = [], []
    for key, value in raw.items():
        where = f"{path}: {key}"
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            problems.append(f"{where}: a key is a dotted recipe field path such as training.learning_rate")
            continue
        if isinstance(value, list):
            if not value or any(isinstance(v, (dict, list)) for v in value) or len(set(map(repr, value))) != len(value):
                problems.append(f"{where}: choices are a non-empty list of distinct plain values")
                continue
            dims.append(Dimension(key, choices=tuple(value)))
        elif isinstance(value, dict):
            unknown = sorted(set(map(str, value)) - RANGE_KEYS)
            numbers = {k: value.get(k) for k in ("low", "high", "step")}
            if unknown:
                problems.append(f"{where}: unknown range key(s) {', '.join(unknown)}; a range has low, high, log, step")
            elif any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v))
                     for v in numbers.values()) or numbers["low"] is None or numbers["high"] is None:
                problems.append(f"{where}: a range needs finite numbers low and high (and step, if given)")
            elif not numbers["low"] < numbers["high"]:
                problems.append(f"{where}: low ({numbers['low']}) must be below high ({numbers['high']})")
            elif value.get("log") and numbers["low"] <= 0:
                problems.append(f"{where}: a log range needs low above 0")
            elif value.get("log") and numbers["step"] is not None:
                problems.append(f"{where}: a range is log or stepped, not both")
            elif numbers["step"] is not None and numbers["step"] <= 0:
                problems.append(f"{where}: step must be above 0")
            else:
                dims.append(Dimension(key, low=numbers["low"], high=numbers["high"], log=bool(value.get("log")),
                                      step=numbers["step"]))
        else:
            problems.append(f"{where}: give a list of choices or a range {{low, high, log, step}}")
    if problems:
        raise RecipeError(problems)
    return dims


@dataclass
class SweepSetup:
    """What a sweep was started with; a resumed sweep must match it."""

    recipe: str
    overrides: list[str]
    space: list[dict[str, Any]]
    metric: str
    direction: str
    validation: float
    seed: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _validate_space(recipe_path: str, overrides: list[str], dims: list[Dimension]) -> None:
    """Every choice and range end bound into the recipe and validated, all problems at once."""
    problems: list[str] = []
    for dim in dims:
        for value in dim.probes():
            try:
                load_recipe(recipe_path, [*overrides, f"{dim.path}={json.dumps(value)}"], check_data=False)
            except RecipeError as exc:
                problems += [f"space: {dim.path}={value}: {p}" for p in exc.problems]
    if problems:
        raise RecipeError(sorted(set(problems), key=problems.index))


def choose_metric(recipe: Recipe, metric: str | None) -> tuple[str, str]:
    """The metric to select on and its direction: the given one (its direction declared by an
    evaluator), else the first metric the recipe's first evaluator declares."""
    directions = recipe.metric_directions()
    if metric is None:
        plain = [name for name, _ in directions.declared if not any(c in name for c in "*?[")]
        if not plain:
            raise SweepError("the recipe's evaluators declare no metric to select on; name one with --metric")
        metric = plain[0]
    direction = directions.direction(metric)
    if direction is None:
        names = ", ".join(name for name, _ in directions.declared) or "none"
        raise SweepError(f"--metric {metric}: no evaluator of the recipe declares it (declared: {names})")
    return metric, direction


@dataclass
class TrialResult:
    number: int
    params: dict[str, Any]
    state: str
    value: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    train_seconds: float | None = None
    folder: str | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        return "recipe" if self.number == BASELINE_NUMBER else str(self.number)


class Sweep:
    """One sweep folder: its study, its trials, its leaderboard (see the module docstring)."""

    def __init__(self, recipe_path: str, overrides: list[str], space_path: str, *, trials: int, budget: str | None,
                 metric: str | None, validation: float, folder: str | None, overwrite: bool, fresh: bool,
                 seed: int | None, console: Any, baseline: bool = True) -> None:
        self.recipe_path, self.overrides, self.trials, self.console = recipe_path, list(overrides), trials, console
        self.baseline = baseline
        if not (math.isfinite(validation) and validation > 0):
            raise SweepError(f"--validation {validation}: give a fraction of the training rows (0.1) or a row count")
        self.recipe = load_recipe(recipe_path, overrides)  # the whole recipe checked before anything runs
        self.dims = read_space(space_path)
        _validate_space(recipe_path, overrides, self.dims)
        self.metric, self.direction = choose_metric(self.recipe, metric)
        self.budget = parse_budget(budget).seconds if budget else None
        if budget and self.budget is None:
            raise SweepError("--budget: a sweep's budget is a time (30m, 2h), not tokens")
        self.folder = Path(folder or f"{self.recipe.output_dir}.sweep")
        self.output = self.recipe.output_dir
        self.setup = SweepSetup(str(Path(recipe_path).resolve()), self.overrides, [d.__dict__ for d in self.dims],
                                self.metric, self.direction, validation, self.recipe.training.seed if seed is None else seed)
        self._open(overwrite, fresh)

    # -- the folder -----------------------------------------------------------------------

    def _open(self, overwrite: bool, fresh: bool) -> None:
        """A new sweep folder, or the one a sweep with the same setup left (resume);
        ``fresh``: the earlier sweep folder is discarded. ``overwrite``: the recipe's output
        folder may be replaced by the best trial at the end."""
        setup_file = self.folder / SETUP_FILE
        if self.output.exists() and (not self.output.is_dir() or any(self.output.iterdir())) and not overwrite:
            raise SweepError(f"{self.output} exists: the best trial is copied there at the end; pass --overwrite "
                             f"or set output.dir")
        if fresh and setup_file.exists():
            shutil.rmtree(self.folder)
        if setup_file.exists():
            earlier = json.loads(setup_file.read_text())
            if earlier != json.loads(json.dumps(self.setup.to_json())):
                raise SweepError(f"{self.folder} holds a sweep started with another recipe, space, metric or "
                                 f"overrides; pass --fresh to start over, or another --dir")
            self.console.print(f"continuing the sweep in {self.folder}")
        elif self.folder.exists() and any(self.folder.iterdir()):
            raise SweepError(f"{self.folder} exists and is not a sweep folder; pass another --dir")
        self.folder.mkdir(parents=True, exist_ok=True)
        setup_file.write_text(json.dumps(self.setup.to_json(), indent=2))

    def _study(self) -> Any:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(f"sqlite:///{(self.folder / STUDY_FILE).resolve()}")
        study = optuna.create_study(study_name="sweep", storage=storage, load_if_exists=True,
                                    direction="maximize" if self.direction == "max" else "minimize",
                                    sampler=optuna.samplers.TPESampler(seed=self.setup.seed))
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)  # the crash's: run again
            study.enqueue_trial(trial.params, skip_if_exists=False)
            self.console.print(f"trial {trial.number} was interrupted; its values run again")
        return study

    # -- running --------------------------------------------------------------------------

    def run(self) -> list[TrialResult]:
        import optuna

        study = self._study()
        started = time.monotonic()
        overheads = [t.user_attrs["overhead"] for t in study.trials
                     if t.state == optuna.trial.TrialState.COMPLETE and "overhead" in t.user_attrs]
        finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

        def share_of(left: int) -> float | None:
            """A run's training seconds: what is left of --budget over the runs left, less the
            loading and evaluating time measured so far (guessed before anything is measured)."""
            if self.budget is None:
                return None
            remaining = self.budget - (time.monotonic() - started)  # this session's: a resumed sweep starts afresh
            overhead = sum(overheads) / len(overheads) if overheads else DEFAULT_OVERHEAD * remaining / left
            return (remaining / left) - overhead

        if self.baseline and self.baseline_result() is None:
            left = self.trials - sum(t.state in finished_states for t in study.trials) + 1
            result = self._run_trial(BASELINE_NUMBER, {}, share_of(left))
            (self.folder / BASELINE_FILE).write_text(json.dumps(result.__dict__, indent=2, default=str))
            if result.state == "COMPLETE" and result.train_seconds is not None and result.seconds is not None:
                overheads.append(max(result.seconds - result.train_seconds, 0.0))
            self._report(result)
        while sum(t.state in finished_states for t in study.trials) < self.trials:
            left = self.trials - sum(t.state in finished_states for t in study.trials)
            share = share_of(left)
            if share is not None and share < 5:
                self.console.print(f"[yellow]--budget: {format_seconds(max(share, 0))} per trial left, too little for "
                                   f"another trial; stopping with {self.trials - left} of {self.trials}[/]")
                break
            trial = study.ask()
            params = {d.path: d.suggest(trial) for d in self.dims}
            result = self._run_trial(trial.number, params, share)
            if result.state == "COMPLETE":
                trial.set_user_attr("folder", result.folder)
                trial.set_user_attr("metrics", result.metrics)
                trial.set_user_attr("seconds", result.seconds)
                if result.train_seconds is not None and result.seconds is not None:
                    overheads.append(max(result.seconds - result.train_seconds, 0.0))
                    trial.set_user_attr("overhead", overheads[-1])
                study.tell(trial, result.value)
            else:
                trial.set_user_attr("error", result.error)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self._report(result)
            if len([t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]) > max(3, self.trials):
                raise SweepError(f"more trials failed than the sweep has; the last: {result.error}")
        return self.results(study)

    def baseline_result(self) -> TrialResult | None:
        """The recipe-as-written run this sweep folder holds, finished (None: not run, or failed)."""
        path = self.folder / BASELINE_FILE
        if not self.baseline or not path.exists():
            return None
        result = TrialResult(**json.loads(path.read_text()))
        return result if result.state == "COMPLETE" else None

    def _run_trial(self, number: int, params: dict[str, Any], share: float | None) -> TrialResult:
        out = self.folder / ("recipe" if number == BASELINE_NUMBER else f"trial-{number}")
        overrides = [*self.overrides, *(f"{k}={json.dumps(v)}" for k, v in params.items()),
                     f"data.validation={self.setup.validation}", f"output.dir={out}", f"training.seed={self.setup.seed}"]
        if share is not None:
            overrides += [f"training.budget={max(share, 1.0):.0f}s", "training.max_steps=null"]
        log = self.folder / "logs" / f"trial-{number}.log"
        log.parent.mkdir(exist_ok=True)
        self.console.print((f"trial {number}: {', '.join(f'{k}={_short(v)}' for k, v in params.items())}"
                            if number != BASELINE_NUMBER else "the recipe as written (the baseline)")
                           + (f" (training budget {format_seconds(share)})" if share is not None else ""))
        started = time.monotonic()
        with open(log, "w", encoding="utf-8") as fh:
            code = subprocess.run([sys.executable, "-m", "plugtune.cli", "run", self.recipe_path, *overrides,
                                   "--quiet", "--overwrite"], stdout=fh, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, COLUMNS="200")).returncode
        seconds = time.monotonic() - started
        if code != 0 or not is_adapter_dir(out):
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            return TrialResult(number, params, "FAIL", seconds=seconds, error=(lines[-1] if lines else f"exit {code}")[:300])
        manifest = read_manifest(out)
        after = {k: v for k, v in (manifest.metrics.get("after") or {}).items() if isinstance(v, (int, float))}
        value = after.get(self.metric)
        if value is None or not math.isfinite(value):
            return TrialResult(number, params, "FAIL", seconds=seconds, folder=str(out),
                               error=f"the run reported no finite {self.metric}")
        if number == BASELINE_NUMBER:  # the values the recipe gives the searched fields, or the defaults it leaves them to
            params = {d.path: self._recipe_value(d.path) for d in self.dims}
        return TrialResult(number, params, "COMPLETE", float(value), after, seconds,
                           float(manifest.training.get("train_seconds", 0.0)), str(out))

    def _recipe_value(self, path: str) -> Any:
        """What the recipe as written has at ``path``: its own value, else the checked recipe's default."""
        value = _dotted(self.recipe.raw, path)
        return value if value is not None else _dotted(self.recipe, path)

    def _report(self, result: TrialResult) -> None:
        if result.state == "COMPLETE":
            self.console.print(f"{label_of(result)}: {self.metric} {result.value:.4f} in {format_seconds(result.seconds or 0)}")
        else:
            self.console.print(f"[red]{label_of(result)} failed[/]: {result.error}")

    # -- the end --------------------------------------------------------------------------

    def results(self, study: Any) -> list[TrialResult]:
        out = []
        for t in study.trials:
            out.append(TrialResult(t.number, dict(t.params), t.state.name, t.value if t.values else None,
                                   dict(t.user_attrs.get("metrics") or {}), t.user_attrs.get("seconds"),
                                   None, t.user_attrs.get("folder"), t.user_attrs.get("error")))
        baseline = self.baseline_result()
        return ([baseline] if baseline else []) + out

    def ranked(self, results: list[TrialResult]) -> list[TrialResult]:
        complete = [r for r in results if r.state == "COMPLETE" and r.value is not None]
        return sorted(complete, key=lambda r: (-r.value if self.direction == "max" else r.value, r.number))

    def write_leaderboard(self, results: list[TrialResult]) -> Path:
        ranked = self.ranked(results)
        rows = ranked + [r for r in results if r not in ranked]
        (self.folder / "leaderboard.json").write_text(json.dumps(
            {"metric": self.metric, "direction": self.direction, "validation": self.setup.validation,
             "trials": [{**r.__dict__, "name": r.name} for r in rows]}, indent=2, default=str))
        names = [d.path for d in self.dims]
        lines = [f"| rank | trial | {' | '.join(names)} | {self.metric} (validation) | seconds | state |",
                 "| ---: | ---: | " + " | ".join("---" for _ in names) + " | ---: | ---: | --- |"]
        for i, r in enumerate(rows, 1):
            value = f"{r.value:.4f}" if r.value is not None else ""
            lines.append(f"| {ranked.index(r) + 1 if r in ranked else ''} | {r.name} | {' | '.join(_short(r.params.get(n)) for n in names)} | "
                         f"{value} | {r.seconds or 0:.0f} | {r.state.lower()}{': ' + r.error if r.error else ''} |")
        path = self.folder / "leaderboard.md"
        path.write_text("\n".join(lines) + "\n")
        return path

    def table(self, results: list[TrialResult]) -> Any:
        from rich.table import Table

        table = Table(title=f"sweep: {self.metric} on {self.setup.validation:g} of train (validation), "
                            f"{'higher' if self.direction == 'max' else 'lower'} is better")
        for column in ("rank", "trial", *(d.path for d in self.dims), self.metric, "time", "state"):
            table.add_column(column)
        ranked = self.ranked(results)
        for r in ranked + [r for r in results if r not in ranked]:
            table.add_row(str(ranked.index(r) + 1) if r in ranked else "", r.name,
                          *(_short(r.params.get(d.path)) for d in self.dims),
                          f"{r.value:.4f}" if r.value is not None else "", format_seconds(r.seconds or 0), r.state.lower())
        return table

    def keep_best(self, results: list[TrialResult]) -> TrialResult | None:
        """Copy the best trial's folder to the recipe's output folder (staged, then swapped in)."""
        ranked = self.ranked(results)
        if not ranked or not ranked[0].folder or not (Path(ranked[0].folder) / MANIFEST_FILE).exists():
            return None
        best = ranked[0]
        self.output.parent.mkdir(parents=True, exist_ok=True)
        staging = make_staging(self.output)
        shutil.rmtree(staging)
        shutil.copytree(best.folder, staging, ignore=shutil.ignore_patterns("checkpoints"))
        replace_dir(staging, self.output)
        return best


def label_of(result: TrialResult) -> str:
    return "the recipe as written" if result.number == BASELINE_NUMBER else f"trial {result.number}"


def _dotted(tree: Any, path: str) -> Any:
    """``tree``'s value at a dotted field path, through dicts and typed sections (None where absent)."""
    for part in path.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else getattr(tree, part, None)
    return tree if tree is None or isinstance(tree, (str, int, float, bool, list)) else str(tree)


def versus_baseline(sweep: Sweep, results: list[TrialResult], best: TrialResult) -> str | None:
    """One line: the best run against the recipe as written (None without a finished baseline)."""
    baseline = next((r for r in results if r.number == BASELINE_NUMBER), None)
    if baseline is None or baseline.value is None or best.value is None:
        return None
    if best is baseline:
        return f"no trial beat the recipe as written ({sweep.metric} {baseline.value:.4f}); it is the one kept"
    return f"{label_of(best)} against the recipe as written: {sweep.metric} {best.value:.4f} vs {baseline.value:.4f} " \
           f"({best.value - baseline.value:+.4f})"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
