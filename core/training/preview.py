"""``plugtune preview``: what the loss sees, from the tokenizer alone.

A validated recipe's data is loaded as a run loads it (every source, normalized, mixed:
core/data/mixture.py), encoded by the recipe's task with the base model's **tokenizer** (never
its weights) under ``training.max_length`` and ``training.overlong``, and described:

* the first N encoded examples of a split, loss-bearing tokens (``labels != -100``) in
  colour and prompt tokens dim, special tokens shown literally (``<|im_start|>``);
* per example, its tokens and trained tokens;
* per split, length percentiles (p50/p90/p99/max) before truncation, and how many rows
  ``training.overlong`` would truncate, drop or refuse;
* for a mixture, each source's rows, share of the training split and of its tokens.

:func:`local_tokenizer` finds the tokenizer without fetching anything or reading weights:
an alias's local folder (or its GGUF: the converted folder's tokenizer when there is one,
else the GGUF's own metadata), a local model folder, a hub id already in the Hugging Face
cache, or, for an adapter used as a base, its base's. ``plugtune validate`` prints
:func:`summary_line` when the tokenizer is local and says why it skipped otherwise.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plugtune.artifacts.models import converted_folder, local_location
from plugtune.data.datacheck import UNLIMITED, bind_tokenizer, check_empty_fields, prepare_split
from plugtune.data.labels import IGNORE_INDEX
from plugtune.data.mixture import MixedData
from plugtune.kernel.errors import DataError, ModelError
from plugtune.kernel.registry import PluginSystem, get_plugin_system
from plugtune.training.recipe import CONTEXT_KEYS, Recipe

MAX_BASE_DEPTH = 8  # adapters used as bases, each on the one below


# --------------------------------------------------------------------------------------------
# The tokenizer, without weights
# --------------------------------------------------------------------------------------------


@dataclass
class LocalTokenizer:
    """A tokenizer found on this machine (``tokenizer``), or why there is none (``reason``);
    ``context``: the model's context length from its ``config.json``, when local."""

    tokenizer: Any = None
    reason: str | None = None
    where: str = ""
    context: int | None = None


def local_tokenizer(base_model: str, plugins: PluginSystem | None = None, _depth: int = 0) -> LocalTokenizer:
    """The tokenizer of ``base_model`` if it is on this machine, read without weights and
    without fetching; otherwise a reason (see the module docstring)."""
    from transformers import AutoTokenizer

    from plugtune.artifacts.adapters import is_adapter_dir, read_manifest

    plugins = plugins or get_plugin_system()
    location = local_location(base_model, plugins)
    if location is None:
        if plugins.find("model", base_model) is not None:
            return LocalTokenizer(reason=f"{base_model} is not fetched yet (plugtune fetch {base_model})")
        if "/" in base_model and not base_model.startswith((".", "/", "~")) and not Path(base_model).suffix:
            try:  # a hub id: only what the local Hugging Face cache holds
                return _ready(LocalTokenizer(AutoTokenizer.from_pretrained(base_model, local_files_only=True),
                                             where=f"{base_model} (Hugging Face cache)"))
            except (OSError, ValueError):
                return LocalTokenizer(reason=f"{base_model} is neither a folder here nor in the local Hugging Face cache")
        return LocalTokenizer(reason=f"{base_model} is not on this machine")
    if is_adapter_dir(location):
        if _depth >= MAX_BASE_DEPTH:
            return LocalTokenizer(reason=f"{base_model}: adapters on adapters more than {MAX_BASE_DEPTH} deep")
        return local_tokenizer(read_manifest(location).base_model.id, plugins, _depth + 1)
    try:
        if location.is_file() and location.suffix == ".gguf":
            converted = converted_folder(location)
            if (converted / "tokenizer_config.json").is_file():
                return _ready(LocalTokenizer(AutoTokenizer.from_pretrained(converted, local_files_only=True),
                                             where=str(converted), context=_context(converted)))
            return _ready(LocalTokenizer(AutoTokenizer.from_pretrained(location.parent, gguf_file=location.name),
                                         where=f"{location} (GGUF metadata)"))
        return _ready(LocalTokenizer(AutoTokenizer.from_pretrained(location, local_files_only=True),
                                     where=str(location), context=_context(location)))
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return LocalTokenizer(reason=f"the tokenizer of {base_model} could not be read ({first[:200]})")


