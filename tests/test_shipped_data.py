"""The generated datasets under recipes/data/ are what their seeded scripts write, and the
rules their README promises hold on every row.

* ``support_chats*.jsonl`` (``make_support_chats.py``): OpenAI messages, one system prompt,
  2-4 user turns, the last answer routes the last order number the user gave to the
  department of the problem; the chat recipe's exact_match pattern finds that field.
* ``translations*.jsonl`` (``make_translations.py``): Alpaca rows, the test sentences not
  among the training ones.
* ``support_prefs*.jsonl`` (``make_support_prefs.py``): preference pairs whose chosen answer
  is good and whose rejected one has exactly one flaw, lengths comparable, the test prompts
  (and their held-out wordings and items) not in the training files; the SFT file's
  conversations end with a good answer.
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
    ("make_support_chats", {"TRAIN_FILE": "support_chats.jsonl", "TEST_FILE": "support_chats_test.jsonl"}),
    ("make_translations", {"TRAIN_FILE": "translations.jsonl", "TEST_FILE": "translations_test.jsonl"}),
    ("make_support_prefs", {"TRAIN_FILE": "support_prefs.jsonl", "TEST_FILE": "support_prefs_test.jsonl",
                            "SFT_FILE": "support_prefs_sft.jsonl"}),
])
def test_the_files_are_what_the_seeded_script_writes(name: str, files: dict[str, str], tmp_path, monkeypatch) -> None:
    module = _script(name)
    for attribute, file in files.items():
        monkeypatch.setattr(module, attribute, tmp_path / file)
    module.main()
    for file in files.values():
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


def _masked(text: str) -> str:
    return re.sub(r"ORD-\d+", "ORD-#", text)


def test_support_prefs_pair_a_good_answer_with_one_flawed_one() -> None:
    module = _script("make_support_prefs")
    train, test = _rows(DATA / "support_prefs.jsonl"), _rows(DATA / "support_prefs_test.jsonl")
    sft = _rows(DATA / "support_prefs_sft.jsonl")
    assert (len(train), len(test), len(sft)) == (320, 80, 320)
    for rows in (train, test):
        module.check_pairs(rows)  # chosen: no flaw; rejected: exactly one
        assert len({json.dumps(row, sort_keys=True) for row in rows}) == len(rows)  # no duplicate rows
        assert all(row["chosen"] != row["rejected"] for row in rows)
        departments = [module.department_of(row["prompt"][1]["content"]) for row in rows]
        assert {d: departments.count(d) for d in module.DEPARTMENTS} == dict.fromkeys(module.DEPARTMENTS, len(rows) // 4)
        flaws = [module.judge(row["prompt"], row["rejected"]).pop() for row in rows]
        assert all(abs(flaws.count(f) - len(rows) / 3) <= len(rows) / 12 for f in module.FLAWS), flaws
        # length alone does not tell them apart: in about-tokens (words, digits, marks) the
        # chosen answer is the longer one in at most 60% of the pairs, never by much
        gaps = [module._length(row["chosen"]) - module._length(row["rejected"]) for row in rows]
        assert sum(g > 0 for g in gaps) / len(rows) <= 0.6 and any(g < 0 for g in gaps)
        assert abs(sum(gaps) / len(gaps)) <= 1 and max(map(abs, gaps)) <= 8
    module.check_sft(sft)
    assert len({json.dumps(row, sort_keys=True) for row in sft}) == len(sft)


def test_support_prefs_test_prompts_are_not_in_training() -> None:
    module = _script("make_support_prefs")
    train, test = _rows(DATA / "support_prefs.jsonl"), _rows(DATA / "support_prefs_test.jsonl")
    sft = _rows(DATA / "support_prefs_sft.jsonl")
    users = lambda rows, key: [row[key][1]["content"] for row in rows]  # noqa: E731
    seen = set(users(train, "prompt")) | set(users(sft, "messages"))
    assert not set(users(test, "prompt")) & seen
    # not even with the order number masked: the test prompts are new problems, not new numbers
    assert not {_masked(u) for u in users(test, "prompt")} & {_masked(u) for u in seen}
    numbers = lambda rows: {n for row in rows for n in re.findall(r"ORD-\d+", json.dumps(row))}  # noqa: E731
    assert not numbers(train) & numbers(test) and not numbers(sft) & numbers(test) and not numbers(train) & numbers(sft)
    # the held-out items and wordings come up in the test file only
    texts = lambda rows: " ".join(json.dumps(row) for row in rows)  # noqa: E731
    held_out = [name for name, _, h in module.ITEMS if h]
    longest = lambda fragment: max(re.split(r"\{\w+\}", fragment), key=len)  # noqa: E731
    held_out += [longest(w) for problems in module.PROBLEMS.values() for w, _, h in problems if h]
    held_out += [longest(t) for t, h in module.OPENINGS + module.ROUTINGS + module.CLOSINGS if h]
    training = texts(train) + texts(sft)
    assert not [h for h in held_out if h in training]
    assert sum(h in texts(test) for h in held_out) >= len(held_out) * 0.8


def test_the_preference_recipes_read_these_files() -> None:
    from plugtune.training.recipe import load_recipe

    dpo, orpo = (load_recipe(RECIPES / f"support-prefs-smollm2-{o}.yaml") for o in ("dpo", "orpo"))
    sft, sft_dpo = (load_recipe(RECIPES / f"support-prefs-smollm2-{s}.yaml") for s in ("sft", "sft-dpo"))
    for recipe in (dpo, orpo, sft_dpo):
        assert recipe.task.type == "preference" and [e.name for e in recipe.evaluators][:2] == ["preference", "loss"]
        assert recipe.loader.options.path == DATA / "support_prefs.jsonl"
        assert recipe.loader.options.test_path == DATA / "support_prefs_test.jsonl"
    assert (dpo.task.objective.name, orpo.task.objective.name) == ("dpo", "orpo")
    assert sft.task.type == "chat" and sft.loader.options.path == DATA / "support_prefs_sft.jsonl"
    # stage 2 trains on stage 1's adapter folder, with stage 1 as its reference, and otherwise as the DPO recipe
    assert sft_dpo.spec.base_model == str(sft.output_dir) == "adapters/support-prefs-smollm2-sft"
    assert sft_dpo.task == dpo.task and sft_dpo.spec.data == dpo.spec.data and sft_dpo.spec.training == dpo.spec.training
