"""`plugtune eval / generate / classify / adapters` on adapters trained in the test, called
through the CLI's main() in-process (test_cli.py covers the subprocess behaviour)."""

from __future__ import annotations

import json

import pytest

import plugtune
from plugtune.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, tiny_bert, tiny_data):
    import yaml

    from plugtune.testing import recipe_dict

    root = tmp_path_factory.mktemp("cli")
    out = {}
    for name, classification in (("gen", False), ("gen2", False), ("cls", True)):
        recipe = recipe_dict(tiny_bert if classification else tiny_llama, tiny_data, classification=classification, name=name)
        recipe["output"] = {"dir": str(root / "adapters" / name)}
        if name == "gen2":
            recipe["training"]["seed"] = 7
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        out[name] = (path, plugtune.run(path, show_progress=False))
    return root, out


def test_adapters_lists_trained_adapters(trained, capsys):
    root, _ = trained
    assert main(["adapters", str(root / "adapters"), "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(records) == {"gen", "gen2", "cls"}
    assert records["cls"]["task"] == "sequence-classification"
    assert records["gen"]["method"] == "lora" and records["gen"]["bytes"] > 0
    assert "accuracy" in records["gen"]["metrics"]


def test_eval_shows_base_and_adapters_side_by_side(trained, capsys, tmp_path):
    root, runs = trained
    report = tmp_path / "eval.json"
    code = main(["eval", str(runs["gen"][0]), "--adapter", str(runs["gen"][1].adapter_dir),
                 "--adapter", str(runs["gen2"][1].adapter_dir), "--json", str(report)])
    assert code == 0
    columns = json.loads(report.read_text())
    assert list(columns) == ["base", "gen", "gen2"]
    # the same rows and evaluators as the run's own final evaluation
    assert columns["gen"]["loss"] == pytest.approx(runs["gen"][1].after["loss"], rel=1e-5)
    assert columns["base"]["loss"] == pytest.approx(runs["gen"][1].before["loss"], rel=1e-5)
    printed = capsys.readouterr().out
    assert "gen2" in printed and "perplexity" in printed


def test_eval_without_a_recipe_uses_the_adapters_own(trained, tmp_path, monkeypatch):
    _, runs = trained
    monkeypatch.chdir(tmp_path)  # the recipe's relative paths must not depend on the cwd
    report = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(runs["cls"][1].adapter_dir), "--json", str(report)]) == 0
    columns = json.loads(report.read_text())
    assert columns["cls"]["accuracy"] == pytest.approx(runs["cls"][1].after["accuracy"])


def test_generate_with_two_adapters_and_per_input(trained, capsys):
    _, runs = trained
    a, b = str(runs["gen"][1].adapter_dir), str(runs["gen2"][1].adapter_dir)
    assert main(["generate", "what is the colour of the sky ?", "--adapter", a, "--adapter", b, "--max-new-tokens", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("what is the colour of the sky ?") == 2
    assert "gen <-" in printed and "gen2 <-" in printed
    assert main(["generate", "one", "two", "--adapter", a, "--adapter", b, "--per-input", "--max-new-tokens", "1"]) == 0
    lines = capsys.readouterr().out
    assert "gen <- 'one'" in lines and "gen2 <- 'two'" in lines


def test_per_input_needs_one_adapter_per_input(trained, capsys):
    _, runs = trained
    a = str(runs["gen"][1].adapter_dir)
    assert main(["generate", "one", "two", "--adapter", a, "--per-input"]) == 1
    assert "one --adapter per input (2 inputs, 1 adapters)" in capsys.readouterr().err


def test_classify_prints_labels(trained, capsys):
    _, runs = trained
    assert main(["classify", "the film was great wonderful", "the plot was dull", "--adapter", str(runs["cls"][1].adapter_dir)]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    assert len(lines) == 2
    assert all(("positive" in l) != ("negative" in l) for l in lines)


def test_classify_refuses_a_generation_adapter(trained, capsys):
    _, runs = trained
    assert main(["classify", "x", "--adapter", str(runs["gen"][1].adapter_dir)]) == 5
    assert "use generate()" in capsys.readouterr().err
