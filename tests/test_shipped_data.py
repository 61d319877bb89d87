"""The generated datasets under recipes/data/ are what their seeded scripts write, and the
rules their README promises hold on every row.

* ``support_chats*.jsonl`` (``make_support_chats.py``): OpenAI messages, one system prompt,
  2-4 user turns, the last answer routes the last order number the user gave to the
  department of the problem; the chat recipe's exact_match pattern finds that field.
* ``translations*.jsonl`` (``make_translations.py``): Alpaca rows, the test sentences not
  among the training ones.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from plugtune.plugins.evaluators.text import ExactMatch, ExactMatchOptions
from plugtune.kernel.components import EvalBatch

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data"
RECIPES = DATA.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, DATA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


@pytest.mark.parametrize("name, files", [
    ("make_support_chats", ("support_chats.jsonl", "support_chats_test.jsonl")),
    ("make_translations", ("translations.jsonl", "translations_test.jsonl")),
])
def test_the_files_are_what_the_seeded_script_writes(name: str, files: tuple[str, str], tmp_path, monkeypatch) -> None:
    module = _script(name)
    monkeypatch.setattr(module, "TRAIN_FILE", tmp_path / files[0])
    monkeypatch.setattr(module, "TEST_FILE", tmp_path / files[1])
    module.main()
    for file in files:
        assert (tmp_path / file).read_bytes() == (DATA / file).read_bytes(), f"{file} differs from {name}.py's output"


def test_support_chats_follow_their_rules() -> None:
    module = _script("make_support_chats")
    train, test = _rows(DATA / "support_chats.jsonl"), _rows(DATA / "support_chats_test.jsonl")
    assert (len(train), len(test)) == (360, 60)
    for rows in (train, test):
        module.check(rows)  # the last order number given, one department, 2-4 user turns
        assert all(set(row) == {"messages"} and row["messages"][0]["content"] == module.SYSTEM for row in rows)
        departments = [re.search(r"to (\w+)\.$", row["messages"][-1]["content"]).group(1) for row in rows]
        assert {d: departments.count(d) for d in module.DEPARTMENTS} == dict.fromkeys(module.DEPARTMENTS, len(rows) // 4)
    corrected = [row for row in train if "find order" in json.dumps(row) or "no order" in json.dumps(row)]
    assert len(corrected) >= 20  # the first number given is not always the one to quote
    numbers = lambda rows: {n for row in rows for n in re.findall(r"ORD-\d+", json.dumps(row))}  # noqa: E731
    assert not numbers(train) & numbers(test)


def test_the_chat_recipes_pattern_scores_the_field() -> None:
    recipe = yaml.safe_load((RECIPES / "support-chat-smollm2-lora.yaml").read_text(encoding="utf-8"))
    options = next(e["options"] for e in recipe["evaluators"] if isinstance(e, dict) and e["name"] == "exact_match")
    ev = ExactMatch(ExactMatchOptions(**options))
    references = [row["messages"][-1]["content"] for row in _rows(DATA / "support_chats_test.jsonl")]
    wrong_department = [re.sub(r"to (\w+)\.$", lambda m: "to Billing." if m.group(1) != "Billing" else "to Returns.", r)
                        for r in references]
    wrong_order = [re.sub(r"ORD-\d", "ORD-0", r) for r in references]
    for generated, expected in ((references, 1.0), (wrong_department, 0.0), (wrong_order, 0.0)):
        ev.reset()
        ev.update(EvalBatch([None] * len(references), [None] * len(references), 0.0, len(references),
                            generated=generated, reference_texts=references))
        assert ev.compute() == {"exact_match": expected}


def test_translations_are_alpaca_rows_with_a_disjoint_test_split() -> None:
    train, test = _rows(DATA / "translations.jsonl"), _rows(DATA / "translations_test.jsonl")
    assert (len(train), len(test)) == (400, 60)
    for rows in (train, test):
        assert all(set(row) == {"instruction", "input", "output"} and all(row.values()) for row in rows)
        assert len({row["input"] for row in rows}) == len(rows)
        for row in rows:
            question = row["input"].endswith("?")
            assert row["output"].startswith("¿") == question and row["output"][-1] == row["input"][-1]
            assert (" not " in row["input"]) == (" no " in row["output"])
    assert not {row["input"] for row in train} & {row["input"] for row in test}
