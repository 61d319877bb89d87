"""``key=value`` overrides anywhere after the recipe, in any order with flags, through
:func:`plugtune.cli.main` in process; ``--adapter`` documented as repeatable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plugtune.cli import build_parser, main, parse_args


def test_overrides_between_flags_keep_their_order() -> None:
    args = parse_args(build_parser(), ["run", "R.yaml", "a.b=1", "--quiet", "c=2", "--overwrite", "a.b=3"])
    assert (args.recipe, args.overrides, args.quiet, args.overwrite) == ("R.yaml", ["a.b=1", "c=2", "a.b=3"], True, True)
    args = parse_args(build_parser(), ["eval", "training.max_eval_examples=4", "--adapter", "A", "--adapter", "B"])
    assert (args.recipe, args.overrides, args.adapters) == (None, ["training.max_eval_examples=4"], ["A", "B"])


def test_an_unknown_flag_is_still_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(build_parser(), ["validate", "R.yaml", "x=1", "--bogus"])
    assert info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["plugins", "x=1"])  # a command without a recipe takes no overrides


def test_adapter_is_documented_as_repeatable() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("eval", "generate", "classify"):
        assert "repeatable" in " ".join(sub[command].format_help().split()), command


def test_run_validate_and_eval_take_overrides_anywhere(make_recipe, tmp_path: Path) -> None:
    recipe = make_recipe()
    assert main(["validate", str(recipe), "training.max_steps=2", "method.options.r=2"]) == 0
    assert main(["run", str(recipe), "--quiet", "training.max_steps=3", "--overwrite", "method.options.r=4"]) == 0
    out = tmp_path / "adapters" / "tiny"
    manifest = json.loads((out / "plugtune.json").read_text())
    assert manifest["training"]["steps"] == 3 and manifest["method"]["options"]["r"] == 4
    report = tmp_path / "eval.json"
    assert main(["eval", str(recipe), "--adapter", str(out), "training.max_eval_examples=4", "--json", str(report)]) == 0
    assert set(json.loads(report.read_text())) == {"base", "tiny"}
