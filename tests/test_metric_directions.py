"""Metric directions: evaluators declare which way each metric improves; early stopping, the
best-weights selection, the before/after table and recipe validation read the declaration
and never guess from a name."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from plugtune.kernel.components import EvalMetrics, MetricDirections
from plugtune.kernel.errors import RecipeError
from plugtune.plugins.evaluators.classification import Accuracy, ConfusionMatrix, MacroF1
from plugtune.plugins.evaluators.counterfactual import CounterfactualBias
from plugtune.plugins.evaluators.language_model import Loss, Perplexity
from plugtune.plugins.regularizers.training import EarlyStopping, EarlyStoppingOptions
from plugtune.training.recipe import load_recipe
from plugtune.training.train import comparison_table

BUILT_INS = [Accuracy, MacroF1, ConfusionMatrix, CounterfactualBias, Loss, Perplexity]


def test_declared_directions_with_patterns() -> None:
    d = MetricDirections.of(BUILT_INS)
    assert d.direction("accuracy") == "max" and d.direction("f1/positive") == "max"
    assert d.direction("loss") == d.direction("perplexity") == d.direction("counterfactual/flip_rate") == "min"
    assert d.direction("counterfactual/examples") is None and d.direction("confusion/a/b") is None
    assert d.improved("counterfactual/flip_rate", 0.1, 0.3) is True and d.improved("accuracy", 0.1, 0.3) is False
    with pytest.raises(ValueError, match="use 'min' or 'max'"):
        MetricDirections.of([type("Odd", (), {"directions": {"x": "up"}})])


def test_early_stopping_minimises_the_flip_rate() -> None:
    """The old guess (min only for loss/perplexity names) maximised counterfactual/flip_rate."""
    directions = MetricDirections.of([CounterfactualBias])
    reg = EarlyStopping(EarlyStoppingOptions(metric="counterfactual/flip_rate", patience=2, restore_best=False))
    rates = [0.5, 0.3, 0.4, 0.2, 0.6, 0.7]
    decisions = [reg.after_evaluate(EvalMetrics({"counterfactual/flip_rate": r}, directions), step)
                 for step, r in enumerate(rates)]
    assert reg.mode == "min"
    assert [bool(d and d.best) for d in decisions] == [True, True, False, True, False, False]
    assert decisions[-1].stop and reg.best == 0.2 and reg.best_step == 3


def test_comparison_table_colours_by_declared_direction() -> None:
    before = {"counterfactual/flip_rate": 0.5, "accuracy": 0.8, "loss": 2.0, "counterfactual/examples": 10}
    after = {"counterfactual/flip_rate": 0.2, "accuracy": 0.7, "loss": 1.0, "counterfactual/examples": 12}
    table = comparison_table({"base": before, "tuned": after}, directions=MetricDirections.of(BUILT_INS))
    changes = dict(zip(table.columns[0]._cells, table.columns[-1]._cells))  # metric -> change cell
    assert changes["counterfactual/flip_rate"].startswith("[green]")  # down is better: declared min
    assert changes["loss"].startswith("[green]")
    assert changes["accuracy"].startswith("[red]")
    assert "[" not in changes["counterfactual/examples"]  # no declared direction: uncoloured
    undeclared = comparison_table({"base": before, "tuned": after})
    assert not any(c.startswith("[") for c in undeclared.columns[-1]._cells)


@pytest.fixture
def qa_csv(tmp_path: Path) -> Path:
    with open(tmp_path / "qa.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows({"text": f"t{i}", "label": "ab"[i % 2]} for i in range(8))
    return tmp_path


def _raw(**changes) -> dict:
    raw = {"name": "d", "base_model": "org/model", "task": {"type": "sequence-classification", "text": "{text}"},
           "data": {"loader": "table", "options": {"path": "qa.csv"}}, "method": "lora"}
    raw.update(changes)
    return raw


def test_validation_refuses_selecting_on_an_undeclared_metric(qa_csv: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(raw=_raw(evaluators=["loss"], regularizers=[{"name": "early_stopping", "options": {"metric": "accuracy"}}]),
                    base_dir=qa_csv)
    assert info.value.problems == [
        "regularizers[0].options.metric: no evaluator of the recipe declares which way 'accuracy' improves; "
        "add the evaluator that reports it, or set options.mode to min or max"]
    # declared by its evaluator, or the direction given in the recipe: valid
    load_recipe(raw=_raw(evaluators=["accuracy"], regularizers=[{"name": "early_stopping", "options": {"metric": "accuracy"}}]),
                base_dir=qa_csv)
    load_recipe(raw=_raw(evaluators=["loss"], regularizers=[{"name": "early_stopping", "options": {"metric": "accuracy", "mode": "max"}}]),
                base_dir=qa_csv)


def test_default_evaluators_come_from_the_plugins_that_declare_them(qa_csv: Path) -> None:
    recipe = load_recipe(raw=_raw(), base_dir=qa_csv)
    assert [b.name for b in recipe.evaluators] == ["loss"]  # Loss.default = True; the core names none
    assert recipe.metric_directions().direction("loss") == "min"
    assert load_recipe(raw=_raw(evaluators=[]), base_dir=qa_csv).evaluators == []
