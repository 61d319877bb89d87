"""Hostile data and planted caches (issue 13): every case drives the real command
(``plugtune.cli.main``), asserts the exact line, the exit code, no traceback, and that
nothing was written: every file under the test's folder is byte-identical afterwards, no
output folder appears, and no tokenized-cache entry exists for a refused split.

Classes: a tokenized-cache entry that is damaged or planted (a miss with one note, never
code run, replaced by a good entry); data paths that are not regular files (refused by name
at validation, never opened); CSV that does not parse strictly (an unclosed quote names the
line where it opened; wrong field counts name their line); JSON Lines rows that are not
objects or nest too deeply; lines and files past their limits (the line names the option).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import socket
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from plugtune.cli import main
from plugtune.testing import recipe_dict
from test_hostile_input import snapshot

# -- helpers ----------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, list[str]]:
    """Run the command in-process; returns the exit code and every stderr line, after
    checking there is no traceback."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err.splitlines()


def refused(capsys, root: Path, *args: object) -> tuple[int, list[str]]:
    """``run_cli`` plus: non-zero, nothing under ``root`` written, changed or removed, no
    output folder; returns the exit code and the ``error:`` lines."""
    before = snapshot(root)
    code, lines = run_cli(capsys, *args)
    assert code != 0, lines
    assert snapshot(root) == before
    assert not (root / "out").exists()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors, lines
    return code, errors


@pytest.fixture
def home(tmp_path_factory, monkeypatch) -> Path:
    """``$PLUGTUNE_HOME`` outside the folder that must stay unchanged."""
    path = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("PLUGTUNE_HOME", str(path))
    return path


def entries(home: Path) -> list[Path]:
    folder = home / "tokenized"
    return sorted(p for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def deadline() -> Iterator[None]:
    """Fail instead of hanging when something opens a FIFO for reading."""
    def expired(*_):
        raise TimeoutError("blocked: a FIFO or device was opened")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def write_recipe(tmp_path: Path, tiny_model: Path, tiny_data: Path, options: dict, *, classification: bool = True,
                 loader: str = "table", **training) -> Path:
    raw = recipe_dict(tiny_model, tiny_data, classification=classification)
    if loader == "text":
        raw["task"] = {"type": "causal-lm", "text": "{text}"}
        raw["evaluators"] = ["loss"]
    raw["data"] = {"loader": loader, "options": options}
    raw["training"].update(training)
    raw["output"] = {"dir": str(tmp_path / "out")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


GOOD_TRAIN = "text,label\n" + "".join(f"the film was {'great' if i % 2 else 'awful'} {i},{'positive' if i % 2 else 'negative'}\n"
                                      for i in range(10))
GOOD_TEST = "text,label\nthe film,positive\nawful film,negative\n"


# -- planted or damaged tokenized-cache entries -----------------------------------------------

LONG = " ".join(["the film was great"] * 50)  # longer than the tiny BERT's 128 positions
REFUSAL = ("error: test split: 2 row(s) are longer than 128 tokens (the longest: 202); "
           "raise training.max_length, or set training.overlong to truncate or drop")


def _cached_recipe(tmp_path: Path, tiny_bert: Path, tiny_data: Path) -> Path:
    """Train rows that fit, test rows that do not (``overlong: refuse``): a run caches the
    train split (rows) and the test split (the refusal), then stops before training."""
    (tmp_path / "train.csv").write_text(GOOD_TRAIN)
    (tmp_path / "test.csv").write_text(f"text,label\n{LONG},positive\n{LONG},negative\n")
    return write_recipe(tmp_path, tiny_bert, tiny_data, {"path": "train.csv", "test_path": "test.csv"},
                        max_length=128, overlong="refuse")


def _rebuilt(entry: Path, header: Callable[[dict], dict] = lambda h: h,
             tensors: Callable[[dict], dict] = lambda t: t, raw: str | None = None) -> bytes:
    """The entry's bytes with its header and tensors passed through the given edits (``raw``:
    the header's text instead of any JSON)."""
    from safetensors import safe_open
    from safetensors.numpy import save

    with safe_open(str(entry), framework="np") as fh:
        meta, arrays = json.loads(fh.metadata()["plugtune"]), {k: fh.get_tensor(k) for k in fh.keys()}
    return save(tensors(arrays), metadata={"plugtune": raw if raw is not None else json.dumps(header(meta))})


class _Exploit:
    """Unpickling this creates the marker file: code ran."""

    marker = ""

    def __reduce__(self):
        return open, (self.marker, "w")


def _pickle(entry: Path, marker: Path) -> bytes:
    _Exploit.marker = str(marker)
    return pickle.dumps(_Exploit())


def _torch_save(entry: Path, marker: Path) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"input_ids": torch.arange(4)}, buffer)
    return buffer.getvalue()


