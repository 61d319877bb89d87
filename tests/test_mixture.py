"""Mixtures: ``data.sources`` validated per source, combined by concatenation or seeded
sampling by weight, each source's rows normalized by its own task options, and each
source's counts in the log and the adapter's manifest (core/data/mixture.py)."""

from __future__ import annotations

import json
from collections import Counter
from io import StringIO
from pathlib import Path
from typing import Any, Literal

import pytest
from rich.console import Console

from plugtune import hookimpl
from plugtune.data.mixture import Mix, load_data, quotas
from plugtune.kernel.errors import DataError, RecipeError
from plugtune.plugins.tasks.causal_lm import CausalLm, CausalLmOptions
from plugtune.testing import plugin_system_with, recipe_dict
from plugtune.training.recipe import load_recipe
from plugtune.training.train import run, run_inputs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second source with other column names (``q``/``a``): 40 rows, its own test file."""
    folder = tmp_path_factory.mktemp("pairs")
    for name, n in (("pairs.jsonl", 40), ("pairs_test.jsonl", 6)):
        with open(folder / name, "w", encoding="utf-8") as fh:
            for i in range(n):
                thing = ["sky", "grass", "sea", "sun"][i % 4]
                answer = {"sky": "blue", "grass": "green", "sea": "blue", "sun": "yellow"}[thing]
                fh.write(json.dumps({"q": f"what is the colour of the {thing} ?", "a": answer}) + "\n")
    return folder


def mixture_raw(tiny_llama: Path, tiny_data: Path, pairs: Path, **data: Any) -> dict[str, Any]:
    raw = recipe_dict(tiny_llama, tiny_data)
    raw["data"] = {"sources": [
        {"loader": "table", "options": {"path": str(tiny_data / "sft.jsonl"), "test_size": 0.25}, "name": "sft"},
        {"loader": "table", "options": {"path": str(pairs / "pairs.jsonl"), "test_path": str(pairs / "pairs_test.jsonl"),
                                        "columns": {"question": "q", "answer": "a"}}},
    ], **data}
    return raw


def problems(raw: dict[str, Any], base_dir: Path, **kwargs: Any) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(raw=raw, base_dir=base_dir, **kwargs)
    return info.value.problems


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def test_a_mixture_validates_and_names_its_sources(tiny_llama, tiny_data, pairs, tmp_path) -> None:
    recipe = load_recipe(raw=mixture_raw(tiny_llama, tiny_data, pairs), base_dir=tmp_path)
    assert recipe.is_mixture and recipe.mix == Mix("concat", None, None)
    assert [(s.name, s.where) for s in recipe.sources] == [("sft", "data.sources[0]"),
                                                           ("table:pairs.jsonl", "data.sources[1]")]
    inputs = dict(run_inputs(recipe))  # the output policy protects every source's files
    assert inputs["data.sources[0].options.path"] == tiny_data / "sft.jsonl"
    assert inputs["data.sources[1].options.path"] == pairs / "pairs.jsonl"
    assert inputs["data.sources[1].options.test_path"] == pairs / "pairs_test.jsonl"
    assert recipe.loader.name == "sources"  # the stand-in: load() gives the mixed rows
    assert len(recipe.loader.build().load(0)["train"]) == 192 + 40


def test_a_single_source_recipe_is_unchanged(tiny_llama, tiny_data, tmp_path) -> None:
    recipe = load_recipe(raw=recipe_dict(tiny_llama, tiny_data), base_dir=tmp_path)
    assert not recipe.is_mixture and recipe.loader.name == "table"
    assert [(s.name, s.where, s.loader) for s in recipe.sources] == [("table", "data", recipe.loader)]
    assert dict(run_inputs(recipe))["data.options.path"] == tiny_data / "sft.jsonl"
    data = recipe.load_data()
    assert data.splits == recipe.loader.build().load(recipe.training.seed) and not data.mixture


def test_every_problem_of_every_source_at_its_path(tiny_llama, tiny_data, pairs, tmp_path) -> None:
    raw = mixture_raw(tiny_llama, tiny_data, pairs, mix="sample")
    sources = raw["data"]["sources"]
    sources[0]["weight"] = -1
    sources[1]["loader"] = "tabel"
    sources.append({"loader": "table", "options": {"path": "nope.csv"}, "weight": 1})
    sources.append({"loader": "table", "options": {"path": str(pairs / "pairs.jsonl")}, "weight": 1, "name": "sft"})
    found = problems(raw, tmp_path)
    assert "data.sources[0].weight: Input should be greater than 0 (got -1)" in found
    assert any(p.startswith("data.sources[1].loader: unknown data loader 'tabel'; did you mean 'table'?") for p in found)
    assert (f"data.sources[2].options.path: file not found: {tmp_path / 'nope.csv'} "
            f"(paths are relative to the recipe's folder)") in found
    assert "data.sources[3].name: 'sft' is also the name of data.sources[0]; give each source its own name" in found
    # the fourth source's columns are q/a, not the task's: named per source, with the fix
    assert ("task.prompt: column 'question' is not in the data of data.sources[3] (sft) (columns: q, a); "
            "rename it with data.sources[3].options.columns") in found


def test_weights_belong_to_sampling(tiny_llama, tiny_data, pairs, tmp_path) -> None:
    raw = mixture_raw(tiny_llama, tiny_data, pairs, mix="sample")
    raw["data"]["sources"][1]["weight"] = 1
    assert problems(raw, tmp_path) == [
        "data.sources[0].weight: mix: sample draws each source by its weight; give every source a weight "
        "(a positive number; they need not add up to 1)"]
    raw = mixture_raw(tiny_llama, tiny_data, pairs, size=10)
    raw["data"]["sources"][0]["weight"] = 0.5
    assert problems(raw, tmp_path) == [
        "data.sources[0].weight: weights apply to mix: sample; remove it, or set data.mix: sample",
        "data.size: size applies to mix: sample (concat keeps every row); remove it, or set data.mix: sample"]


@pytest.mark.parametrize("data,expected", [
    ({"loader": "table", "options": {"path": "x.csv"}, "sources": [{"loader": "table"}]},
     "data: give either loader (one source) or sources (a mixture), not both"),
    ({"loader": "table", "options": {"path": "x.csv"}, "mix": "sample"},
     "data: mix apply to a mixture (data.sources); a single loader takes none"),
    ({"sources": []}, "data.sources: List should have at least 1 item after validation, not 0"),
    ({"sources": [{"loader": "table", "option": {}}]}, "data.sources[0].option: unknown key; did you mean 'options'?"),
    ({"sources": [{"loader": "table", "options": {"path": "x.csv"}}], "mix": "shuffle"},
     "data.mix: Input should be 'concat' or 'sample' (got 'shuffle')"),
])
def test_the_data_block_shape(data, expected, tiny_llama, tiny_data, tmp_path) -> None:
    raw = recipe_dict(tiny_llama, tiny_data)
    raw["data"] = data
    assert expected in problems(raw, tmp_path)


def test_override_path_reaches_a_source(tiny_llama, tiny_data, pairs, tmp_path) -> None:
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(mixture_raw(tiny_llama, tiny_data, pairs)))
    recipe = load_recipe(path, ["data.sources.1.max_rows=7", "data.sources.1.name=few"])
    assert recipe.sources[1].name == "few" and recipe.sources[1].max_rows == 7
    assert len(recipe.load_data().splits["train"]) == 192 + 7


# --------------------------------------------------------------------------------------------
# Combining
# --------------------------------------------------------------------------------------------


def test_concat_keeps_every_row_in_order_and_concatenates_the_tests(tiny_llama, tiny_data, pairs, tmp_path) -> None:
    recipe = load_recipe(raw=mixture_raw(tiny_llama, tiny_data, pairs), base_dir=tmp_path)
    data = recipe.load_data()
    alone = [s.loader.build().load(recipe.training.seed) for s in recipe.sources]
    renamed = [{"question": r["question"], "answer": r["answer"]} for r in alone[1]["train"]]
    assert data.splits["train"] == alone[0]["train"] + renamed
    assert len(data.splits["test"]) == len(alone[0]["test"]) + 6  # never resampled
    assert [(c.read, c.kept) for c in data.counts] == [({"train": 192, "test": 64}, {"train": 192, "test": 64}),
                                                       ({"train": 40, "test": 6}, {"train": 40, "test": 6})]


def test_quotas_add_up_and_follow_the_weights() -> None:
    assert quotas(10, [1, 1, 1]) == [4, 3, 3]
    assert quotas(100, [3, 1]) == [75, 25]
    assert quotas(7, [0.5, 0.25, 0.25]) == [3, 2, 2]  # 3.5, 1.75, 1.75: the larger remainders round up
    assert quotas(10, [1e308, 1e308]) == [5, 5]  # their sum overflows; their ratios do not
    for total in (0, 1, 13, 999):
        assert sum(quotas(total, [0.2, 0.7, 0.1])) == total


def test_sampling_draws_the_proportions_seeded(tiny_llama, tiny_data, pairs, tmp_path) -> None:
    raw = mixture_raw(tiny_llama, tiny_data, pairs, mix="sample", size=200)
    raw["data"]["sources"][0]["weight"] = 0.3
    raw["data"]["sources"][1]["weight"] = 0.7  # 140 rows from a source of 40: whole repetitions and a draw
    recipe = load_recipe(raw=raw, base_dir=tmp_path)
    data = recipe.load_data()
    train = data.splits["train"]
    assert len(train) == 200
    owners = Counter(data.owner[id(row)] for row in train)
    assert owners == {0: 60, 1: 140}
    assert [c.kept["train"] for c in data.counts] == [60, 140]
    pair_rows = Counter(id(row) for row in train if data.owner[id(row)] == 1)
    assert sorted(set(pair_rows.values())) == [3, 4]  # every row 3 times, 20 of them a 4th
    # seeded: the same seed gives the same rows in the same order; another seed another draw
    again = recipe.load_data().splits["train"]
    assert again == train
    other = load_recipe(raw={**raw, "data": {**raw["data"], "seed": 5}}, base_dir=tmp_path).load_data().splits["train"]
    assert other != train and len(other) == 200
    assert data.splits["test"] == recipe.load_data().splits["test"] and len(data.splits["test"]) == 64 + 6


def test_sampling_defaults_to_the_concatenated_size(tiny_llama, tiny_data, pairs, tmp_path) -> None:
    raw = mixture_raw(tiny_llama, tiny_data, pairs, mix="sample")
    raw["data"]["sources"][0]["weight"] = 1
    raw["data"]["sources"][1]["weight"] = 1
    data = load_recipe(raw=raw, base_dir=tmp_path).load_data()
    assert [c.kept["train"] for c in data.counts] == [116, 116]  # (192 + 40) / 2 each


def test_a_source_with_empty_fields_is_named(tiny_llama, tiny_data, pairs, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({"q": "what ?", "a": "" if i == 3 else "blue"}) for i in range(8)) + "\n")
    raw = mixture_raw(tiny_llama, tiny_data, pairs)
    raw["data"]["sources"][1]["options"] = {"path": str(bad), "columns": {"question": "q", "answer": "a"}}
    with pytest.raises(DataError, match=r"^data.sources\[1\] \(table:bad.jsonl\): (train|test) split: 1 row\(s\) have an "
                                        r"empty 'answer'"):
        load_recipe(raw=raw, base_dir=tmp_path).load_data()


# --------------------------------------------------------------------------------------------
# Per-source task options: normalize only
# --------------------------------------------------------------------------------------------


class ShapedOptions(CausalLmOptions):
    shape: Literal["qa", "pair"] = "qa"
    template: str | None = None


class Shaped(CausalLm):
    """A causal-lm task that normalizes rows of two shapes: ``qa`` (question/answer) or
    ``pair`` (``pair: [question, answer]``), as a chat task maps ShareGPT to messages."""

    Options = ShapedOptions

    def __init__(self, options: ShapedOptions, name: str) -> None:
        super().__init__(options, name)
        self.shape = options.shape
        self.seen = 0

    def normalize(self, example: dict[str, Any]) -> dict[str, Any]:
        self.seen += 1  # per-copy state: a source's normalizer is its own
        if self.shape == "qa":
            return example
        if not isinstance(example.get("pair"), list) or len(example["pair"]) != 2:
            raise DataError("not a pair row: expected 'pair': [question, answer]")
        return {"question": example["pair"][0], "answer": example["pair"][1]}

    def check_columns(self, columns: list[str]) -> list[str]:
        wanted = {"qa": ["question", "answer"], "pair": ["pair"]}[self.shape]
        return [f"shape: {self.shape} needs column {c!r} (columns: {', '.join(columns)}); rename it with "
                f"data.options.columns" for c in wanted if c not in columns]


class ShapedPlugin:
    @hookimpl
    def register_tasks(self, register: Any) -> None:
        register("shaped-lm", Shaped)


@pytest.fixture
def shaped(tmp_path: Path) -> Any:
    with open(tmp_path / "pairs.jsonl", "w", encoding="utf-8") as fh:
        for i in range(12):
            fh.write(json.dumps({"pair": [f"what is the colour of the sky ? {i}", "blue"]}) + "\n")
    with plugin_system_with([("shaped", ShapedPlugin())]) as system:
        yield system


def shaped_raw(tiny_llama: Path, tiny_data: Path, tmp_path: Path, override: dict[str, Any] | None) -> dict[str, Any]:
    raw = recipe_dict(tiny_llama, tiny_data)
    raw["task"] = {**raw["task"], "type": "shaped-lm"}
    second = {"loader": "table", "options": {"path": str(tmp_path / "pairs.jsonl"), "test_size": 0.25}, "name": "pairs"}
    if override is not None:
        second["task"] = override
    raw["data"] = {"sources": [{"loader": "table", "options": {"path": str(tiny_data / "sft.jsonl"), "test_size": 0.25}},
                               second]}
    return raw


def test_a_source_task_normalizes_only_its_rows(shaped, tiny_llama, tiny_data, tmp_path) -> None:
    recipe = load_recipe(raw=shaped_raw(tiny_llama, tiny_data, tmp_path, {"shape": "pair"}), base_dir=tmp_path,
                         plugins=shaped)
    assert recipe.sources[0].task is None and recipe.sources[1].task.shape == "pair"
    assert recipe.task.shape == "qa"  # the recipe's task, which encodes every row, is unchanged
    data = recipe.load_data()
    pair_rows = [r for r in data.splits["train"] + data.splits["test"] if data.owner[id(r)] == 1]
    assert len(pair_rows) == 12 and all(set(r) == {"question", "answer"} and r["answer"] == "blue" for r in pair_rows)
    assert recipe.task.seen == 0 and recipe.sources[1].task.seen == 0  # normalized by copies


def test_a_source_task_is_checked_at_validation(shaped, tiny_llama, tiny_data, tmp_path) -> None:
    def found(override: Any) -> list[str]:
        return problems(shaped_raw(tiny_llama, tiny_data, tmp_path, override), tmp_path, plugins=shaped)

    # without the override the pair file's columns do not fit the task: the task says so, per source
    assert found(None) == [
        "data.sources[1]: task.shape: qa needs column 'question' (columns: pair); rename it with data.sources[1].options.columns",
        "data.sources[1]: task.shape: qa needs column 'answer' (columns: pair); rename it with data.sources[1].options.columns"]
    assert found({"shap": "pair"}) == ["data.sources[1].task.shap: unknown key; did you mean 'shape'?"]
    assert found({"shape": "triple"}) == ["data.sources[1].task.shape: Input should be 'qa' or 'pair' (got 'triple')"]
    assert found({"type": "causal-lm", "shape": "pair"}) == [
        "data.sources[1].task.type: a source's task is the recipe's (shaped-lm) with other options; remove type, or "
        "train on the other task in a recipe of its own"]
    assert found({"template": "mine.jinja", "shape": "pair"}) == [
        "data.sources[1].task.template: one adapter has one chat template (recorded in its manifest and used at "
        "inference); set task.template for the whole recipe"]


def test_a_source_task_needs_a_task_that_normalizes(tiny_llama, tiny_data, pairs, tmp_path) -> None:
    raw = mixture_raw(tiny_llama, tiny_data, pairs)
    raw["data"]["sources"][1]["task"] = {"prompt": "question : {question} answer :"}
    assert problems(raw, tmp_path) == [
        "data.sources[1].task: task causal-lm does not normalize rows, so options for one source change nothing; "
        "remove data.sources[1].task"]


def test_a_row_no_normalizer_fits_names_the_source_and_row(shaped, tiny_llama, tiny_data, tmp_path) -> None:
    with open(tmp_path / "pairs.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"pair": "just text"}) + "\n")
    recipe = load_recipe(raw=shaped_raw(tiny_llama, tiny_data, tmp_path, {"shape": "pair"}), base_dir=tmp_path,
                         plugins=shaped)
    with pytest.raises(DataError, match=r"^data.sources\[1\] \(pairs\) (train|test) row \d+: not a pair row"):
        recipe.load_data()


# --------------------------------------------------------------------------------------------
# Counts after encoding, in the log and the manifest
# --------------------------------------------------------------------------------------------


def test_each_source_counts_its_truncated_and_dropped_rows(tiny_llama, tiny_data, pairs, tmp_path) -> None:
    from transformers import AutoTokenizer

    from plugtune.data.datacheck import prepare_split

    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"question": "the " * (30 + i), "answer": "blue"}) + "\n" for i in range(10)))
    raw = mixture_raw(tiny_llama, tiny_data, pairs)
    raw["data"]["sources"][1]["options"] = {"path": str(long), "test_size": 0.2}
    recipe = load_recipe(raw=raw, base_dir=tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    for policy in ("truncate", "drop"):
        data = recipe.load_data()
        for split in ("train", "test"):
            prepared = prepare_split(data.splits[split], recipe.task, tokenizer, 24, policy, split)
            data.count_encoded(split, prepared.rows, policy=policy, max_length=24, cut=prepared.cut, dropped=prepared.dropped)
            assert sum(c.truncated[split] for c in data.counts) == prepared.cut
            assert sum(c.dropped[split] for c in data.counts) == prepared.dropped
        short, longer = data.counts
        assert (short.truncated, short.dropped) == ({"train": 0, "test": 0}, {"train": 0, "test": 0})
        if policy == "drop":
            assert longer.dropped == {"train": 8, "test": 2} and longer.truncated == {"train": 0, "test": 0}
        else:
            assert longer.truncated == {"train": 8, "test": 2} and longer.dropped == {"train": 0, "test": 0}


def test_counts_that_cannot_be_told_apart_are_unknown(tiny_llama, tiny_data, pairs, tmp_path) -> None:
    recipe = load_recipe(raw=mixture_raw(tiny_llama, tiny_data, pairs), base_dir=tmp_path)
    data = recipe.load_data()
    copies = [{"input_ids": [1, 2], "example": dict(row)} for row in data.splits["train"]]  # rows no source owns
    data.count_encoded("train", copies, policy="drop", max_length=24, cut=0, dropped=0)
    assert [c.dropped["train"] for c in data.counts] == [None, None]
    assert "? dropped" in data.lines()[0]


@pytest.mark.slow
def test_a_mixture_trains_and_records_its_sources(tiny_llama, tiny_data, pairs, tmp_path) -> None:
    raw = mixture_raw(tiny_llama, tiny_data, pairs, mix="sample", size=64)
    raw["data"]["sources"][0].update(weight=3, max_rows=100)
    raw["data"]["sources"][1]["weight"] = 1
    raw["training"].update(max_steps=2, eval_before=False, max_length=13)
    raw["evaluators"] = ["loss"]
    raw["output"] = {"dir": str(tmp_path / "adapter")}
    recipe = load_recipe(raw=raw, base_dir=tmp_path)
    out = StringIO()
    run(recipe, console=Console(file=out, width=400), show_progress=False)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("source ")]
    assert lines[0].startswith("source sft (table, weight 3): read 192 train + 64 test, kept 48 train (75.0% of train) "
                               "+ 64 test, ")
    assert lines[1].startswith("source table:pairs.jsonl (table, weight 1): read 40 train + 6 test, kept 16 train "
                               "(25.0% of train) + 6 test, ")
    manifest = json.loads((tmp_path / "adapter" / "plugtune.json").read_text())
    sources = manifest["training"]["sources"]
    assert [(s["name"], s["loader"], s["weight"], s["rows_read"], s["rows_kept"]) for s in sources] == [
        ("sft", "table", 3, {"train": 192, "test": 64}, {"train": 48, "test": 64}),
        ("table:pairs.jsonl", "table", 1, {"train": 40, "test": 6}, {"train": 16, "test": 6})]
    # every row is 14 tokens: max_length 13 cuts each one's end of text, and the counts say whose
    assert [s["truncated"] for s in sources] == [{"train": 48, "test": 64}, {"train": 16, "test": 6}]
    assert all(s["dropped"] == {"train": 0, "test": 0} for s in sources)
    assert manifest["training"]["train_rows"] <= 64


def test_load_data_needs_a_source() -> None:
    with pytest.raises(DataError, match="no sources"):
        load_data([], None, 0)  # type: ignore[arg-type]


def test_a_chat_mixture_reads_each_source_in_its_own_format(tiny_llama, tiny_data, tmp_path) -> None:
    """The built-in chat task: an OpenAI source and a ShareGPT one (``task: {format:
    sharegpt}``), both encoded by the recipe's chat task in one template."""
    from plugtune.training.preview import build_preview, local_tokenizer

    with open(tmp_path / "openai.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(10):
            fh.write(json.dumps({"messages": [{"role": "user", "content": "what is the colour of the sky ?"},
                                              {"role": "assistant", "content": "blue"}]}) + "\n")
    with open(tmp_path / "sharegpt.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(10):
            fh.write(json.dumps({"conversations": [{"from": "human", "value": "what is the colour of the grass ?"},
                                                   {"from": "gpt", "value": "green"}]}) + "\n")
    raw = recipe_dict(tiny_llama, tiny_data, evaluators=["loss"])
    raw["task"] = {"type": "chat", "format": "openai", "template": "chatml"}
    raw["data"] = {"sources": [{"loader": "table", "options": {"path": str(tmp_path / "openai.jsonl")}, "name": "oa"},
                               {"loader": "table", "options": {"path": str(tmp_path / "sharegpt.jsonl")}, "name": "sg",
                                "task": {"format": "sharegpt"}}]}
    recipe = load_recipe(raw=raw, base_dir=tmp_path)
    built = build_preview(recipe, local_tokenizer(str(tiny_llama)))
    assert built.data.notes == ["oa: chat: read conversation format openai (10 rows)",
                                "sg: chat: read conversation format sharegpt (10 rows)"]
    sharegpt = [r for r in built.splits["train"].encoded if built.data.owner[id(r["example"])] == 1]
    assert len(sharegpt) == 8 and sharegpt[0]["example"]["messages"][1] == {"role": "assistant", "content": "green"}
    assert all(any(label != -100 for label in r["labels"]) for r in sharegpt)  # the assistant turn is trained
    # without the override the ShareGPT file does not fit the recipe's format: said per source
    del raw["data"]["sources"][1]["task"]
    assert problems(raw, tmp_path) == [
        "data.sources[1]: task.format: openai needs column 'messages' (columns: conversations); rename it with "
        "data.sources[1].options.columns"]
