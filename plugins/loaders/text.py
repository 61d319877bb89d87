"""``text``: plain-text files for continued pre-training (or any task over one text column).

Options::

    path: data/corpus.txt      # a file, or a folder: every *.txt file under it, in name order
    unit: paragraph            # line | paragraph (blank-line separated) | file
    min_chars: 1               # drop units shorter than this (after stripping whitespace)
    chunk_chars: null          # split units longer than this into pieces of about this many
                               # characters, cut at whitespace (e.g. 400 for max_length ~128)
    test_size: 0.1             # fraction held out when there is no test_path
    test_path: null            # optional held-out file or folder, read the same way
    column: text               # the example key: the task's template refers to {text}
    max_file_bytes: 4294967296 # the largest file read (each file is read whole)

Every unit becomes one example ``{column: unit}``. With a causal-lm task whose only template
is ``text: "{text}"`` the loss covers every token: continued pre-training on raw text.

Text is read as UTF-8 (a byte-order mark is ignored, ``\\r\\n`` becomes ``\\n``); a unit keeps
its inner line breaks and loses only leading and trailing whitespace.

Only regular files are read: a FIFO, device or socket given as ``path``, or found among a
folder's ``*.txt`` files, is refused by name without being opened for reading; a file larger
than ``max_file_bytes`` is refused (the line says how to raise it) after reading no more
than the limit.

The split is seeded and deterministic: the same units, ``seed`` and ``test_size`` always hold
out the same units. It is made over units *before* chunking, so pieces of one paragraph or
file never land on both sides; only when there is a single unit (``unit: file`` on one file)
are its pieces split instead.
"""

from __future__ import annotations

import codecs
import math
import os
import random
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from plugtune import hookimpl
from plugtune.sdk import ComponentOptions, DataError, DataFileOrFolder, not_regular, open_regular

MAX_FILE_BYTES = 4 << 30  # 4 GiB: a file is read whole, so this bounds the memory one file takes
PROBE_BYTES = 1 << 16  # read at validation to catch a wrong encoding early
_BLANK_LINE = re.compile(r"\n[ \t\f\v]*\n")  # paragraphs: one or more blank lines between them
_SPACES = " \n\t\f\v\u00a0\u2009\u3000"  # where chunk() may cut a unit


class TextOptions(ComponentOptions):
    path: DataFileOrFolder
    unit: Literal["line", "paragraph", "file"] = "paragraph"
    min_chars: int = Field(1, ge=1, description="drop units with fewer characters")
    chunk_chars: int | None = Field(None, gt=0, description="split longer units into pieces of about this many characters")
    test_size: float = Field(0.1, gt=0, lt=1)
    test_path: DataFileOrFolder | None = None
    column: str = Field("text", min_length=1)
    max_file_bytes: int = Field(MAX_FILE_BYTES, gt=0, description="the largest file read")


def text_files(path: Path) -> list[Path]:
    """``path`` itself, or the ``*.txt`` files under a folder (recursively, hidden ones
    skipped), sorted by their path inside it. A ``*.txt`` entry that is neither a folder nor
    a regular file (a FIFO, a device, a dangling link) is refused by name."""
    if not path.is_dir():
        return [path]
    files = []
    for p in path.rglob("*.txt"):
        if any(part.startswith(".") for part in p.relative_to(path).parts):
            continue
        try:
            what = not_regular(p)
        except OSError as exc:
            raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from None
        if what == "a folder":
            continue
        if what is not None:
            raise DataError(f"{p} is {what}, not a regular file")
        files.append(p)
    if not files:
        raise DataError(f"{path}: no .txt files in this folder")
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def _too_big(path: Path, limit: int) -> DataError:
    return DataError(f"{path}: larger than max_file_bytes ({limit} bytes); raise data.options.max_file_bytes to read it")