# name -> (the bytes planted, the reason the note gives)
BYTE_PAYLOADS = {
    "truncated": (lambda e, m: e.read_bytes()[: len(e.read_bytes()) // 2],
                  "Error while deserializing header: incomplete metadata, file not fully covered"),
    "empty": (lambda e, m: b"", "Error while deserializing header: header too small"),
    "pickle-that-runs-code": (_pickle, "Error while deserializing header: header too large"),
    "torch-save-zip": (_torch_save, "Error while deserializing header: header too large"),
    "random-bytes": (lambda e, m: random.Random(0).randbytes(4096), "Error while deserializing header: header too large"),
    "header-claims-huge-size": (lambda e, m: struct.pack("<Q", 1 << 62) + b"{}", "Error while deserializing header: header too large"),
    "older-version": (lambda e, m: _rebuilt(e, header=lambda h: {**h, "version": 2}), "version 2, not 3"),
    "no-version": (lambda e, m: _rebuilt(e, header=lambda h: {k: v for k, v in h.items() if k != "version"}), "version None, not 3"),
    "another-key": (lambda e, m: _rebuilt(e, header=lambda h: {**h, "key": "0" * 32}), "made for another key"),
    "not-our-format": (lambda e, m: _rebuilt(e, header=lambda h: {**h, "format": "pt"}), "not a plugtune tokenized entry"),
    "header-not-json": (lambda e, m: _rebuilt(e, raw='{"format": "plugtune-tokenized", '), "no plugtune header"),
    "header-nested-100k-deep": (lambda e, m: _rebuilt(e, raw="[" * 100_000 + "]" * 100_000), "no plugtune header"),
    "header-a-list": (lambda e, m: _rebuilt(e, raw="[]"), "not a plugtune tokenized entry"),
    "negative-count": (lambda e, m: _rebuilt(e, header=lambda h: {**h, "cut": -1}), "a malformed header"),
    "columns-not-a-list": (lambda e, m: _rebuilt(e, header=lambda h: {**h, "columns": "input_ids"}), "a malformed header"),
    "float-ids": (lambda e, m: _rebuilt(e, tensors=lambda t: {**t, "input_ids": t["input_ids"].astype("float32")}),
                  "wrong dtypes or shapes"),
    "2d-ids": (lambda e, m: _rebuilt(e, tensors=lambda t: {**t, "input_ids": t["input_ids"].reshape(1, -1)}),
               "wrong dtypes or shapes"),
    "offsets-past-the-ids": (lambda e, m: _rebuilt(e, tensors=lambda t: {**t, "input_ids.offsets": t["input_ids.offsets"] * 2}),
                             "input_ids: offsets that do not fit its ids"),
    "offsets-decreasing": (lambda e, m: _rebuilt(e, tensors=lambda t: {**t, "labels.offsets": t["labels.offsets"][::-1].copy()}),
                           "labels: offsets that do not fit its ids"),
    "example-index-out-of-range": (lambda e, m: _rebuilt(e, tensors=lambda t: {**t, "example_index": t["example_index"] + 1000}),
                                   "example indexes that do not fit the split"),
    "example-index-negative": (lambda e, m: _rebuilt(e, tensors=lambda t: {**t, "example_index": t["example_index"] - 1000}),
                               "example indexes that do not fit the split"),
    "a-tensor-missing": (lambda e, m: _rebuilt(e, tensors=lambda t: {k: v for k, v in t.items() if k != "labels"}),
                         "unexpected tensors"),
    "a-tensor-too-many": (lambda e, m: _rebuilt(e, tensors=lambda t: {**t, "extra": t["labels"]}), "unexpected tensors"),
}


def _plant_fifo(entry: Path, marker: Path) -> None:
    entry.unlink()
    os.mkfifo(entry)


def _plant_device_link(entry: Path, marker: Path) -> None:
    entry.unlink()
    entry.symlink_to("/dev/zero")


def _plant_link_to_a_victim(entry: Path, marker: Path) -> None:
    """A link to a file outside the cache: the link is replaced, never written through."""
    entry.unlink()
    marker.write_bytes(b"victim")
    entry.symlink_to(marker)


PATH_PAYLOADS = {
    "fifo": (_plant_fifo, "not a regular file"),
    "link-to-dev-zero": (_plant_device_link, "not a regular file"),
    "link-to-a-file-outside": (_plant_link_to_a_victim, "Error while deserializing header: header too small"),
}


@pytest.mark.parametrize("payload", [*BYTE_PAYLOADS, *PATH_PAYLOADS])
def test_cache_entry_damaged_or_planted_is_a_miss_with_one_note(payload, tmp_path, tmp_path_factory, home, tiny_bert,
                                                                tiny_data, capsys, monkeypatch, deadline):
    """Damage the cached train split in one way; the next run tokenizes it again (the
    encoder is called for every train row), prints one note, refuses exactly as before, and
    leaves a good entry in its place (the run after that tokenizes nothing). No pickle runs."""
    from plugtune.plugins.tasks.sequence_classification import SequenceClassification

    encodes = []
    real = SequenceClassification.encode
    monkeypatch.setattr(SequenceClassification, "encode", lambda *a, **k: encodes.append(1) or real(*a, **k))
    recipe = _cached_recipe(tmp_path, tiny_bert, tiny_data)
    assert refused(capsys, tmp_path, "run", recipe, "--quiet") == (3, [REFUSAL])
    first = len(encodes)
    train_entry = next(p for p in entries(home) if json.loads(_header_text(p))["error"] is None)
    good = train_entry.read_bytes()
    marker = tmp_path_factory.mktemp("outside") / "marker"
    if payload in BYTE_PAYLOADS:
        make, reason = BYTE_PAYLOADS[payload]
        planted = make(train_entry, marker)
        train_entry.write_bytes(planted)
        reason = reason.replace("{n}", str(len(planted) - 8))
    else:
        make, reason = PATH_PAYLOADS[payload]
        make(train_entry, marker)
    encodes.clear()
    before = snapshot(tmp_path)
    code, lines = run_cli(capsys, "run", recipe, "--quiet")
    assert (code, snapshot(tmp_path)) == (3, before)
    assert lines == [f"tokenized cache entry {train_entry.name} unreadable ({reason}); tokenizing again", REFUSAL]
    assert 0 < len(encodes) < first  # the train rows again, the test split's refusal from the cache
    assert not marker.exists() or marker.read_bytes() == b"victim"  # no code ran, nothing written through a link
    assert train_entry.is_file() and not train_entry.is_symlink() and train_entry.read_bytes() == good
    assert sorted(p.suffix for p in entries(home)) == [".safetensors", ".safetensors"]  # no temporary file left
    encodes.clear()
    assert run_cli(capsys, "run", recipe, "--quiet") == (3, [REFUSAL]) and encodes == []


def _header_text(entry: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(entry), framework="np") as fh:
        return fh.metadata()["plugtune"]


def test_cache_entry_path_taken_by_a_folder_runs_uncached_with_a_note(tmp_path, home, tiny_bert, tiny_data, capsys):
    """A folder where the entry belongs cannot be replaced: each run notes it, tokenizes,
    and goes on; the folder and what it holds are left alone."""
    recipe = _cached_recipe(tmp_path, tiny_bert, tiny_data)
    refused(capsys, tmp_path, "run", recipe, "--quiet")
    train_entry = next(p for p in entries(home) if json.loads(_header_text(p))["error"] is None)
    train_entry.unlink()
    train_entry.mkdir()
    (train_entry / "keep").write_text("mine")
    for _ in range(2):
        code, lines = run_cli(capsys, "run", recipe, "--quiet")
        assert (code, lines) == (3, [f"tokenized cache entry {train_entry.name} unreadable (not a regular file); "
                                     "tokenizing again", REFUSAL])
    assert (train_entry / "keep").read_text() == "mine"
    assert [p.name for p in (home / "tokenized").iterdir() if p.suffix == ".tmp"] == []


def test_cache_never_unpickles_old_entries(tmp_path, home, tiny_bert, tiny_data, capsys):
    """A version-2 cache (pickles named ``KEY.pkl``) is never read: the new entries are
    safetensors files, and a pickle planted under any name in the folder runs nothing."""
    recipe = _cached_recipe(tmp_path, tiny_bert, tiny_data)
    refused(capsys, tmp_path, "run", recipe, "--quiet")
    marker = tmp_path.parent / f"{tmp_path.name}-marker"
    for entry in entries(home):
        entry.with_suffix(".pkl").write_bytes(_pickle(entry, marker))
    assert run_cli(capsys, "run", recipe, "--quiet") == (3, [REFUSAL])
    assert not marker.exists()


# -- data paths that are not regular files ------------------------------------------------------


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "data.csv"
    os.mkfifo(path)
    return path


def _link_to_dev_zero(tmp_path: Path) -> Path:
    path = tmp_path / "data.csv"
    path.symlink_to("/dev/zero")
    return path


def _folder(tmp_path: Path) -> Path:
    path = tmp_path / "data.csv"
    path.mkdir()
    (path / "part-0.csv").write_text(GOOD_TRAIN)
    return path


def _socket(tmp_path: Path) -> Path:
    path = tmp_path / "data.csv"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return path


NOT_REGULAR = {
    "fifo": (_fifo, "a FIFO (named pipe)"),
    "dev-zero": (lambda tmp: Path("/dev/zero"), "a character device"),
    "dev-null": (lambda tmp: Path("/dev/null"), "a character device"),
    "link-to-dev-zero": (_link_to_dev_zero, "a character device"),
    "folder": (_folder, "a folder"),
    "socket": (_socket, "a socket"),
}


@pytest.mark.parametrize("kind", NOT_REGULAR)
@pytest.mark.parametrize("option", ["path", "test_path"])
def test_data_path_that_is_not_a_regular_file_is_refused_by_name(kind, option, tmp_path, home, tiny_bert, tiny_data,
                                                                 capsys, deadline):
    make, what = NOT_REGULAR[kind]
    bad = make(tmp_path)
    (tmp_path / "good.csv").write_text(GOOD_TRAIN)
    options = {"path": "good.csv", "test_path": "good.csv", option: str(bad)}
    recipe = write_recipe(tmp_path, tiny_bert, tiny_data, options)
    for command in ("validate", "run"):
        code, lines = refused(capsys, tmp_path, command, recipe, *(["--quiet"] if command == "run" else []))
        assert (code, lines) == (2, [f"error: {recipe}: data.options.{option}: {bad} is {what}, not a regular file"])
    assert entries(home) == []


@pytest.mark.parametrize("kind", ["fifo", "link-to-dev-zero"])
def test_text_loader_refuses_a_fifo_or_device_among_a_folders_files(kind, tmp_path, home, tiny_llama, tiny_data,
                                                                     capsys, deadline):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("one paragraph.\n\nanother paragraph.\n")
    bad = corpus / "b.txt"
    os.mkfifo(bad) if kind == "fifo" else bad.symlink_to("/dev/zero")
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device"
    recipe = write_recipe(tmp_path, tiny_llama, tiny_data, {"path": "corpus"}, classification=False, loader="text")
    code, lines = refused(capsys, tmp_path, "validate", recipe)
    assert (code, lines) == (2, [f"error: {recipe}: data.options: {bad} is {what}, not a regular file"])


def test_text_loader_refuses_a_fifo_as_its_path(tmp_path, home, tiny_llama, tiny_data, capsys, deadline):
    bad = tmp_path / "corpus.txt"
    os.mkfifo(bad)
    recipe = write_recipe(tmp_path, tiny_llama, tiny_data, {"path": "corpus.txt"}, classification=False, loader="text")
    code, lines = refused(capsys, tmp_path, "validate", recipe)
    assert (code, lines) == (2, [f"error: {recipe}: data.options.path: {bad} is a FIFO (named pipe), "
                                 "not a regular file or a folder"])


def test_a_symlink_to_a_regular_data_file_is_fine(tmp_path, tiny_bert, tiny_data, capsys):
    real = tmp_path / "real.csv"
    real.write_text(GOOD_TRAIN)
    (tmp_path / "data.csv").symlink_to(real)
    recipe = write_recipe(tmp_path, tiny_bert, tiny_data, {"path": "data.csv"})
    assert run_cli(capsys, "validate", recipe)[0] == 0


def test_open_regular_refuses_a_fifo_swapped_in_after_validation(tmp_path, deadline):
    """The descriptor is checked, not the name: a FIFO put in place between validation and
    loading is refused at once instead of blocking the open."""
    from plugtune.kernel.errors import DataError
    from plugtune.plugins.loaders.table import TableLoader, TableOptions

    path = tmp_path / "data.csv"
    path.write_text(GOOD_TRAIN)
    loader = TableLoader(TableOptions.model_validate({"path": str(path)}))
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(DataError) as info:
        loader.load(seed=0)
    assert str(info.value) == f"{path} is a FIFO (named pipe), not a regular file"


# -- strict CSV ---------------------------------------------------------------------------------

ROWS = "".join(f"the film was fine {i},{'positive' if i % 2 else 'negative'}\n" for i in range(20))
ROWS5 = "".join(ROWS.splitlines(keepends=True)[:5])

# name -> (the train file, the line the error names, the error after "line N: ")
CSV_PAYLOADS = {
    "unclosed-quote-mid-file": ("text,label\n" + ROWS5 + 'he said "wow,positive\n"and then,negative\n' + ROWS, 8, "quote"),
    "unclosed-quote-on-the-last-line": ("text,label\n" + ROWS + '"the end,negative\n', 22, "quote"),
    "unclosed-quote-in-the-label": ("text,label\n" + ROWS + 'fine,"positive\n' + ROWS, 22, "quote"),
    "unclosed-after-a-good-multiline-field": ('text,label\n"two\nlines",positive\n' + ROWS + '"open,negative\n', 24, "quote"),
    "unclosed-in-a-record-after-a-closed-multiline-field": ('text,label\n"two\nlines","pos\n' + ROWS, 3, "quote"),
    "text-after-a-closing-quote": ("text,label\n" + ROWS + '"good" film,positive\n', 22,
                                   "not valid csv (',' expected after '\"')"),
    "too-many-fields": ("text,label\n" + ROWS + "a film, truly,positive\n" + ROWS, 22, "fields:3"),
    "too-few-fields": ("text,label\n" + ROWS + "no label here\n" + ROWS, 22, "fields:1"),
    "too-many-fields-in-a-multiline-record": ("text,label\n" + ROWS + '"a\nb",positive,extra\n' + ROWS, 22, "fields:3"),
}


@pytest.mark.parametrize("payload", CSV_PAYLOADS)
def test_csv_that_does_not_parse_strictly_is_refused_with_its_line(payload, tmp_path, home, tiny_bert, tiny_data, capsys):
    text, line, problem = CSV_PAYLOADS[payload]
    data = tmp_path / "train.csv"
    data.write_text(text)
    (tmp_path / "test.csv").write_text(GOOD_TEST)
    recipe = write_recipe(tmp_path, tiny_bert, tiny_data, {"path": "train.csv", "test_path": "test.csv"})
    if problem == "quote":
        expected = (f"error: {data}: line {line}: a quoted field is never closed; close it, "
                    'or double a quote that belongs inside a field ("")')
    elif problem.startswith("fields:"):
        expected = f"error: {data}: line {line} has {problem[7:]} fields, the header has 2 (text, label)"
    else:
        expected = f"error: {data}: line {line}: {problem}"
    assert refused(capsys, tmp_path, "run", recipe, "--quiet") == (3, [expected])
    assert entries(home) == []


def test_csv_unclosed_quote_cannot_swallow_more_than_max_line_bytes(tmp_path, home, tiny_bert, tiny_data, capsys):
    """An unclosed quote early in a big file stops after ``max_line_bytes`` of it, naming the
    line where the quote opened, not the end of the file."""
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + ROWS + 'fine,"positive\n' + ROWS * 200)
    (tmp_path / "test.csv").write_text(GOOD_TEST)
    recipe = write_recipe(tmp_path, tiny_bert, tiny_data, {"path": "train.csv", "test_path": "test.csv",
                                                           "max_line_bytes": 4096})
    code, lines = refused(capsys, tmp_path, "run", recipe, "--quiet")
    assert (code, lines) == (3, [f"error: {data}: line 22: a quoted field is never closed within max_line_bytes "
                                 "(4096 bytes, up to line 161); close it, or raise data.options.max_line_bytes "
                                 "if the field is meant to be this long"])


