"""Counterfactual term swapping: the ``counterfactual_bias`` evaluator and the
``counterfactual`` augmentation regularizer.

Both rewrite examples by swapping the terms of a list of pairs (he <-> she, his <-> her,
John <-> Mary, ...): whole words only ("he" is swapped, "the" and "hero" are not), matched
regardless of case, each replacement taking the case of the word it replaces (He -> She,
HE -> SHE), and both directions at once ("he and she" -> "she and he"). A term that appears
in several pairs is swapped as in its first pair. The default list,
``data/gendered_terms.tsv`` beside this module, holds gendered English words and a few name
pairs.

Options shared by both components:

``pairs: [[a, b], ...]``
    the term pairs to use instead of the default list.
``pairs_file: path``
    a file of pairs instead (relative to the recipe's folder): a JSON list of pairs, or text
    with one pair a line, the two terms separated by a tab or a comma (``#`` comments and
    blank lines are skipped). With ``pairs`` too, the pairs come first.
``include_default: true``
    use the default list as well, after the given pairs.
``fields: [column, ...]``
    the example fields to rewrite; see each component for the default.

``counterfactual_bias`` (evaluator) measures how much the model's output depends on the
swapped terms. After the normal evaluation pass it rewrites every evaluation example; those
the swap leaves unchanged are dropped. It runs the model on the changed examples and on
their originals and reports:

* ``counterfactual/flip_rate``: the fraction whose prediction changed (the class, for
  classification; the greedy response, token for token, for a causal LM); 0 is invariant.
* ``counterfactual/score_gap``: the mean absolute change of the log-probability the model
  gives the reference (``EvalBatch.losses``: per token for a causal LM), so a confident
  model whose answer flips shows a large gap.
* ``counterfactual/examples``: how many examples the swap changed (the metrics above are nan
  when none).

By default it rewrites the input fields only: the text template's fields for sequence
classification, the prompt's for a causal LM, never the label column; the reference stays
the same, so a changed prediction is a change of the model's behaviour.

``counterfactual`` (regularizer) is counterfactual data augmentation: before training it
adds a swapped copy of the training rows the swap changes (a seeded fraction ``p`` of them),
with the same label, so that the swapped terms stop predicting the label. By default it
rewrites every field the task's templates use except the label column (a causal LM's
response too, so that an answer stays consistent with its question).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from plugtune import hookimpl
from plugtune.sdk import ComponentOptions, DataPath, EvalBatch, EvalContext, RecipeError, template_fields

DEFAULT_PAIRS_FILE = "gendered_terms.tsv"

Pair = tuple[str, str]


# --------------------------------------------------------------------------------------------
# Term pairs and swapping
# --------------------------------------------------------------------------------------------


def parse_pairs(text: str, source: str = "pairs file", as_json: bool = False) -> list[Pair]:
    """Pairs from a JSON list of pairs, or from lines of ``a<TAB>b`` / ``a,b``."""
    if as_json:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{source}: expected a JSON list of [term, term] pairs")
        pairs = []
        for i, item in enumerate(data):
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(t, str) for t in item)):
                raise ValueError(f"{source}: item {i + 1} is not a pair of two strings: {item!r}")
            pairs.append(_check_pair(item[0], item[1], f"{source}: item {i + 1}"))
        return pairs
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\t" in line:
            parts = line.split("\t")
        elif "," in line:
            parts = line.split(",")
        else:
            parts = line.split()
        parts = [p.strip() for p in parts]
        if len(parts) != 2:
            raise ValueError(f"{source}: line {n}: expected two terms separated by a tab or a comma, got {line!r}")
        pairs.append(_check_pair(parts[0], parts[1], f"{source}: line {n}"))
    return pairs


def _check_pair(a: str, b: str, where: str) -> Pair:
    a, b = a.strip(), b.strip()
    if not a or not b:
        raise ValueError(f"{where}: a term is empty")
    if a.lower() == b.lower():
        raise ValueError(f"{where}: a term cannot pair with itself ({a!r})")
    return (a, b)


def read_pairs_file(path: Path) -> list[Pair]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    pairs = parse_pairs(text, str(path), as_json=Path(path).suffix.lower() == ".json")
    if not pairs:
        raise ValueError(f"{path}: no term pairs in the file")
    return pairs


@lru_cache(maxsize=1)
def default_pairs() -> tuple[Pair, ...]:
    """The pairs shipped with the plugin (``data/gendered_terms.tsv``)."""
    from importlib.resources import files

    resource = files(__package__ or "plugtune.plugins.evaluators") / "data" / DEFAULT_PAIRS_FILE
    return tuple(parse_pairs(resource.read_text(encoding="utf-8"), DEFAULT_PAIRS_FILE))


def _match_case(word: str, like: str) -> str:
    if len(like) > 1 and like.isupper():
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


class TermSwapper:
    """Swaps whole words of ``pairs`` in both directions at once, preserving case."""

    def __init__(self, pairs: Iterable[Pair]) -> None:
        mapping: dict[str, str] = {}
        for a, b in pairs:
            a, b = a.strip().lower(), b.strip().lower()
            mapping.setdefault(a, b)  # the first pair a term appears in decides its swap
            mapping.setdefault(b, a)
        if not mapping:
            raise ValueError("no term pairs to swap")
        self.mapping = mapping
        terms = sorted(mapping, key=len, reverse=True)  # longest first: "mrs" before "mr"
        self.pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(t) for t in terms) + r")(?!\w)", re.IGNORECASE)

    def swap(self, text: str) -> str:
        return self.pattern.sub(lambda m: _match_case(self.mapping[m.group(0).lower()], m.group(0)), text)

    def swap_example(self, example: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any] | None:
        """A copy of ``example`` with ``fields`` swapped, or None when nothing changed."""
        new = dict(example)
        changed = False
        for name in fields:
            value = example.get(name)
            if isinstance(value, str):
                swapped = self.swap(value)
                if swapped != value:
                    new[name] = swapped
                    changed = True
        return new if changed else None


class TermPairOptions(ComponentOptions):
    pairs: list[Pair] | None = None
    """Term pairs ``[[a, b], ...]`` to swap instead of the default list."""
    pairs_file: DataPath | None = None
    """A file of term pairs instead (JSON list, or a pair a line separated by a tab or a
    comma), relative to the recipe's folder."""
    include_default: bool = False
    """Use the shipped default list too, after the given pairs."""
    fields: list[str] | None = None
    """The example fields to rewrite (default: see the component)."""

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, value: list[Pair] | None) -> list[Pair] | None:
        if value is not None:
            if not value:
                raise ValueError("give at least one pair, or leave pairs out for the default list")
            value = [_check_pair(a, b, f"pair {i + 1}") for i, (a, b) in enumerate(value)]
        return value

    @field_validator("pairs_file")
    @classmethod
    def _pairs_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_pairs_file(value)  # a malformed file is a recipe error, found at validation
        return value

    def term_pairs(self) -> list[Pair]:
        pairs: list[Pair] = list(self.pairs or [])
        if self.pairs_file is not None:
            pairs += read_pairs_file(self.pairs_file)
        if not pairs or self.include_default:
            pairs += default_pairs()
        return pairs


