"""bench/dpo_vs_trl.py's pure parts: the stand-in pairs, the rows TRL gets and in which order,
the token-id comparison, the step records of both tools and the section built from them.
Fast: nothing trains and TRL is not imported."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from plugtune import load_recipe
from plugtune.data.batching import epoch_batches

from bench_scripts import bench_modules

(bench,) = bench_modules("dpo_vs_trl")


@pytest.fixture()
def pairs(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    with open(bench.TICKETS, newline="", encoding="utf-8") as fh:
        rows = bench.standin_pairs(list(csv.DictReader(fh))[:40])
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
    return train, test, rows


def test_standin_pairs_have_the_shipped_shape_and_prefer_the_right_department(pairs) -> None:
    _, _, rows = pairs
    with open(bench.TICKETS, newline="", encoding="utf-8") as fh:
        labels = [t["label"].strip().lower() for t in list(csv.DictReader(fh))[:40]]
    for row, label in zip(rows, labels):
        assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        assert isinstance(row["chosen"], str) and isinstance(row["rejected"], str)
        assert label in row["chosen"]
        wrong = [d for d in bench.DEPARTMENTS if d in row["rejected"].lower()]
        assert wrong and label not in wrong
    with open(bench.TICKETS, newline="", encoding="utf-8") as fh:
        assert bench.standin_pairs(list(csv.DictReader(fh))[:40]) == rows  # seeded


def test_the_recipe_with_the_scripts_overrides_is_what_trl_gets(pairs, tmp_path: Path) -> None:
    train, test, _ = pairs
    s = bench.Settings()
    recipe = load_recipe(bench.RECIPE, bench.plugtune_overrides(s, train, test, "precomputed", tmp_path / "out", 5))
    t, lora, objective = recipe.training, recipe.method.options, recipe.task.objective
    assert (t.max_steps, t.batch_size, t.learning_rate, t.max_length, t.seed, t.threads) == (
        5, s.batch_size, s.learning_rate, s.max_length, s.seed, s.threads)
    assert (t.warmup_steps, t.scheduler, t.max_grad_norm, t.precision, t.device) == (0, "linear", s.max_grad_norm, "fp32", "cpu")
    assert not recipe.regularizers  # no weight decay: TRL gets weight_decay=0.0
    assert (lora.r, lora.alpha, lora.dropout, tuple(lora.target_modules)) == (s.r, s.alpha, 0.0, s.target_modules)
    assert (objective.name, objective.beta, objective.sft_weight) == ("dpo", s.beta, 0.0)
    assert recipe.task.reference == "precomputed"
    assert recipe.loader.options.max_train_rows == 5 * s.batch_size  # one epoch of the steps: both tools precompute those rows
    for method, extra in bench.MEMORY_METHODS.items():
        assert load_recipe(bench.RECIPE, bench.plugtune_overrides(s, train, test, "copy", tmp_path / method, 2, extra)).method.name == method


def test_trl_rows_wrap_answers_of_message_prompts_and_keep_text_rows() -> None:
    prompt = [{"role": "user", "content": "hi"}]
    assert bench.trl_row({"prompt": prompt, "chosen": "yes", "rejected": "no"}) == {
        "prompt": prompt, "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}]}
    text = {"prompt": "Q:", "chosen": " a", "rejected": " b"}
    assert bench.trl_row(text) == text


def test_visit_order_is_plugtunes_batches_epoch_after_epoch() -> None:
    lengths = [5, 9, 3, 7, 1, 8, 2, 6]
    order = bench.visit_order(lengths, 2, seed=3, steps=6)  # 4 batches an epoch: the second epoch starts at step 5
    expected = [i for b in epoch_batches(8, 2, seed=3, epoch=0, lengths=lengths) for i in b]
    expected += [i for b in epoch_batches(8, 2, seed=3, epoch=1, lengths=lengths) for i in b][:4]
    assert order == expected
    with pytest.raises(ValueError, match="do not fill batches"):
        bench.visit_order(lengths[:7], 2, seed=0, steps=2)


def test_compare_ids_counts_identical_rows_and_names_the_first_difference() -> None:
    ours = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4], "rejected_input_ids": [1, 2, 5],
             "rejected_labels": [-100, -100, 5], "prompt_length": [2]}] * 2
    same = {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5]}
    assert bench.compare_ids(ours, [same, same]) == {
        "rows": 2, "identical": 2, "same_prompt_ids": 2, "same_chosen_ids": 2, "same_rejected_ids": 2,
        "labels_cover_answer": 2, "first_difference": None}
    moved = {"prompt_ids": [1], "chosen_ids": [2, 3, 4], "rejected_ids": [2, 5]}  # the answer starts a token earlier
    result = bench.compare_ids(ours, [same, moved])
    assert result["identical"] == 1 and result["same_prompt_ids"] == 1
    assert result["first_difference"].startswith("row 1: prompt_ids [1, 2]")
    assert bench.compare_ids(ours, [same])["first_difference"] == "row counts differ"


def test_both_tools_records_read_alike_and_their_gap() -> None:
    lines = [json.dumps({"event": "eval"}),
             json.dumps({"event": "train", "step": 1, "loss": 0.6931, "logps/chosen": -90.0, "logps/rejected": -30.0,
                         "rewards/margin": 0.0, "rewards/accuracy": 0.0, "step_seconds": 6.0}),
             json.dumps({"event": "train", "step": 2, "loss": 0.62, "step_seconds": 5.0})]
    ours = bench.plugtune_records(lines)
    assert [r["step"] for r in ours] == [1, 2] and ours[0]["chosen_logp"] == -90.0 and ours[1]["margin"] is None
    history = [{"loss": 0.6931, "step": 1, "logps/chosen": -90.0002, "logps/rejected": -30.0, "rewards/margins": 0.0},
               {"loss": 0.63, "step": 2}, {"train_runtime": 12.0, "step": 2}]
    theirs = bench.trl_records(history, [12.0, 11.0])
    assert len(theirs) == 2 and theirs[0]["margin"] == 0.0 and theirs[1]["step_seconds"] == 11.0
    gap = bench.curve_gap(ours, theirs)
    assert gap["steps"] == 2 and gap["at_step"] == 2 and math.isclose(gap["max"], 0.01)
    assert bench.curve_gap(ours, theirs, "chosen_logp")["steps"] == 1
    assert bench.median_step({"records": ours}) == 5.0
    assert bench.examples_per_second({"steps": 2, "batch_size": 8, "train_seconds": 4.0, "reference_seconds": 4.0},
                                     with_reference_pass=True) == 2.0


def _run(tool: str, eps_seconds: float, peak: float) -> dict:
    records = [{"step": k, "loss": 0.6931 - 0.01 * k, "chosen_logp": -90.0, "rejected_logp": -30.0, "step_seconds": 1.0}
               for k in (1, 2, 3)]
    return {"tool": tool, "steps": 3, "batch_size": 8, "train_seconds": eps_seconds, "reference_seconds": 1.0,
            "records": records, "peak_rss_mb": peak, "train_seconds_per_step": 1.0}


def test_the_section_shows_every_run_and_the_memory_table() -> None:
    runs = {"trl": [_run("trl", 6.0, 4000.0)], "plugtune": [_run("plugtune", 3.0, 2600.0)],
            "plugtune-precomputed": [{"error": "boom"}], "trl-precomputed": [_run("trl", 4.0, 4100.0)]}
    results = {"settings": json.loads(json.dumps(bench.asdict(bench.Settings()))),
               "meta": {"command": "python bench/dpo_vs_trl.py", "machine": "2 CPU cores", "torch": "t", "transformers": "x",
                        "peft": "p", "load": 1.0, "data": "stand-in", "trl_version": "1.16.0"},
               "trl": {"rounds": 1, "steps": 3, "runs": runs, "prepared": {"longest": 87},
                       "ids": {"rows": 24, "identical": 24, "labels_cover_answer": 24, "first_difference": None}},
               "memory": {"steps": 2, "runs": {"lora": [{"mode": "adapter_off", "peak_rss_mb": 2600.0, "train_seconds": 4.0, "steps": 2},
                                                        {"mode": "copy", "peak_rss_mb": 3200.0, "train_seconds": 4.0, "steps": 2}],
                                               "prefix": [{"mode": "adapter_off", "error": "bad"}, {"mode": "copy", "error": "bad"}]}}}
    bench.analyse(results["trl"])
    text = bench.section(results)
    assert text.startswith("## Preference tuning (DPO)")
    assert "| plugtune, reference: adapter_off | 0.683100 |" in text and "| 2.00x |" in text and "-1,400 MB" in text
    assert "failed: boom" in text and "24 of 24 training pairs" in text
    assert "| lora | 2,600 MB | 3,200 MB | +600 MB |" in text and "| prefix | failed: bad |" in text
