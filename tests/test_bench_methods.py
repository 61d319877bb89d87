"""The methods benchmark (bench/methods.py) and the GPU check (bench/gpu_check.py) cannot rot:
their method lists match the registry, their recipes validate, and the table is built from
records as the run writes them. Fast: nothing trains here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plugtune import load_recipe
from plugtune.kernel.errors import PlugtuneError
from plugtune.kernel.registry import get_plugin_system

from bench_scripts import bench_modules

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


gpu_check, methods = bench_modules("gpu_check", "methods")


def test_every_registered_method_is_in_the_table_or_excluded_with_a_reason() -> None:
    listed = [m.name for m in methods.METHODS]
    assert len(listed) == len(set(listed)), "a method is listed twice"
    assert not set(listed) & set(methods.EXCLUDED), "a method is both listed and excluded"
    assert all(reason.strip() for reason in methods.EXCLUDED.values()), "an exclusion without a reason"
    missing = sorted(set(get_plugin_system().names("method")) - set(listed) - set(methods.EXCLUDED))
    assert not missing, f"registered tuning methods missing from bench/methods.py (add them to METHODS or EXCLUDED): {missing}"


def test_every_listed_method_has_a_recipe_and_a_gpu_case() -> None:
    for m in methods.METHODS:
        assert m.recipe.is_file(), f"{m.name}: no recipe at {m.recipe.relative_to(ROOT)}"
        assert m.name in gpu_check.CASES, f"{m.name}: no case in bench/gpu_check.py's CASES"
        assert m.purpose.strip() and m.centre > 0


@pytest.mark.skipif(not (SHARED / "sst2" / "train.tsv").is_file(), reason="SST-2 data not found beside the checkout (../shared/data/sst2)")
@pytest.mark.parametrize("m", methods.METHODS, ids=[m.name for m in methods.METHODS])
def test_method_recipe_validates_where_its_plugin_is_installed(m, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if get_plugin_system().find("method", m.name) is None:
        pytest.skip(f"tuning method {m.name!r} is not installed on this branch (the table lists it as such)")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(m.recipe, methods._overrides(m, methods.FULL, m.centre, tmp_path / "out"))
    assert recipe.method.name == m.name
    assert recipe.training.batch_size == methods.FULL.batch_size
    assert recipe.loader.options.max_train_rows == methods.FULL.train_rows


def test_gpu_check_dry_run_validates_every_installed_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.dry_run(tmp_path) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    for m in methods.METHODS:
        installed = get_plugin_system().find("method", m.name) is not None
        assert (f"{m.name}: ok" if installed else f"{m.name}: not installed") in out


def test_gpu_check_build_refuses_a_case_its_method_rejects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(gpu_check.CASES, "lora", ({"rank": 8, "target_modules": ["q_proj"]}, 1e-3))
    with pytest.raises(PlugtuneError, match="rank"):
        gpu_check.build("lora", tmp_path)
    monkeypatch.setitem(gpu_check.CASES, "lora", ({"r": 8, "target_modules": ["q_proj"]}, 1e-3))
    recipe = gpu_check.build("lora", tmp_path)
    assert (recipe.training.device, recipe.training.batch_size, recipe.training.max_steps) == ("cuda", gpu_check.BATCH, gpu_check.STEPS)


def test_the_rate_search_keeps_the_best_validation_accuracy_then_the_lower_loss() -> None:
    runs = [{"learning_rate": 1e-4, "accuracy": 0.80, "loss": 0.40},
            {"learning_rate": 3e-4, "accuracy": 0.85, "loss": 0.45},
            {"learning_rate": 1e-3, "accuracy": 0.85, "loss": 0.35}]
    assert methods.choose_rate(runs)["learning_rate"] == 1e-3
    assert methods.choose_rate(runs[:2])["learning_rate"] == 3e-4


def _record(name: str, caps: list[str]) -> dict:
    winner = {"learning_rate": 1e-3, "accuracy": 0.8, "loss": 0.4, "trainable_parameters": 100, "total_parameters": 1000,
              "adapter_bytes": 2_000_000, "seconds_per_step": 0.2, "steps": 64}
    sst2 = {"search": [winner], "winner": winner, "dev_accuracy": 0.81, "dev_rows": 6735, "dev_long_accuracy": 0.79,
            "dev_long_rows": 1496, "resident_bytes": 1_000_000, "capabilities": caps, "switch_ms": 0.002}
    agnews = {"accuracy": 0.85, "seconds_per_step": 0.3, "peak_rss_mb": 1500.0, "test_rows": 2001}
    return {"method": name, "status": "ok", "sst2": sst2, "agnews": agnews}


def test_the_table_reads_mixing_merging_and_combining_from_the_recorded_capabilities() -> None:
    from dataclasses import asdict

    results = {"sizes": asdict(methods.FULL), "meta": {"machine": "test", "runs": [{"methods": ["lora"], "wall_minutes": 1.0, "load": 0.0, "date": "2026-12-01"}]},
               "rows": [_record("lora", ["MixesRows", "Folds", "Combines"]), _record("prefix", []),
                        {"method": "dora", "status": "not installed"}, {"method": "vera", "status": "not run"},
                        {"method": "ia3", "status": "failed", "error": "RecipeError: bad", "sst2": {"error": "RecipeError: bad"}}]}
    text = methods.section(results)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["lora"].rstrip().endswith("| yes | yes | yes |")
    assert rows["prefix"].rstrip().endswith("| no | no | no |")
    assert "not installed on this branch" in rows["dora"] and "not run" in rows["vera"]
    assert "failed: RecipeError: bad" in rows["ia3"]
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert all(line.count("|") == header.count("|") for line in rows.values()), "a row with the wrong number of cells"
    assert "all 6,735 rows" in text and "1,496" in text and "all 2,001" in text


def test_a_methods_run_keeps_the_previous_rows_of_the_other_methods() -> None:
    from dataclasses import asdict

    meta = lambda names: {"machine": "m", "runs": [{"methods": names, "wall_minutes": 2.0, "load": 1.0, "date": "d"}]}  # noqa: E731
    previous = {"sizes": asdict(methods.FULL), "meta": meta(["lora", "prefix"]),
                "rows": [_record("lora", []), _record("prefix", [])]}
    previous = json.loads(json.dumps(previous))  # as bench/results/methods.json holds it
    assert methods.comparable(previous, methods.FULL, "m")
    assert not methods.comparable(previous, methods.QUICK, "m") and not methods.comparable(previous, methods.FULL, "other")
    again = _record("prefix", ["Folds"])
    results = methods.merged([again], previous, meta(["prefix"]), methods.FULL, whole=False)
    by_name = {r["method"]: r for r in results["rows"]}
    assert [r["method"] for r in results["rows"]] == [m.name for m in methods.METHODS]
    assert by_name["prefix"] is again and by_name["lora"]["sst2"]["capabilities"] == []
    assert by_name["dora"]["status"] == "not run"
    assert [run["methods"] for run in results["meta"]["runs"]] == [["lora", "prefix"], ["prefix"]]
    table = methods.readme_table(results)
    assert table.count("\n") == len(methods.METHODS) + 1 and "`dora`" in table