def _input_fields(task: Any) -> set[str]:
    """The fields the model reads: the text template's (classification), the prompt's or
    the raw text template's (causal LM); never the label column."""
    if task.is_classification:
        fields = template_fields(task.text or "{text}")
    else:
        fields = template_fields(task.prompt) | (template_fields(task.text) if task.response is None else set())
    return fields - {task.label}


def _all_fields(task: Any) -> set[str]:
    """Every field the task's templates use, except the label column."""
    fields = template_fields(task.text or "{text}") if task.is_classification else task.required_fields()
    return fields - {task.label}


def _chosen_fields(option: list[str] | None, default: set[str], task: Any, who: str) -> list[str]:
    if option is None:
        return sorted(default)
    known = task.required_fields() | template_fields(task.text)
    unknown = [f for f in option if f not in known]
    if unknown:
        raise RecipeError([f"{who}.options.fields: {', '.join(map(repr, unknown))} not used by the task's templates "
                           f"(fields: {', '.join(sorted(known)) or 'none'})"])
    return list(option)


# --------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------


class CounterfactualBiasOptions(TermPairOptions):
    max_examples: int | None = Field(None, gt=0)
    """Rewrite at most this many changed examples (the first ones)."""


class CounterfactualBias:
    """``counterfactual/flip_rate``, ``counterfactual/score_gap`` and
    ``counterfactual/examples``: how the model's predictions move when the pair terms in its
    input are swapped (see the module docstring). The work happens in ``compute_with``, after
    the evaluation pass; ``compute`` reports nothing. Both measures of bias improve
    downwards; ``examples`` is a count and has no direction."""

    Options = CounterfactualBiasOptions
    name = "counterfactual_bias"
    directions = {"counterfactual/flip_rate": "min", "counterfactual/score_gap": "min"}

    def __init__(self, options: CounterfactualBiasOptions | None = None, task: Any = None) -> None:
        self.options = options or CounterfactualBiasOptions()
        reason = self.check_task(task)
        if reason:
            raise RecipeError([f"evaluators: {self.name}: {reason}"])
        self.task = task
        self.swapper = TermSwapper(self.options.term_pairs())
        if task is not None:  # a bad `fields` option fails here, before the first evaluation
            self.fields(task)

    @classmethod
    def check_task(cls, task: Any) -> str | None:
        """Why this evaluator cannot measure ``task``, or None when it can."""
        if task is not None and not task.is_classification and not task.generates:
            return ("needs a prediction to compare: a sequence-classification task, or a causal-lm task with "
                    "prompt and response templates (not raw text)")
        return None

    def fields(self, task: Any) -> list[str]:
        return _chosen_fields(self.options.fields, _input_fields(task), task, "evaluators")

    def reset(self) -> None:
        pass

    def update(self, batch: EvalBatch) -> None:
        pass

    def compute(self) -> dict[str, float]:
        return {}

    def compute_with(self, context: EvalContext) -> dict[str, float]:
        task = context.task if context.task is not None else self.task
        fields = self.fields(task)
        originals, rewritten = [], []
        for example in context.examples:
            swapped = self.swapper.swap_example(example, fields)
            if swapped is None:
                continue
            originals.append(example)
            rewritten.append(swapped)
            if self.options.max_examples and len(originals) >= self.options.max_examples:
                break
        empty = {"counterfactual/flip_rate": float("nan"), "counterfactual/score_gap": float("nan"),
                 "counterfactual/examples": 0}
        if not originals:
            return empty
        pairs = _aligned(context.predict(originals), originals, context.predict(rewritten), rewritten)
        if not pairs:
            return empty
        flips = sum(p != q for (p, _), (q, _) in pairs)
        gap = sum(abs(s - t) for (_, s), (_, t) in pairs)
        return {"counterfactual/flip_rate": flips / len(pairs), "counterfactual/score_gap": gap / len(pairs),
                "counterfactual/examples": len(pairs)}