def _ready(found: LocalTokenizer) -> LocalTokenizer:
    tokenizer = found.tokenizer
    if tokenizer.pad_token is None:  # as load_base does
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return found


def _context(folder: Path) -> int | None:
    config = folder / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() and config.stat().st_size < 1 << 20 else {}
    except (OSError, ValueError):
        return None
    value = next((data[k] for k in CONTEXT_KEYS if isinstance(data.get(k), int) and not isinstance(data.get(k), bool)), None)
    return value if value and value > 0 else None


# --------------------------------------------------------------------------------------------
# Encoding and statistics
# --------------------------------------------------------------------------------------------


@dataclass
class SplitStats:
    """One split as training would see it."""

    split: str
    rows: int  # rows loaded (and mixed)
    lengths: list[int]  # each row's tokens before truncation
    encoded: list[dict[str, Any]]  # what encoding kept, at max_length
    cut: int = 0
    dropped: int = 0
    error: str | None = None  # the refusal of overlong: refuse
    max_length: int = 0

    @property
    def over(self) -> int:
        """Rows longer than ``max_length`` before truncation."""
        return sum(1 for n in self.lengths if n > self.max_length)

    def percentiles(self) -> dict[str, int]:
        import numpy as np

        if not self.lengths:
            return {}
        values = np.asarray(self.lengths)
        return {"p50": int(np.percentile(values, 50)), "p90": int(np.percentile(values, 90)),
                "p99": int(np.percentile(values, 99)), "max": int(values.max())}

    def tokens(self) -> tuple[int, int]:
        """(tokens, trained tokens) over the encoded rows."""
        total = sum(len(r["input_ids"]) for r in self.encoded)
        return total, sum(trained_tokens(r) for r in self.encoded)


def trained_tokens(row: dict[str, Any]) -> int:
    """Loss-bearing tokens of an encoded row: labels other than -100 (an lm head's labels
    run along the ids; a classifier's one label is no token)."""
    labels = row.get("labels") or []
    if len(labels) != len(row["input_ids"]):
        return 0
    return sum(1 for label in labels if label != IGNORE_INDEX)


@dataclass
class Preview:
    recipe: Recipe
    tokenizer: Any
    task: Any
    max_length: int
    data: MixedData
    splits: dict[str, SplitStats] = field(default_factory=dict)
    where: str = ""


def build_preview(recipe: Recipe, tokenizer: LocalTokenizer, *, splits: tuple[str, ...] = ("train", "test")) -> Preview:
    """Load, normalize, mix and encode the recipe's data with ``tokenizer`` only."""
    t = recipe.training
    task = copy.deepcopy(recipe.task)
    data = recipe.load_data(t.seed, task)
    check_empty_fields(data.splits, task)
    task.setup(data.splits["train"])
    bind_tokenizer(task, tokenizer.tokenizer)
    max_length = min(t.max_length, tokenizer.context) if tokenizer.context else t.max_length
    preview = Preview(recipe, tokenizer.tokenizer, task, max_length, data, where=tokenizer.where)
    for split in splits:
        rows = data.splits[split]
        lengths = [_full_length(row, task, tokenizer.tokenizer) for row in rows]
        prepared = prepare_split(rows, task, tokenizer.tokenizer, max_length, t.overlong, split)
        stats = SplitStats(split, len(rows), lengths, prepared.rows, prepared.cut, prepared.dropped, prepared.error,
                           max_length)
        if prepared.error is None:
            data.count_encoded(split, prepared.rows, policy=t.overlong, max_length=max_length, cut=prepared.cut,
                               dropped=prepared.dropped)
        preview.splits[split] = stats
    return preview


def _full_length(row: dict[str, Any], task: Any, tokenizer: Any) -> int:
    try:
        return len(task.encode(row, tokenizer, UNLIMITED)["input_ids"])
    except (KeyError, ValueError, TypeError, DataError):
        return 0  # prepare_split reports the row with its own message


