"""The ``text`` loader: units, folders, chunking, the seeded split, min_chars, its errors, and
a tiny continued-pre-training run on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import plugtune
from plugtune.artifacts.adapters import read_manifest
from plugtune.kernel.errors import DataError, RecipeError
from plugtune.plugins.loaders.text import TextLoader, TextOptions, chunk
from plugtune.training.recipe import load_recipe

CORPUS = (
    "The first paragraph has one line.\n"
    "\n"
    "The second paragraph\n"
    "spans two lines.\n"
    "\n"
    "\n"
    "   \n"
    "Third.\n"
)


def make_loader(tmp_path: Path, **options) -> TextLoader:
    return TextLoader(TextOptions.model_validate(options, context={"base_dir": tmp_path}))


def texts(split: list[dict]) -> list[str]:
    return [row["text"] for row in split]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------


def test_paragraphs_are_the_default_unit(tmp_path, corpus):
    loader = make_loader(tmp_path, path="corpus.txt")
    assert loader.units(corpus) == [
        "The first paragraph has one line.",
        "The second paragraph\nspans two lines.",  # inner line breaks are kept
        "Third.",
    ]
    assert loader.columns() == ["text"]


def test_lines(tmp_path, corpus):
    loader = make_loader(tmp_path, path="corpus.txt", unit="line")
    assert loader.units(corpus) == [
        "The first paragraph has one line.", "The second paragraph", "spans two lines.", "Third.",
    ]


def test_whole_file(tmp_path, corpus):
    loader = make_loader(tmp_path, path="corpus.txt", unit="file")
    assert loader.units(corpus) == [CORPUS.strip()]


def test_windows_newlines_and_bom(tmp_path):
    path = tmp_path / "dos.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\r\n\r\nthree\r\n")
    assert make_loader(tmp_path, path="dos.txt").units(path) == ["one\ntwo", "three"]


def test_folder_reads_every_txt_file_in_name_order(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee one\n\nbee two\n", encoding="utf-8")
    (folder / "a.txt").write_text("ay\n", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("sea\n", encoding="utf-8")
    (folder / "empty.txt").write_text("", encoding="utf-8")  # skipped, not an error
    (folder / "notes.md").write_text("not read\n", encoding="utf-8")
    (folder / ".hidden.txt").write_text("not read either\n", encoding="utf-8")
    loader = make_loader(tmp_path, path="docs", unit="file")
    assert loader.units(folder) == ["ay", "bee one\n\nbee two", "sea"]
    assert make_loader(tmp_path, path="docs").units(folder) == ["ay", "bee one", "bee two", "sea"]
    assert loader.columns() == ["text"]


def test_column_option_names_the_key(tmp_path, corpus):
    loader = make_loader(tmp_path, path="corpus.txt", column="passage")
    assert loader.columns() == ["passage"]
    splits = loader.load(seed=0)
    assert all(set(row) == {"passage"} for row in splits["train"] + splits["test"])


def test_min_chars_drops_short_units(tmp_path, corpus):
    loader = make_loader(tmp_path, path="corpus.txt", min_chars=10)
    assert loader.units(corpus) == ["The first paragraph has one line.", "The second paragraph\nspans two lines."]
    with pytest.raises(DataError, match=r"none of its 3 paragraphs has at least min_chars=1000"):
        make_loader(tmp_path, path="corpus.txt", min_chars=1000).load(seed=0)


# --------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------


def test_chunk_cuts_at_whitespace_into_balanced_pieces():
    text = " ".join(f"word{i}" for i in range(300))  # 2,089 characters
    pieces = chunk(text, 400)
    assert len(pieces) == 6
    assert all(len(p) <= 400 for p in pieces)
    assert min(len(p) for p in pieces) > 300  # balanced: no short tail
    assert " ".join(pieces) == text  # nothing lost, no word cut
    assert chunk("short text", 400) == ["short text"]


def test_chunk_cuts_a_word_longer_than_the_size():
    pieces = chunk("x" * 250 + " tail", 100)
    assert pieces == ["x" * 100, "x" * 100, "x" * 50 + " tail"]


def test_chunk_keeps_line_breaks_inside_pieces():
    text = "alpha beta\ngamma delta\nepsilon zeta"
    pieces = chunk(text, 12)
    assert all(len(p) <= 12 for p in pieces)
    assert " ".join(p.replace("\n", " ") for p in pieces) == text.replace("\n", " ")


def test_chunk_chars_splits_long_units_in_load(tmp_path):
    long = " ".join(f"token{i}" for i in range(200))
    (tmp_path / "long.txt").write_text(f"{long}\n\nshort one\n\nshort two\n", encoding="utf-8")
    loader = make_loader(tmp_path, path="long.txt", chunk_chars=150, test_path="long.txt")
    train = texts(loader.load(seed=0)["train"])
    assert all(len(t) <= 150 for t in train)
    assert train[-2:] == ["short one", "short two"]
    assert " ".join(train[:-2]) == long


def test_pieces_of_one_unit_stay_on_one_side_of_the_split(tmp_path):
    paragraphs = [" ".join(f"p{p}w{i}" for i in range(60)) for p in range(10)]
    (tmp_path / "paras.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    splits = make_loader(tmp_path, path="paras.txt", chunk_chars=80, test_size=0.2).load(seed=3)
    train_paras = {t.split("w")[0] for t in texts(splits["train"])}
    test_paras = {t.split("w")[0] for t in texts(splits["test"])}
    assert len(test_paras) == 2 and len(train_paras) == 8
    assert not train_paras & test_paras


def test_a_single_unit_is_split_by_its_pieces(tmp_path):
    (tmp_path / "one.txt").write_text(" ".join(f"w{i}" for i in range(400)), encoding="utf-8")
    splits = make_loader(tmp_path, path="one.txt", unit="file", chunk_chars=100, test_size=0.25).load(seed=0)
    assert len(splits["train"]) > len(splits["test"]) >= 1
    with pytest.raises(DataError, match=r"1 file cannot be split into train and test; .*chunk_chars"):
        make_loader(tmp_path, path="one.txt", unit="file").load(seed=0)


# --------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------


@pytest.fixture
def lines_file(tmp_path: Path) -> Path:
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line number {i}\n" for i in range(50)), encoding="utf-8")
    return path


def test_split_is_seeded_deterministic_and_complete(tmp_path, lines_file):
    loader = make_loader(tmp_path, path="lines.txt", unit="line", test_size=0.2)
    first, again, other = loader.load(seed=0), loader.load(seed=0), loader.load(seed=1)
    assert first == again
    assert texts(first["test"]) != texts(other["test"])
    assert len(first["train"]) == 40 and len(first["test"]) == 10
    everything = texts(first["train"]) + texts(first["test"])
    assert sorted(everything) == sorted(f"line number {i}" for i in range(50))
    # each split keeps the file's order
    numbers = [int(t.rsplit(" ", 1)[1]) for t in texts(first["train"])]
    assert numbers == sorted(numbers)


def test_default_test_size_is_a_tenth(tmp_path, lines_file):
    splits = make_loader(tmp_path, path="lines.txt", unit="line").load(seed=0)
    assert (len(splits["train"]), len(splits["test"])) == (45, 5)


def test_test_path_is_used_instead_of_a_split(tmp_path, lines_file, corpus):
    splits = make_loader(tmp_path, path="lines.txt", unit="line", test_path="corpus.txt").load(seed=0)
    assert len(splits["train"]) == 50
    assert texts(splits["test"]) == ["The first paragraph has one line.", "The second paragraph", "spans two lines.", "Third."]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def text_recipe(tmp_path: Path, tiny_llama: Path, **options) -> Path:
    raw = {
        "name": "text-errors",
        "base_model": str(tiny_llama),
        "task": {"type": "causal-lm", "text": "{text}"},
        "data": {"loader": "text", "options": options},
        "method": {"name": "lora", "options": {"r": 4, "target_modules": "all-linear"}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_missing_file_is_a_recipe_error_at_validation(tmp_path, tiny_llama):
    with pytest.raises(RecipeError) as info:
        load_recipe(text_recipe(tmp_path, tiny_llama, path="missing.txt"))
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("data.options.path: file not found")


def test_unknown_option_and_bad_unit_are_recipe_errors(tmp_path, tiny_llama, corpus):
    with pytest.raises(RecipeError) as info:
        load_recipe(text_recipe(tmp_path, tiny_llama, path="corpus.txt", unit="sentence", chunk_size=10))
    problems = "\n".join(info.value.problems)
    assert "data.options.unit:" in problems and "'line', 'paragraph' or 'file'" in problems
    assert "data.options.chunk_size: unknown key" in problems


def test_empty_file(tmp_path, tiny_llama):
    (tmp_path / "empty.txt").write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(RecipeError) as info:  # caught at validation
        load_recipe(text_recipe(tmp_path, tiny_llama, path="empty.txt"))
    assert info.value.problems == [f"data.options: {tmp_path / 'empty.txt'}: the file is empty"]
    with pytest.raises(DataError, match=r"empty\.txt: the file is empty$"):
        make_loader(tmp_path, path="empty.txt").load(seed=0)


def test_folder_without_text(tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match=r"no \.txt files in this folder"):
        make_loader(tmp_path, path="none").columns()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("", encoding="utf-8")
    for call in (lambda loader: loader.columns(), lambda loader: loader.load(seed=0)):
        with pytest.raises(DataError, match=r"blank: all \.txt files in this folder are empty$"):
            call(make_loader(tmp_path, path="blank"))


def test_non_utf8_is_one_line(tmp_path, tiny_llama):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n\nsecond paragraph\n".encode("latin-1"))
    with pytest.raises(RecipeError) as info:  # caught at validation
        load_recipe(text_recipe(tmp_path, tiny_llama, path="latin1.txt"))
    assert info.value.problems == [f"data.options: {tmp_path / 'latin1.txt'}: not UTF-8 text (byte 3); re-save it as UTF-8"]
    with pytest.raises(DataError) as err:
        make_loader(tmp_path, path="latin1.txt").load(seed=0)
    assert "\n" not in str(err.value) and "not UTF-8 text (byte 3)" in str(err.value)


def test_non_utf8_past_the_validation_probe_fails_at_load(tmp_path):
    path = tmp_path / "late.txt"
    path.write_bytes(b"fine text\n" * 10_000 + b"\xff\n")
    loader = make_loader(tmp_path, path="late.txt")
    assert loader.columns() == ["text"]  # validation reads only the start
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 100000\)"):
        loader.load(seed=0)


def test_validation_checks_the_template_column(tmp_path, tiny_llama, corpus):
    path = text_recipe(tmp_path, tiny_llama, path="corpus.txt", column="passage")
    with pytest.raises(RecipeError, match=r"task\.text: column 'text' is not in the data \(columns: passage\)"):
        load_recipe(path)


# --------------------------------------------------------------------------------------------
# Continued pre-training on tiny_llama
# --------------------------------------------------------------------------------------------


def test_continued_pretraining_lowers_perplexity(make_recipe, tmp_path):
    # Words from the tiny model's vocabulary, in a few fixed sentences the model can memorise.
    sentences = [
        "the film was great and the cast was wonderful .",
        "the plot is dull and the ending is weak .",
        "what is the colour of the sky ? blue .",
        "the story was very moving and really fun .",
        "the acting is quite bland and the movie is tedious .",
    ]
    paragraphs = [" ".join(sentences[(i + j) % 5] for j in range(2)) for i in range(40)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    recipe = make_recipe(
        name="tiny-pretrain",
        task={"type": "causal-lm", "text": "{text}"},
        data={"loader": "text", "options": {"path": str(corpus), "test_size": 0.2}},
        evaluators=["loss", "perplexity"],
        training={"max_steps": 12, "batch_size": 8, "learning_rate": 2e-2, "seed": 0, "max_length": 48, "device": "cpu"},
    )
    result = plugtune.run(recipe, show_progress=False)
    assert result.after["perplexity"] < 0.85 * result.before["perplexity"]  # 73.7 -> 58.5
    assert result.after["loss"] < result.before["loss"]
    training = read_manifest(result.adapter_dir).training
    assert (training["train_rows"], training["test_rows"]) == (32, 8)