def _aligned(a: EvalBatch, a_in: list[Any], b: EvalBatch, b_in: list[Any]) -> list[tuple[tuple[Any, float], tuple[Any, float]]]:
    """(prediction, score) of each original with its rewrite's. ``predict`` may drop an
    example (a causal LM's response truncated away), so results are matched to the examples
    given by identity when it reports them, else by position."""

    def by_input(batch: EvalBatch, given: list[Any]) -> list[tuple[Any, float] | None]:
        if len(batch.losses) == len(batch.predictions):
            scores = batch.losses  # cross-entropy of the reference: -log p
        elif len(batch.scores) == len(batch.predictions):
            scores = batch.scores
        else:
            scores = [float("nan")] * len(batch.predictions)
        results = list(zip(batch.predictions, scores))
        if len(batch.examples) == len(results):
            where = {id(e): r for e, r in zip(batch.examples, results)}
            return [where.get(id(e)) for e in given]
        if len(results) == len(given):
            return list(results)
        raise RuntimeError(f"counterfactual_bias: predict returned {len(results)} results for {len(given)} examples, "
                           "without the examples to match them")

    return [(x, y) for x, y in zip(by_input(a, a_in), by_input(b, b_in)) if x is not None and y is not None]


# --------------------------------------------------------------------------------------------
# The regularizer
# --------------------------------------------------------------------------------------------


class CounterfactualAugmentationOptions(TermPairOptions):
    p: float = Field(1.0, ge=0, le=1)
    """The fraction of the rows the swap changes that get a swapped copy."""
    seed: int = 0
    """Seed of the choice of rows when ``p`` < 1."""


class CounterfactualAugmentation:
    """Counterfactual data augmentation: the training rows plus swapped copies (see the
    module docstring)."""

    Options = CounterfactualAugmentationOptions

    def __init__(self, options: CounterfactualAugmentationOptions | None = None) -> None:
        self.options = options or CounterfactualAugmentationOptions()
        self.swapper = TermSwapper(self.options.term_pairs())
        self.added = 0

    def augment_examples(self, rows: list[dict[str, Any]], task: Any) -> list[dict[str, Any]]:
        fields = _chosen_fields(self.options.fields, _all_fields(task), task, "regularizers")
        candidates = [s for s in (self.swapper.swap_example(row, fields) for row in rows) if s is not None]
        k = round(self.options.p * len(candidates))
        chosen = sorted(random.Random(self.options.seed).sample(range(len(candidates)), k))
        self.added = k
        return list(rows) + [candidates[i] for i in chosen]


@hookimpl
def register_evaluators(register):
    register("counterfactual_bias", CounterfactualBias)


@hookimpl
def register_regularizers(register):
    register("counterfactual", CounterfactualAugmentation)
