"""training.budget: the steps chosen from a time or token budget, the schedule rebuilt over
them, the plan printed, logged and recorded, and resumes keeping it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from plugtune.artifacts.adapters import read_manifest
from plugtune.kernel.errors import RecipeError
from plugtune.training.budget import (
    CALIBRATION_STEPS, Budget, BudgetPlanner, format_seconds, parse_budget, rebuild_schedule,
)
from plugtune.training.recipe import load_recipe
from plugtune.training.train import run


@pytest.mark.parametrize("text, budget", [
    ("10m", Budget(seconds=600)), ("90s", Budget(seconds=90)), ("1h30m", Budget(seconds=5400)),
    ("1.5h", Budget(seconds=5400)), (" 2m 30s ", Budget(seconds=150)), (600, Budget(seconds=600)),
    ("2M tokens", Budget(tokens=2_000_000)), ("500k tokens", Budget(tokens=500_000)), ("1e6 tokens", Budget(tokens=10**6)),
    ("1200 tok", Budget(tokens=1200)),
])
def test_budgets_parse(text, budget) -> None:
    assert parse_budget(text) == budget


@pytest.mark.parametrize("text", ["", "10x", "tokens", "-5m", 0, -1, True, "1e400 tokens", "0 tokens", "400d", [1]])
def test_bad_budgets_say_the_accepted_forms(text) -> None:
    with pytest.raises(ValueError, match=r"10m|token budget|time budget"):
        parse_budget(text)


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (0, 59.6, 610, 3725)] == ["0s", "1m", "10m10s", "1h2m5s"]


def test_a_token_budget_is_planned_before_the_first_step() -> None:
    planner = BudgetPlanner(Budget(tokens=10_000), tokens_per_step=300.0)
    plan = planner.initial_steps()
    assert plan.total_steps == math.ceil(10_000 / 300) and plan.final
    assert not planner.due(50)


def test_a_time_budget_is_planned_after_the_calibration_steps_and_revised_twice() -> None:
    planner = BudgetPlanner(Budget(seconds=100), tokens_per_step=1000.0)
    assert planner.initial_steps().reason.startswith("provisional")
    elapsed, step, plans = 0.0, 0, []
    while step < (planner.plan.total_steps if not planner.plan.reason.startswith("provisional") else 10**9):
        step += 1
        seconds = 5.0 if step == 1 else 1.0  # the first step pays for warm-up; the rest take 1 ms per token
        elapsed += seconds
        planner.record(step, elapsed, 1000)
        if planner.due(step):
            plan = planner.replan(step, elapsed)
            if planner.adopt(plan):
                plans.append((step, plan.total_steps))
    assert plans[0] == (CALIBRATION_STEPS + 1, CALIBRATION_STEPS + 1 + math.floor(100 - elapsed_at(plans[0][0])))
    assert planner.plan.final and step == planner.plan.total_steps
    assert 95 <= elapsed <= 100  # the warm-up step's 4 extra seconds are paid once and planned around


def elapsed_at(step: int) -> float:
    return 5.0 + (step - 1) * 1.0


def test_a_slowdown_shortens_the_plan_at_a_revision_and_a_cap_holds() -> None:
    planner = BudgetPlanner(Budget(seconds=100), tokens_per_step=100.0, cap=40, cap_source="training.epochs (2)")
    planner.initial_steps()
    assert planner.plan.total_steps == 40  # provisional: the cap
    elapsed = 0.0
    for step in range(1, 6):
        elapsed += 0.5
        planner.record(step, elapsed, 100)
        if planner.due(step):
            planner.adopt(planner.replan(step, elapsed))
    assert planner.plan.total_steps == 40  # 200 steps would fit: the cap wins
    assert "caps it" in planner.plan.reason and "training.epochs (2)" in planner.plan.reason  # and says so
    assert not planner.overrun(100.0) and planner.overrun(116.0)


def test_rebuilding_the_schedule_gives_transformers_own_lr_at_the_current_step() -> None:
    from transformers import get_scheduler

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1)

    for name in ("linear", "cosine", "constant_with_warmup"):
        opt = optimizer()
        scheduler = get_scheduler(name, opt, num_warmup_steps=2, num_training_steps=1000)
        for _ in range(7):
            opt.step()
            scheduler.step()
        rebuild_schedule(scheduler, name, 2, 20, 7)
        reference_opt = optimizer()
        reference = get_scheduler(name, reference_opt, num_warmup_steps=2, num_training_steps=20)
        for _ in range(7):
            reference_opt.step()
            reference.step()
        for _ in range(5):
            assert opt.param_groups[0]["lr"] == pytest.approx(reference_opt.param_groups[0]["lr"], rel=1e-12)
            opt.step(), scheduler.step(), reference_opt.step(), reference.step()


def test_recipes_check_the_budget_at_validation(make_recipe) -> None:
    path = make_recipe(training={"budget": "ten minutes", "batch_size": 4, "device": "cpu"})
    with pytest.raises(RecipeError, match=r"training\.budget: .*10m"):
        load_recipe(path)
    capped = load_recipe(make_recipe(training={"budget": "1m", "max_steps": 3, "device": "cpu"}))
    assert capped.training.max_steps == 3  # max_steps caps a budget: an override shortens a budget recipe


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_token_budget_trains_the_steps_it_buys_and_records_the_plan(make_recipe, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    path = make_recipe(training={"budget": "600 tokens", "batch_size": 4, "learning_rate": 1e-2, "device": "cpu",
                                 "max_length": 48, "eval_before": False}, output={"dir": str(out)})
    result = run(load_recipe(path), show_progress=False)
    manifest = json.loads((out / "plugtune.json").read_text())
    plan = manifest["training"]["plan"]
    assert plan["budget"] == "600 tokens" and plan["total_steps"] == result.steps
    assert result.steps == math.ceil(600 / plan["tokens_per_step"])
    lrs = [r["lr"] for r in _log(out) if r.get("event") == "train"]
    # logged after the step's scheduler step: linear decay reaches 0 at exactly the planned steps
    assert lrs[-1] == 0.0 and lrs[-2] == pytest.approx(1e-2 / result.steps)


def test_max_steps_caps_a_time_budget(make_recipe, tmp_path: Path) -> None:
    out = tmp_path / "capped"
    path = make_recipe(training={"budget": "1h", "max_steps": 5, "batch_size": 4, "device": "cpu", "max_length": 48,
                                 "eval_before": False}, output={"dir": str(out)})
    result = run(load_recipe(path), show_progress=False)
    assert result.steps == 5 and result.train_seconds < 600


def test_max_steps_overrides_explicit_epochs_under_a_budget(make_recipe, tmp_path: Path) -> None:
    """As without a budget (and in transformers' Trainer): an override of max_steps on a recipe
    that also says epochs runs max_steps steps, more than the epoch holds (CI found 30 for 40)."""
    out = tmp_path / "override"
    path = make_recipe(training={"budget": "1h", "epochs": 1, "max_steps": 15, "batch_size": 16, "device": "cpu",
                                 "max_length": 48, "eval_before": False}, output={"dir": str(out)})
    recipe = load_recipe(path)
    result = run(recipe, show_progress=False)
    one_epoch = -(-read_manifest(out).training["train_rows"] // 16)
    assert one_epoch < 15 and result.steps == 15


def test_a_time_budget_chooses_steps_to_fit_and_the_schedule_follows_the_plan(make_recipe, tmp_path: Path,
                                                                               monkeypatch) -> None:
    """On a fake clock (every reading 0.05 s after the last) the plan is exact, whatever else the
    machine runs: the schedule is transformers' under the horizon in force at each step."""
    import time as real_time
    from types import SimpleNamespace

    import plugtune.training.train as train_module

    ticks = iter(range(10**9))
    monkeypatch.setattr(train_module, "time", SimpleNamespace(perf_counter=lambda: 0.05 * next(ticks),
                                                              process_time=real_time.process_time))
    out = tmp_path / "time"
    path = make_recipe(training={"budget": "6s", "batch_size": 4, "learning_rate": 1e-2, "device": "cpu",
                                 "max_length": 48, "eval_before": False}, output={"dir": str(out)})
    result = run(load_recipe(path), show_progress=False)
    log = _log(out)
    plans = [r for r in log if r.get("event") == "plan"]
    assert plans[0]["step"] == CALIBRATION_STEPS + 1 and plans[-1]["total_steps"] == result.steps
    assert not any(p["reason"].startswith("overrun") for p in plans)
    assert CALIBRATION_STEPS + 1 < result.steps and result.train_seconds <= 6.0 * 1.05
    lrs = [r["lr"] for r in log if r.get("event") == "train"]
    assert lrs[-1] == 0.0  # the rebuilt schedule ends at the chosen step
    horizons = [(0, 10**6)] + [(p["step"], p["total_steps"]) for p in plans]
    for record in (r for r in log if r.get("event") == "train"):
        k = record["step"]
        total = [t for s_, t in horizons if s_ <= k][-1]
        assert record["lr"] == pytest.approx(1e-2 * max(total - k, 0) / total, rel=1e-9, abs=1e-15)
    assert json.loads((out / "plugtune.json").read_text())["training"]["plan"]["total_steps"] == result.steps


def test_on_the_real_clock_a_time_budget_ends_at_its_plan_or_says_it_overran(make_recipe, tmp_path: Path) -> None:
    out = tmp_path / "real"
    path = make_recipe(training={"budget": "3s", "batch_size": 4, "learning_rate": 1e-2, "device": "cpu",
                                 "max_length": 48, "eval_before": False}, output={"dir": str(out)})
    result = run(load_recipe(path), show_progress=False)
    plans = [r for r in _log(out) if r.get("event") == "plan"]
    assert plans and plans[-1]["total_steps"] == result.steps  # planned, or stopped where it overran


def test_a_validation_split_is_carved_from_train_and_the_test_split_is_not_read(make_recipe, tmp_path: Path) -> None:
    path = make_recipe(training={"device": "cpu"})
    raw = yaml.safe_load(path.read_text())
    raw["data"]["validation"] = 0.25
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)
    plain = load_recipe(path, ["data.validation=null"]).load_data()
    data = recipe.load_data()
    train_before = plain.splits["train"]
    assert len(data.splits["test"]) == round(0.25 * len(train_before))
    assert len(data.splits["train"]) + len(data.splits["test"]) == len(train_before)
    assert all(row in train_before for row in data.splits["test"])
    assert not any(row in plain.splits["test"] for row in data.splits["test"] if row not in train_before)
    assert [r for r in recipe.load_data().splits["test"]] == data.splits["test"]  # seeded: the same rows again
    assert data.counts[0].kept["test"] == len(data.splits["test"])
    with pytest.raises(Exception, match=r"data.validation: .* leaves no rows"):
        load_recipe(path, [f"data.validation={len(train_before)}"]).load_data()