def test_csv_header_naming_a_column_twice_is_refused(tmp_path, home, tiny_bert, tiny_data, capsys):
    data = tmp_path / "train.csv"
    data.write_text("text,label,text\na film,positive,another film\n")
    recipe = write_recipe(tmp_path, tiny_bert, tiny_data, {"path": "train.csv"})
    code, lines = refused(capsys, tmp_path, "validate", recipe)
    assert (code, lines) == (2, [f"error: {recipe}: data.options: {data}: line 1: column 'text' appears twice in the header"])


def test_csv_quotes_inside_fields_and_multiline_fields_still_load(tmp_path):
    from plugtune.plugins.loaders.table import TableLoader, TableOptions

    path = tmp_path / "ok.csv"
    path.write_text('text,label\nhe said "wow" twice,positive\n"a ""quoted"" word",negative\n"two\nlines",positive\n')
    rows = TableLoader(TableOptions.model_validate({"path": str(path), "test_path": str(path)})).load(0)["train"]
    assert [r["text"] for r in rows] == ['he said "wow" twice', 'a "quoted" word', "two\nlines"]


# -- JSON Lines ---------------------------------------------------------------------------------

JSONL_PAYLOADS = {
    "array": ("[1, 2]", "is not a JSON object (it is an array)"),
    "string": ('"a question"', "is not a JSON object (it is a string)"),
    "number": ("42", "is not a JSON object (it is a number)"),
    "null": ("null", "is not a JSON object (it is null)"),
    "boolean": ("true", "is not a JSON object (it is a boolean)"),
    "nested-100k-deep": ('{"question": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": "x"}',
                         "is nested more than 100 levels deep"),
    "nested-150-deep": ('{"question": "q", "answer": ' + "[" * 150 + "]" * 150 + "}", "is nested more than 100 levels deep"),
    "objects-nested-5k-deep": ('{"question": "q", "answer": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}",
                               "is nested more than 100 levels deep"),
    "5000-digit-integer": ('{"question": "q", "answer": ' + "7" * 5000 + "}",
                           "is not valid JSON (Exceeds the limit (4300 digits) for integer string conversion)"),
    "truncated-object": ('{"question": "q", "answer":', "is not valid JSON (Expecting value)"),
}