def summary_line(preview: Preview, split: str = "train") -> str:
    """One line: rows, token percentiles, trained share, what overlong does."""
    stats = preview.splits[split]
    other = [f"{s.rows} {s.split}" for s in preview.splits.values() if s.split != split]
    p = stats.percentiles()
    total, trained = stats.tokens()
    share = f"{trained / total:.1%} of tokens trained" if total and trained else "no token-level loss (classifier)"
    return (f"{stats.rows} {split}{' + ' + ', '.join(other) if other else ''} rows; {split} tokens p50 {p.get('p50', 0)} / "
            f"p90 {p.get('p90', 0)} / max {p.get('max', 0)}; {share}; {_overlong(stats, preview)}")


def _overlong(stats: SplitStats, preview: Preview) -> str:
    t = preview.recipe.training
    if stats.error:
        return f"{stats.over} rows over max_length {preview.max_length}: overlong: refuse stops the run"
    if t.overlong == "drop":
        return f"{stats.dropped} dropped over max_length {preview.max_length} (overlong: drop)"
    return f"{stats.cut} truncated at max_length {preview.max_length}"


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

TRAINED, PROMPT, SPECIAL = "bold green", "dim", "magenta"


def render_example(row: dict[str, Any], tokenizer: Any) -> Any:
    """A rich ``Text`` of one encoded row: trained tokens in colour, the rest dim, special
    tokens literal (and magenta). Built with ``Text.append``: user text is never read as
    markup."""
    from rich.text import Text

    ids, labels = row["input_ids"], row.get("labels") or []
    lm = len(labels) == len(ids)
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    runs: list[tuple[int, tuple[bool, bool]]] = []  # (end, state): consecutive tokens alike
    for i, token in enumerate(ids):
        key = (lm and labels[i] != IGNORE_INDEX, token in specials)
        if runs and runs[-1][1] == key:
            runs[-1] = (i + 1, key)
        else:
            runs.append((i + 1, key))
    text, shown, start = Text(), "", 0
    for end, key in runs:
        # each run is the growth of the decoded prefix, so the spaces a tokenizer puts
        # between tokens (and multi-token characters) come out as the whole row decodes
        prefix = _decode(tokenizer, ids[:end])
        piece = prefix[len(shown):] if prefix.startswith(shown) else _decode(tokenizer, ids[start:end])
        text.append(piece, style=_style(key))
        shown, start = prefix, end
    return text