def check_size(path: Path, limit: int) -> None:
    """Refuse a file larger than ``limit`` before reading it (validation calls this)."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size > limit:
        raise _too_big(path, limit)


def read_text(path: Path, limit: int = MAX_FILE_BYTES) -> str:
    """The file's text, or a one-line :class:`DataError`; no more than ``limit`` + 1 bytes
    are read, whatever the file claims."""
    with open_regular(path) as fh:
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise _too_big(path, limit)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _empty(source: Path) -> str:
    return "all .txt files in this folder are empty" if source.is_dir() else "the file is empty"


def probe(path: Path) -> bool:
    """Cheap validation-time checks: the file starts as UTF-8 text (else a DataError).
    False when the file holds nothing but whitespace."""
    with open_regular(path) as fh:
        try:
            head = fh.read(PROBE_BYTES)
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(head, final=len(head) < PROBE_BYTES)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None
    return len(head) == PROBE_BYTES or bool(text.strip())


def split_units(text: str, unit: str) -> list[str]:
    """``text`` cut into stripped, non-empty lines, paragraphs, or one whole-file unit."""
    if unit == "line":
        parts = text.split("\n")
    elif unit == "paragraph":
        parts = _BLANK_LINE.split(text)
    else:
        parts = [text]
    return [s for s in (p.strip() for p in parts) if s]


def chunk(text: str, size: int) -> list[str]:
    """Split ``text`` into pieces of at most ``size`` characters, cut at whitespace.

    Pieces are balanced (a 1,000-character unit with ``size=400`` gives three pieces of
    about 333, not 400 + 400 + 200). A word longer than ``size`` is cut inside."""
    pieces: list[str] = []
    text = text.strip()
    start, end = 0, len(text)
    while start < end:
        while text[start].isspace():
            start += 1
        remaining = end - start
        if remaining <= size:
            pieces.append(text[start:end])
            break
        target = math.ceil(remaining / math.ceil(remaining / size))
        cut = _last_space(text, start, start + target)
        if cut < 0:  # no space up to the target: the last one before `size`, else cut the word
            cut = _last_space(text, start, start + size)
            if cut < 0:
                cut = start + size
        piece = text[start:cut].rstrip()
        if piece:
            pieces.append(piece)
        start = cut
    return pieces


def _last_space(text: str, start: int, limit: int) -> int:
    """Index of the last whitespace character in ``text[start + 1 : limit + 1]`` (-1 when none)."""
    return max(text.rfind(c, start + 1, limit + 1) for c in _SPACES)


class TextLoader:
    """Lines, paragraphs or whole files of plain text become ``{column: text}`` examples."""

    Options = TextOptions

    def __init__(self, options: TextOptions) -> None:
        self.options = options

    def columns(self) -> list[str]:
        o = self.options
        for source in (o.path, o.test_path):
            if source is None:
                continue
            files = text_files(source)
            for path in files:
                check_size(path, o.max_file_bytes)
            empty = [path for path in files if not probe(path)]
            if len(empty) == len(files):
                raise DataError(f"{source}: {_empty(source)}")
        return [o.column]

    def units(self, source: Path) -> list[str]:
        """Every unit of a file or folder that is at least ``min_chars`` long (not chunked)."""
        o = self.options
        units: list[str] = []
        files = text_files(source)
        for path in files:
            units.extend(split_units(read_text(path, o.max_file_bytes), o.unit))
        if not units:
            raise DataError(f"{source}: {_empty(source)}")
        kept = [u for u in units if len(u) >= o.min_chars]
        if not kept:
            raise DataError(f"{source}: none of its {len(units)} {o.unit}s has at least min_chars={o.min_chars} characters")
        return kept

    def _pieces(self, units: list[str]) -> list[str]:
        size = self.options.chunk_chars
        return [p for u in units for p in chunk(u, size)] if size else list(units)

    def load(self, seed: int) -> dict[str, list[dict[str, Any]]]:
        o = self.options
        units = self.units(o.path)
        if o.test_path is not None:
            train, test = self._pieces(units), self._pieces(self.units(o.test_path))
        else:
            if len(units) == 1:
                units = self._pieces(units)  # one unit: split its pieces
            if len(units) < 2:
                raise DataError(
                    f"{o.path}: 1 {o.unit} cannot be split into train and test; "
                    f"use a smaller unit, set chunk_chars, or give test_path"
                )
            train_units, test_units = seeded_split(units, o.test_size, seed)
            train, test = self._pieces(train_units), self._pieces(test_units)
        return {"train": [{o.column: t} for t in train], "test": [{o.column: t} for t in test]}


def seeded_split(items: list[str], test_size: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out ``round(len * test_size)`` items (at least one, never all) chosen by ``seed``;
    both parts keep the source order."""
    n_test = min(len(items) - 1, max(1, round(len(items) * test_size)))
    held = set(random.Random(seed).sample(range(len(items)), n_test))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


@hookimpl
def register_data_loaders(register):
    register("text", TextLoader)