@pytest.mark.parametrize("payload", JSONL_PAYLOADS)
def test_jsonl_line_that_is_not_a_flat_enough_object_is_refused_with_its_line(payload, tmp_path, home, tiny_llama,
                                                                               tiny_data, capsys):
    bad, problem = JSONL_PAYLOADS[payload]
    good = [json.dumps({"question": f"what is {i}", "answer": str(i)}) for i in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(good[:7] + [bad] + good[7:]) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(good[:2]) + "\n")
    recipe = write_recipe(tmp_path, tiny_llama, tiny_data, {"path": "train.jsonl", "test_path": "test.jsonl"},
                          classification=False)
    assert refused(capsys, tmp_path, "run", recipe, "--quiet") == (3, [f"error: {data}: line 8 {problem}"])
    assert entries(home) == []


def test_jsonl_first_line_not_an_object_is_refused_at_validation(tmp_path, tiny_llama, tiny_data, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("[" * 50_000 + "\n")
    recipe = write_recipe(tmp_path, tiny_llama, tiny_data, {"path": "train.jsonl"}, classification=False)
    code, lines = refused(capsys, tmp_path, "validate", recipe)
    assert (code, lines) == (2, [f"error: {recipe}: data.options: {data}: line 1 is nested more than 100 levels deep"])


# -- limits on lines and files ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_a_50mb_line_fails_fast_with_bounded_memory(fmt, tmp_path):
    """One 50 MB line stops the load after reading ``max_line_bytes`` (8 MiB) of it: the
    peak memory stays near the limit, not the line."""
    from plugtune.kernel.errors import DataError
    from plugtune.plugins.loaders.table import MAX_LINE_BYTES, TableLoader, TableOptions

    path = tmp_path / f"big.{fmt}"
    sep = "\t" if fmt == "tsv" else ","
    with open(path, "w") as fh:
        if fmt == "jsonl":
            fh.write('{"text": "fine", "label": "positive"}\n{"text": "' + "x" * 50_000_000 + '", "label": "negative"}\n')
        else:
            fh.write(f"text{sep}label\nfine{sep}positive\n" + "x" * 50_000_000 + f"{sep}negative\n")
    loader = TableLoader(TableOptions.model_validate({"path": str(path), "test_path": str(path)}))
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            loader.load(seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    line = 2 if fmt == "jsonl" else 3
    assert str(info.value) == (f"{path}: line {line} is longer than max_line_bytes ({MAX_LINE_BYTES} bytes); "
                               "raise data.options.max_line_bytes if the data is meant to be this way")
    assert peak < 4 * MAX_LINE_BYTES, peak


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_line_over_max_line_bytes_is_refused_at_validation_and_passes_when_raised(fmt, tmp_path, home, tiny_bert,
                                                                                   tiny_data, capsys):
    data = tmp_path / f"train.{fmt}"
    rows = [("the film was fine " * 30, "positive"), ("short", "negative")] * 4
    if fmt == "csv":
        data.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    else:
        data.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    (tmp_path / "test.csv").write_text(GOOD_TEST)
    options = {"path": data.name, "test_path": "test.csv", "max_line_bytes": 256}
    recipe = write_recipe(tmp_path, tiny_bert, tiny_data, options)
    code, lines = refused(capsys, tmp_path, "run", recipe, "--quiet")  # validation reads the first 64 KB
    line = 2 if fmt == "csv" else 1
    assert (code, lines) == (2, [f"error: {recipe}: data.options: {data}: line {line} is longer than max_line_bytes (256 bytes); "
                                 "raise data.options.max_line_bytes if the data is meant to be this way"])
    write_recipe(tmp_path, tiny_bert, tiny_data, {**options, "max_line_bytes": 4096})
    assert run_cli(capsys, "validate", recipe)[0] == 0


@pytest.mark.parametrize("loader", ["table", "text"])
def test_a_file_over_max_file_bytes_is_refused_at_validation(loader, tmp_path, home, tiny_bert, tiny_llama, tiny_data,
                                                              capsys):
    if loader == "table":
        data = tmp_path / "train.csv"
        data.write_text(GOOD_TRAIN)
        recipe = write_recipe(tmp_path, tiny_bert, tiny_data, {"path": "train.csv", "max_file_bytes": 100})
    else:
        data = tmp_path / "corpus.txt"
        data.write_text("a paragraph of text.\n\n" * 20)
        recipe = write_recipe(tmp_path, tiny_llama, tiny_data, {"path": "corpus.txt", "max_file_bytes": 100},
                              classification=False, loader="text")
    code, lines = refused(capsys, tmp_path, "validate", recipe)
    assert (code, lines) == (2, [f"error: {recipe}: data.options: {data}: larger than max_file_bytes (100 bytes); "
                                 "raise data.options.max_file_bytes to read it"])


def test_text_loader_reads_no_more_than_max_file_bytes(tmp_path):
    """A file that grows past the limit after validation is still cut off at the limit."""
    from plugtune.kernel.errors import DataError
    from plugtune.plugins.loaders.text import read_text

    path = tmp_path / "grown.txt"
    path.write_text("x" * 5000)
    with pytest.raises(DataError) as info:
        read_text(path, limit=1000)
    assert str(info.value) == (f"{path}: larger than max_file_bytes (1000 bytes); "
                               "raise data.options.max_file_bytes to read it")