def _other_sequences(row: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The row's further token sequences besides ``input_ids``: ``<name>_input_ids`` with
    ``<name>_labels`` (a preference pair's ``rejected_...``), non-empty ones only."""
    out = []
    for key, ids in row.items():
        name = key.removesuffix("_input_ids")
        if key.endswith("_input_ids") and ids and isinstance(row.get(f"{name}_labels"), list):
            out.append((name, {"input_ids": ids, "labels": row[f"{name}_labels"]}))
    return out


def _style(state: tuple[bool, bool] | None) -> str:
    trained, special = state or (False, False)
    if special:
        return f"bold {SPECIAL}" if trained else SPECIAL
    return TRAINED if trained else PROMPT


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def render(preview: Preview, console: Any, *, split: str = "train", rows: int = 3) -> None:
    """Print the preview (see the module docstring) with rich."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    recipe, stats = preview.recipe, preview.splits[split]
    console.print(Text.assemble(("preview ", "bold"), f"{recipe.name}: task {recipe.task.type}, tokenizer from {preview.where}, "
                                f"max_length {preview.max_length}, overlong {recipe.training.overlong}"))
    console.print(Text.assemble("legend: ", ("trained tokens", TRAINED), " · ", ("prompt (no loss)", PROMPT), " · ",
                                ("special tokens", SPECIAL)))
    for note in preview.data.notes:
        console.print(note, markup=False, highlight=False)
    labels = getattr(preview.task, "labels", None)
    for i, row in enumerate(stats.encoded[:rows]):
        owner = preview.data.owner.get(id(row.get("example")))
        source = f" · source {preview.data.counts[owner].name}" if preview.data.mixture and owner is not None else ""
        total, trained = len(row["input_ids"]), trained_tokens(row)
        head = f"#{i + 1} {split}{source} · {total} tokens, {trained} trained"
        if trained == 0 and labels and len(row.get("labels") or []) == 1:
            head += f" · label {labels[row['labels'][0]]!s}"
        console.print(Text(head, style="bold cyan"))
        console.print(render_example(row, preview.tokenizer))
        for name, other in _other_sequences(row):  # a pair's rejected answer, shown the same way
            console.print(Text(f"   {name} · {len(other['input_ids'])} tokens, {trained_tokens(other)} trained", style="cyan"))
            console.print(render_example(other, preview.tokenizer))
    if not stats.encoded:
        console.print(f"no {split} rows to show")
    table = Table(title="lengths in tokens, before truncation")
    for column in ("split", "rows", "p50", "p90", "p99", "max", "over max_length", "training.overlong", "trained share"):
        table.add_column(column, justify="left" if column in ("split", "training.overlong") else "right")
    for s in preview.splits.values():
        p = s.percentiles()
        total, trained = s.tokens()
        table.add_row(s.split, str(s.rows), *(str(p.get(k, "-")) for k in ("p50", "p90", "p99", "max")), str(s.over),
                      escape(_overlong(s, preview)), f"{trained / total:.1%}" if total and trained else "-")
    console.print(table)
    if preview.data.mixture:
        _render_sources(preview, console)


def _render_sources(preview: Preview, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    train = preview.splits.get("train")
    tokens: dict[int, int] = {}
    for row in train.encoded if train else []:
        owner = preview.data.owner.get(id(row.get("example")))
        if owner is not None:
            tokens[owner] = tokens.get(owner, 0) + len(row["input_ids"])
    all_tokens = sum(tokens.values())
    all_rows = len(preview.data.splits["train"])
    table = Table(title=f"mixture ({preview.recipe.mix.how if preview.recipe.mix else ''})")
    for column in ("source", "loader", "weight", "read train", "kept train", "share of rows", "share of tokens",
                   "test", "truncated", "dropped"):
        table.add_column(column, justify="left" if column in ("source", "loader") else "right")
    for i, c in enumerate(preview.data.counts):
        table.add_row(escape(c.name), escape(c.loader), "-" if c.weight is None else f"{c.weight:g}", str(c.read["train"]),
                      str(c.kept["train"]), f"{c.kept['train'] / all_rows:.1%}" if all_rows else "-",
                      f"{tokens.get(i, 0) / all_tokens:.1%}" if all_tokens else "-", str(c.kept["test"]),
                      _sum(c.truncated), _sum(c.dropped))
    console.print(table)


def _sum(values: dict[str, int | None]) -> str:
    return "?" if any(v is None for v in values.values()) else str(sum(v for v in values.values() if v is not None))


def preview(recipe: Recipe, console: Any, *, split: str = "train", rows: int = 3,
            plugins: PluginSystem | None = None) -> Preview:
    """``plugtune preview``: find the tokenizer (a one-line :class:`ModelError` when it is not
    local), build and print the preview."""
    found = local_tokenizer(recipe.spec.base_model, plugins)
    if found.tokenizer is None:
        raise ModelError(f"base_model: {found.reason}; preview needs the tokenizer only (no weights), "
                         f"from a local folder, a fetched alias or the Hugging Face cache")
    built = build_preview(recipe, found)
    render(built, console, split=split, rows=rows)
    return built


def validate_summary(recipe: Recipe, plugins: PluginSystem | None = None) -> str:
    """``plugtune validate``'s data line: :func:`summary_line`, or why it was skipped."""
    found = local_tokenizer(recipe.spec.base_model, plugins)
    if found.tokenizer is None:
        return f"data summary skipped: {found.reason} (the tokenizer is needed, never the weights)"
    return "data: " + summary_line(build_preview(recipe, found))


__all__ = ["LocalTokenizer", "Preview", "build_preview", "local_tokenizer", "preview", "render", "render_example",
           "summary_line", "trained_tokens", "validate_summary"]
