"""The ``hf`` loader (``datasets``): files, save_to_disk folders, hub ids from the cache, splits,
select/filter expressions, cheap columns, streaming, and its errors; tiny training runs on a
save_to_disk folder, a JSONL file and a streamed file (with a resume)."""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import plugtune
from plugtune.artifacts.adapters import WEIGHTS_FILE, read_manifest
from plugtune.data.streaming import shuffled
from plugtune.kernel.errors import DataError, PluginError, RecipeError
from plugtune.kernel.registry import build_plugin_system, set_plugin_system
from plugtune.plugins.loaders.hf import HfLoader, HfOptions, HfStream
from plugtune.plugins.loaders.hf_expressions import RowFilter
from plugtune.plugins.loaders.table import TableLoader, TableOptions
from plugtune.sdk import RowStream
from plugtune.testing import check_data_loader
from plugtune.training.recipe import load_recipe
from test_checkpoints import FailingStepHook
from safetensors.torch import load_file

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's caches (datasets' Arrow files, tokenized splits) in its own folder."""
    home = tmp_path / "home"
    monkeypatch.setenv("PLUGTUNE_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return home


def write_jsonl(path: Path, n: int = 50) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"sentence": f"row {i} " + "x" * (i % 7), "label": "spam" if i % 5 == 0 else "ham", "n": i}) + "\n")
    return path


def make(tmp_path: Path, **options) -> HfLoader:
    return HfLoader(HfOptions.model_validate(options, context={"base_dir": tmp_path}))


def refused(tmp_path: Path, **options) -> str:
    with pytest.raises(Exception) as info:
        make(tmp_path, **options)
    return str(info.value)


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "d.jsonl")


@pytest.fixture
def saved(tmp_path: Path, jsonl: Path) -> tuple[Path, Path]:
    """A save_to_disk folder of one Dataset, and one of a DatasetDict (train, validation)."""
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_list([json.loads(line) for line in jsonl.read_text().splitlines()])
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict(train=ds, validation=ds.select(range(5))).save_to_disk(str(tmp_path / "dict"))
    return tmp_path / "single", tmp_path / "dict"


# --------------------------------------------------------------------------------------------
# Files, folders, splits
# --------------------------------------------------------------------------------------------


def test_jsonl_split_and_columns_equal_tables(tmp_path, jsonl):
    hf = make(tmp_path, path="d.jsonl", columns={"text": "sentence"})
    table = TableLoader(TableOptions.model_validate({"path": "d.jsonl", "columns": {"text": "sentence"}},
                                                    context={"base_dir": tmp_path}))
    assert hf.columns() == table.columns() == ["text", "label", "n"]
    assert hf.load(3) == table.load(3)  # the same seeded rows held out, in the same order
    assert hf.load(3) != hf.load(4)
    splits = check_data_loader("hf", {"path": str(jsonl), "test_size": 0.3}, bad_options=[{"path": str(jsonl), "test_size": 1.5}])
    assert (len(splits["train"]), len(splits["test"])) == (35, 15)


def test_the_arrow_cache_goes_under_plugtune_home(tmp_path, jsonl, _home):
    make(tmp_path, path="d.jsonl").load(0)
    assert glob.glob(str(_home / "datasets" / "json" / "**" / "*.arrow"), recursive=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "home"]  # nothing written beside the data


@pytest.mark.parametrize("fmt", ["parquet", "csv", "arrow"])
def test_parquet_csv_arrow_files(tmp_path, jsonl, fmt):
    datasets.disable_progress_bars()
    ds = datasets.load_dataset("json", data_files=str(jsonl), split="train", cache_dir=str(tmp_path / "c"))
    path = tmp_path / f"d.{fmt}"
    if fmt == "arrow":
        shutil.copy(glob.glob(str(tmp_path / "c" / "**" / "*.arrow"), recursive=True)[0], path)
    else:
        getattr(ds, f"to_{fmt}")(str(path))
    loader = make(tmp_path, path=path.name)
    assert loader.columns() == ["sentence", "label", "n"]
    splits = loader.load(0)
    assert (len(splits["train"]), len(splits["test"])) == (40, 10)
    assert sorted(r["n"] for r in splits["train"] + splits["test"]) == list(range(50))


def test_save_to_disk_dataset_and_dataset_dict(tmp_path, saved):
    single, folder = saved
    assert make(tmp_path, path="single").columns() == ["sentence", "label", "n"]
    splits = make(tmp_path, path="single").load(0)
    assert (len(splits["train"]), len(splits["test"])) == (40, 10)
    splits = make(tmp_path, path="dict", test_split="validation").load(0)
    assert (len(splits["train"]), [r["n"] for r in splits["test"]]) == (50, [0, 1, 2, 3, 4])
    assert [r["n"] for r in make(tmp_path, path="dict", split="validation").load(0)["train"]] == [r["n"] for r in
            make(tmp_path, path="dict", split="validation").load(0)["train"]]  # seeded split of validation, stable


def test_columns_reads_no_rows(tmp_path, saved, jsonl):
    single, folder = saved
    for arrow in [*single.glob("*.arrow"), *folder.glob("*/*.arrow")]:
        arrow.write_bytes(b"not arrow")  # columns() reads dataset_info.json, never the data
    assert make(tmp_path, path="single").columns() == ["sentence", "label", "n"]
    assert make(tmp_path, path="dict", test_split="validation").columns() == ["sentence", "label", "n"]
    with open(jsonl, "a", encoding="utf-8") as fh:
        fh.write("x" * (20 << 20) + "\n")  # a broken 20 MB line far past the first: columns() stops at line 1
    assert make(tmp_path, path="d.jsonl").columns() == ["sentence", "label", "n"]


def test_test_path(tmp_path, jsonl):
    write_jsonl(tmp_path / "t.jsonl", 7)
    splits = make(tmp_path, path="d.jsonl", test_path="t.jsonl").load(0)
    assert (len(splits["train"]), len(splits["test"])) == (50, 7)


def test_hub_id_from_the_cache_and_offline_error(tmp_path, jsonl, monkeypatch):
    """A hub dataset prepared in the datasets cache loads offline; one that is not there is one
    line naming the id and the cache folder."""
    cache = tmp_path / "hf-datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    message = refused_columns(tmp_path, path="someorg/demo")
    assert message == (f"hub dataset 'someorg/demo' is not in the datasets cache ({cache}) and the hub cannot be reached "
                       f"(offline); download it once online, or set HF_DATASETS_CACHE to where it is")
    # the layout datasets leaves after load_dataset("someorg/demo") online: prepared Arrow files
    datasets.disable_progress_bars()
    datasets.load_dataset("json", data_files={"train": str(jsonl), "test": str(jsonl)}, cache_dir=str(tmp_path / "build"))
    built = next(p for p in glob.glob(str(tmp_path / "build" / "json" / "*" / "*" / "*")) if os.path.isdir(p))
    target = cache / "someorg___demo" / "default" / "0.0.0" / os.path.basename(built)
    shutil.copytree(built, target)
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("json-", "demo-")))
    loader = make(tmp_path, path="someorg/demo", columns={"text": "sentence"})
    assert loader.columns() == ["text", "label", "n"]
    splits = loader.load(0)
    assert (len(splits["train"]), len(splits["test"])) == (50, 50)  # the hub's own test split


def refused_columns(tmp_path: Path, **options) -> str:
    with pytest.raises(DataError) as info:
        make(tmp_path, **options).columns()
    return str(info.value)


# --------------------------------------------------------------------------------------------
# select and filter
# --------------------------------------------------------------------------------------------


def test_select_then_filter(tmp_path, jsonl):
    loader = make(tmp_path, path="d.jsonl", select="0:20, 40:", filter="len(sentence) > 8 and label != 'spam'", test_size=0.25)
    splits = loader.load(0)
    kept = sorted(r["n"] for r in splits["train"] + splits["test"])
    assert kept == [i for i in [*range(20), *range(40, 50)] if len(f"row {i} " + "x" * (i % 7)) > 8 and i % 5]
    assert make(tmp_path, path="d.jsonl", select="45:1000").load(0)["train"]  # past the end stops at the last row


@pytest.mark.parametrize("expression, rows", [
    ("n % 2 == 0 and n < 10", [0, 2, 4, 6, 8]),
    ("label.upper() == 'SPAM' and not n > 20", [0, 5, 10, 15, 20]),
    ("'row 1' in sentence and sentence.endswith('x') and n in (1, 11, 12)", [1, 11, 12]),
    ("n * 2 + 1 >= 95 or sentence.strip().startswith('row 3')", [3, *range(30, 40), 47, 48, 49]),
    ("n is not None and 3 <= n < 6", [3, 4, 5]),
])
def test_filter_expressions(expression, rows):
    records = [{"sentence": f"row {i} " + "x" * (i % 7), "label": "spam" if i % 5 == 0 else "ham", "n": i} for i in range(50)]
    assert [r["n"] for r in records if RowFilter(expression)(r)] == rows


@pytest.mark.parametrize("expression, says", [
    ("__import__('os').system('true')", "a call of system() is not allowed"),
    ("__import__('os')", "a call of __import__() is not allowed"),
    ("open('/etc/passwd')", "a call of open() is not allowed"),
    ("text.__class__", "the attribute .__class__ is not allowed"),
    ("text[0] == 'a'", "a subscript ([...]) is not allowed"),
    ("(lambda: 1)()", "is not allowed"),
    ("2 ** 100000", "** (power) is not allowed"),
    ("[x for x in text]", "ListComp is not allowed"),
    ("(n := 3)", "an assignment (:=) is not allowed"),
    ("f'{text}'", "JoinedStr is not allowed"),
    ("text if n else label", "a conditional (x if c else y) is not allowed"),
    ("len(text, 2)", "a call of len() is not allowed"),
    ("text.lower(1)", "a call of lower() is not allowed"),
    ("text ==", "not a valid expression"),
    ("", "the expression is empty"),
    ("-(" * 100 + "n" + ")" * 100, "nested more than 40 levels deep"),
    ("(" * 500 + "n" + ")" * 500, "not a valid expression (too many nested parentheses"),
    ("not " * 100 + "n", "nested more than"),
    ("n + " * 1000 + "n", "longer than 2000 characters"),
])
def test_bad_filters_are_refused_at_validation_with_the_field(tmp_path, jsonl, tiny_llama, expression, says):
    recipe = hf_recipe(tmp_path, tiny_llama, {"path": "d.jsonl", "filter": expression})
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    [line] = [p for p in info.value.problems if p.startswith("data.options.filter:")]
    assert says in line and "\n" not in line


@pytest.mark.parametrize("select, says", [("5:2", "selects no rows"), ("a:b", "whole numbers"), ("-1:3", "cannot be negative"),
                                          ("7", "not a row range"), ("0:5,", "not a row range")])
def test_bad_select(tmp_path, jsonl, select, says):
    assert says in refused(tmp_path, path="d.jsonl", select=select)


def test_a_filter_that_fails_on_a_row_is_one_line(tmp_path, jsonl):
    with pytest.raises(DataError) as info:
        make(tmp_path, path="d.jsonl", filter="sentence + n == 'x'").load(0)
    message = str(info.value)
    assert message.startswith("data.options.filter: cannot evaluate \"sentence + n == 'x'\" on the row {'sentence': 'row 0 '")
    assert "arithmetic needs numbers, got str and int" in message and "\n" not in message


def test_unknown_columns_in_columns_and_filter_fail_validation(tmp_path, jsonl, tiny_llama):
    for options, wanted in [
        ({"columns": {"question": "nope"}}, f"data.options: columns: 'nope' not in {tmp_path / 'd.jsonl'} (columns: sentence, label, n)"),
        ({"filter": "len(txt) > 3"}, f"data.options: filter: 'txt' not a column of {tmp_path / 'd.jsonl'} (columns: sentence, "
                                      f"label, n); the filter names the data's own columns"),
    ]:
        with pytest.raises(RecipeError) as info:
            load_recipe(hf_recipe(tmp_path, tiny_llama, {"path": "d.jsonl", **options}))
        assert wanted in info.value.problems


# --------------------------------------------------------------------------------------------
# Hostile and mistaken input
# --------------------------------------------------------------------------------------------


def test_missing_file_fifo_plain_folder_and_unknown_format(tmp_path, jsonl):
    assert f"file not found: {tmp_path / 'nope.jsonl'}" in refused(tmp_path, path="nope.jsonl")
    os.mkfifo(tmp_path / "pipe.jsonl")
    assert f"{tmp_path / 'pipe.jsonl'} is a FIFO (named pipe), not a regular file or a folder" in refused(tmp_path, path="pipe.jsonl")
    assert "is a FIFO (named pipe), not a regular file" in refused(tmp_path, path="d.jsonl", test_path="pipe.jsonl")
    (tmp_path / "plain").mkdir()
    assert "is a folder but not one written by save_to_disk" in refused(tmp_path, path="plain")
    (tmp_path / "d.txt").write_text("hello\n")
    assert refused_columns(tmp_path, path="d.txt").endswith("cannot tell the format from the extension; set data.options.format "
                                                            "(arrow, csv, json, parquet, tsv)")


def test_a_fifo_swapped_in_after_validation_is_never_read(tmp_path, jsonl):
    loader = make(tmp_path, path="d.jsonl")
    jsonl.unlink()
    os.mkfifo(jsonl)  # opening it for reading would block forever
    with pytest.raises(DataError, match="is a FIFO"):
        loader.load(0)


def test_a_fifo_inside_a_save_to_disk_folder(tmp_path, saved):
    single, _ = saved
    (single / "state.json").unlink()
    os.mkfifo(single / "state.json")
    with pytest.raises(DataError, match=r"state.json is a FIFO \(named pipe\), not a regular file"):
        make(tmp_path, path="single").load(0)


def test_unknown_split_names_the_splits(tmp_path, saved, tiny_llama):
    with pytest.raises(RecipeError) as info:
        load_recipe(hf_recipe(tmp_path, tiny_llama, {"path": "dict", "test_split": "dev"}))
    assert f"data.options: test_split: no split 'dev' in {tmp_path / 'dict'} (splits: train, validation)" in info.value.problems
    assert refused_columns(tmp_path, path="d.jsonl", split="validation") == (
        f"split: no split 'validation' in {tmp_path / 'd.jsonl'} (splits: train)")


def test_a_broken_jsonl_line_is_one_line(tmp_path, jsonl):
    with open(jsonl, "a", encoding="utf-8") as fh:
        fh.write("{not json\n")
    with pytest.raises(DataError) as info:
        make(tmp_path, path="d.jsonl").load(0)
    assert str(info.value).startswith(f"{jsonl}: cannot read with datasets (") and "\n" not in str(info.value)


def test_empty_after_filter(tmp_path, jsonl):
    with pytest.raises(DataError, match=r"0 row\(s\) cannot be split into train and test \(after select/filter\)"):
        make(tmp_path, path="d.jsonl", filter="n > 1000").load(0)


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


def test_streaming_holds_out_the_first_rows_and_streams_the_rest(tmp_path, jsonl):
    loader = make(tmp_path, path="d.jsonl", streaming=True, test_rows=5, filter="label == 'ham'", columns={"text": "sentence"})
    assert loader.streams
    splits = loader.load(0)
    assert isinstance(splits["train"], HfStream) and isinstance(splits["train"], RowStream)
    ham = [i for i in range(50) if i % 5]
    assert [r["n"] for r in splits["test"]] == ham[:5]
    assert [r["n"] for r in splits["train"]] == ham[5:] == [r["n"] for r in splits["train"]]  # every pass the same
    assert set(next(iter(splits["train"]))) == {"text", "label", "n"}
    one_range = make(tmp_path, path="d.jsonl", streaming=True, test_rows=2, select="10:20").load(0)
    assert [r["n"] for r in one_range["test"]] + [r["n"] for r in one_range["train"]] == list(range(10, 20))
    ranges = make(tmp_path, path="d.jsonl", streaming=True, test_rows=2, select="0:3, 45:").load(0)
    assert [r["n"] for r in ranges["test"]] + [r["n"] for r in ranges["train"]] == [0, 1, 2, 45, 46, 47, 48, 49]


def test_streaming_a_named_test_split_and_a_saved_folder(tmp_path, saved):
    splits = make(tmp_path, path="dict", test_split="validation", streaming=True, test_rows=3).load(0)
    assert [r["n"] for r in splits["test"]] == [0, 1, 2]
    assert [r["n"] for r in splits["train"]] == list(range(50))


def test_shuffle_buffer_is_seeded_a_permutation_and_bounded():
    rows = list(range(1000))
    first = list(shuffled(iter(rows), 64, seed=1, epoch=0))
    assert sorted(first) == rows and first != rows
    assert first == list(shuffled(iter(rows), 64, seed=1, epoch=0))
    assert first != list(shuffled(iter(rows), 64, seed=1, epoch=1)) != list(shuffled(iter(rows), 64, seed=2, epoch=0))
    consumed = []

    def source():
        for i in rows:
            consumed.append(i)
            yield i

    stream = shuffled(source(), 64, seed=0, epoch=0)
    next(stream)
    assert len(consumed) == 65  # one row yielded after the buffer filled: never more held than the buffer


# --------------------------------------------------------------------------------------------
# Training on tiny_llama
# --------------------------------------------------------------------------------------------


def hf_recipe(tmp_path: Path, tiny_llama: Path, options: dict, **sections) -> Path:
    raw = {
        "name": "tiny-hf",
        "base_model": str(tiny_llama),
        "task": {"type": "causal-lm", "prompt": "question : {question} answer :", "response": " {answer}"},
        "data": {"loader": "hf", "options": options},
        "method": {"name": "lora", "options": {"r": 4, "alpha": 8, "target_modules": "all-linear"}},
        "evaluators": ["loss"],
        "training": {"max_steps": 8, "batch_size": 8, "learning_rate": 2e-2, "seed": 0, "max_length": 48, "device": "cpu"},
        "output": {"dir": str(tmp_path / "adapter")},
    }
    raw.update(sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def sft_folder(tmp_path: Path, tiny_data: Path) -> Path:
    rows = [json.loads(line) for line in (tiny_data / "sft.jsonl").read_text().splitlines()]
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict(train=ds.select(range(192)), test=ds.select(range(192, 256))).save_to_disk(str(tmp_path / "sft"))
    return tmp_path / "sft"


def test_a_save_to_disk_folder_trains(tmp_path, tiny_llama, sft_folder):
    result = plugtune.run(hf_recipe(tmp_path, tiny_llama, {"path": "sft"}), show_progress=False)
    assert result.after["loss"] < result.before["loss"]
    training = read_manifest(result.adapter_dir).training
    assert (training["train_rows"], training["test_rows"]) == (192, 64)  # its own test split


def test_a_jsonl_file_trains_with_a_filter(tmp_path, tiny_llama, tiny_data):
    shutil.copy(tiny_data / "sft.jsonl", tmp_path / "sft.jsonl")
    options = {"path": "sft.jsonl", "test_size": 0.25, "filter": "'sky' in question or 'sea' in question"}
    result = plugtune.run(hf_recipe(tmp_path, tiny_llama, options), show_progress=False)
    assert result.after["loss"] < result.before["loss"]
    rows = [json.loads(line) for line in (tiny_data / "sft.jsonl").read_text().splitlines()]
    kept = sum("sky" in r["question"] or "sea" in r["question"] for r in rows)
    training = read_manifest(result.adapter_dir).training
    assert training["train_rows"] + training["test_rows"] == kept < len(rows)


def test_streaming_needs_max_steps_and_refuses_augmentation(tmp_path, tiny_llama, tiny_data):
    shutil.copy(tiny_data / "sft.jsonl", tmp_path / "sft.jsonl")
    training = {"batch_size": 8, "epochs": 1, "device": "cpu"}
    recipe = hf_recipe(tmp_path, tiny_llama, {"path": "sft.jsonl", "streaming": True}, training=training,
                       regularizers=[{"name": "word_dropout", "options": {"p": 0.1}}])
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert ("training.max_steps: the data loader streams the training split, which has no length to count epochs in; "
            "set training.max_steps or training.budget") in info.value.problems
    word_dropout_augments = hasattr(plugtune_regularizer("word_dropout"), "augment_examples")
    assert any(p.startswith("regularizers[0]: word_dropout rewrites") for p in info.value.problems) == word_dropout_augments


def plugtune_regularizer(name: str):
    from plugtune.kernel.registry import get_plugin_system

    return get_plugin_system().get("regularizer", name).obj




def test_a_streamed_file_trains_and_resumes_to_the_same_adapter(tmp_path, tiny_llama, tiny_data):
    """60 rows, 12 held out, batch 8: 6 batches an epoch, so 10 steps cross an epoch; a run
    stopped after its step-4 checkpoint resumes to the uninterrupted run's adapter."""
    rows = [json.loads(line) for line in (tiny_data / "sft.jsonl").read_text().splitlines()][:60]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = {"path": "sft.jsonl", "streaming": True, "test_rows": 12, "shuffle_buffer": 16}
    training = {"max_steps": 10, "batch_size": 8, "learning_rate": 2e-2, "seed": 0, "max_length": 48, "device": "cpu",
                "checkpoint_every": 4}
    (tmp_path / "a").mkdir()
    reference = hf_recipe(tmp_path / "a", tiny_llama, {**options, "path": str(tmp_path / "sft.jsonl")}, training=training)
    result = plugtune.run(reference, show_progress=False)
    assert result.steps == 10 and result.after["loss"] < result.before["loss"]
    training_record = read_manifest(result.adapter_dir).training
    assert training_record["streamed"] and training_record["test_rows"] == 12
    assert training_record["train_rows"] == 48 + 4 * 8  # one pass, then four batches of the second epoch

    (tmp_path / "b").mkdir()
    resumed = hf_recipe(tmp_path / "b", tiny_llama, {**options, "path": str(tmp_path / "sft.jsonl")}, training=training)
    set_plugin_system(build_plugin_system(extra_plugins=[("failing", FailingStepHook(at_step=6))]))
    try:
        with pytest.raises(PluginError):
            plugtune.run(resumed, show_progress=False)
    finally:
        set_plugin_system(None)
    assert (tmp_path / "b" / "adapter" / "checkpoints" / "step-4").is_dir()
    again = plugtune.run(resumed, show_progress=False, resume=True)
    assert again.steps == 10
    want, got = load_file(result.adapter_dir / WEIGHTS_FILE), load_file(again.adapter_dir / WEIGHTS_FILE)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
