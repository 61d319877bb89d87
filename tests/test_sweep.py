"""plugtune sweep: optuna over recipe fields, trials as adapters scored on rows carved from
train, a leaderboard, the best kept, a crashed sweep continued."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from plugtune.artifacts.adapters import is_adapter_dir, read_manifest

pytest.importorskip("optuna")


def plugtune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plugtune.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})


@pytest.fixture
def sweep_setup(make_recipe, tmp_path: Path) -> tuple[Path, Path]:
    recipe = make_recipe(classification=True, training={"max_steps": 6, "batch_size": 8, "device": "cpu", "learning_rate": 0.02,
                                                        "max_length": 48, "eval_before": False},
                         output={"dir": str(tmp_path / "best")})
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"training.learning_rate": {"low": 1e-3, "high": 5e-2, "log": True},
                                     "method.options.r": [2, 4]}))
    return recipe, space


def test_a_sweep_keeps_the_best_trial_scored_on_validation_rows_and_resumes(sweep_setup, tmp_path: Path) -> None:
    recipe, space = sweep_setup
    folder = tmp_path / "sweep"
    # every trial is a process of its own (mostly imports, ~10 s here): one trial and the recipe
    done = plugtune("sweep", str(recipe), "--space", str(space), "--trials", "1", "--dir", str(folder), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    board = json.loads((folder / "leaderboard.json").read_text())
    assert board["metric"] == "accuracy" and board["direction"] == "max"
    trials = [t for t in board["trials"] if t["state"] == "COMPLETE"]
    assert len(trials) == 2  # the trial and the recipe as written, ranked together
    baseline = next(t for t in trials if t["name"] == "recipe")
    assert baseline["params"] == {"training.learning_rate": 0.02, "method.options.r": 4}  # the recipe's own values
    assert "against the recipe as written" in done.stdout or "no trial beat the recipe" in done.stdout
    assert [t["value"] for t in trials] == sorted((t["value"] for t in trials), reverse=True)
    for t in trials:
        manifest = read_manifest(t["folder"])
        assert manifest.recipe["data"]["validation"] == 0.1  # scored on rows carved from train, not the test split
        assert manifest.metrics["after"]["accuracy"] == t["value"]
        assert manifest.recipe["method"]["options"]["r"] == t["params"]["method.options.r"]
        assert manifest.recipe["training"]["learning_rate"] == t["params"]["training.learning_rate"]
    best = tmp_path / "best"
    assert is_adapter_dir(best) and read_manifest(best).metrics["after"]["accuracy"] == trials[0]["value"]
    test = json.loads((folder / "test.json").read_text())  # the test split, read once, for the best
    assert test and "best" in done.stdout and (folder / "leaderboard.md").read_text().count("| complete") == 2

    # a crash mid-trial: optuna's study holds a RUNNING trial; the next sweep runs its values again
    import optuna

    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{folder / 'study.db'}")
    crashed = study.ask({"training.learning_rate": optuna.distributions.FloatDistribution(1e-3, 5e-2, log=True),
                         "method.options.r": optuna.distributions.CategoricalDistribution([2, 4])})
    again = plugtune("sweep", str(recipe), "--space", str(space), "--trials", "2", "--dir", str(folder), "--overwrite",
                     "--no-test", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"trial {crashed.number} was interrupted" in again.stderr
    assert "the recipe as written (the baseline)" not in again.stderr  # finished once: kept, not run again
    board = json.loads((folder / "leaderboard.json").read_text())
    complete = [t for t in board["trials"] if t["state"] == "COMPLETE"]
    assert len(complete) == 3  # the recipe and the trial kept, plus the crashed trial's values run again
    assert any(t["params"] == crashed.params for t in complete)


def test_space_mistakes_are_reported_together_before_anything_runs(sweep_setup, tmp_path: Path) -> None:
    recipe, _ = sweep_setup
    space = tmp_path / "bad.yaml"
    space.write_text(yaml.safe_dump({"training.learnin_rate": [1e-3], "training.batch_size": {"low": 8, "high": 4},
                                     "method.options.r": [], "training.warmup_steps": {"low": 0, "high": 4, "lg": True}}))
    done = plugtune("sweep", str(recipe), "--space", str(space), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "training.batch_size: low (8) must be below high (4)" in done.stderr
    assert "method.options.r: choices are a non-empty list" in done.stderr
    assert "unknown range key(s) lg" in done.stderr
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"training.learnin_rate": [1e-3]}))
    done = plugtune("sweep", str(recipe), "--space", str(typo), cwd=tmp_path)
    assert done.returncode == 2 and "space: training.learnin_rate=0.001: training.learnin_rate" in done.stderr
    assert "did you mean 'learning_rate'" in done.stderr
    assert not (tmp_path / "best.sweep").exists()


def test_a_metric_no_evaluator_declares_is_refused(sweep_setup, tmp_path: Path) -> None:
    recipe, space = sweep_setup
    done = plugtune("sweep", str(recipe), "--space", str(space), "--metric", "acc", cwd=tmp_path)
    assert done.returncode != 0 and "--metric acc: no evaluator of the recipe declares it" in done.stderr


def test_the_baseline_row_names_the_default_a_recipe_leaves_a_field_to(make_recipe) -> None:
    from plugtune.training.recipe import load_recipe
    from plugtune.training.sweep import _dotted

    recipe = load_recipe(make_recipe(training={"max_steps": 6, "device": "cpu"}))
    assert _dotted(recipe.raw, "training.learning_rate") is None  # left out of the file ...
    assert _dotted(recipe, "training.learning_rate") == "auto"  # ... so the baseline ran at the default
    assert _dotted(recipe, "method.options.r") == 4
