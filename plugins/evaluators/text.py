"""Generation metrics: ``exact_match``, ``rouge`` and ``bleu``.

These evaluators set ``needs_generation = True``: for a causal-LM task with ``prompt`` and
``response`` templates the core generates greedily from each prompt (up to
``training.max_new_tokens`` tokens) and hands the text over in ``EvalBatch.generated``,
beside ``EvalBatch.reference_texts`` (the filled response template). They compare the two
strings (``exact_match`` with ``pattern`` compares only the field a regular expression finds
in each, such as the department in "... I have routed order ORD-48213 to Shipping."). Any
other task (sequence classification, or a causal LM on raw text without a
response) has nothing to generate, and building one of these evaluators for it raises a
:class:`~plugtune.kernel.errors.RecipeError` saying so.

``rouge_score`` and ``sacrebleu`` are imported when an evaluator is built, not when the
plugin loads.
"""

from __future__ import annotations

import re
import string
from typing import Any, Literal

from pydantic import Field, field_validator

from plugtune import hookimpl
from plugtune.sdk import ComponentOptions, EvalBatch, RecipeError


class _Generative:
    """Collects (generated, reference) text pairs; subclasses score them."""

    needs_generation = True
    name = ""

    def __init__(self, options: Any, task: Any) -> None:
        reason = self.check_task(task)
        if reason:
            raise RecipeError([f"evaluators: {self.name}: {reason}"])
        self.options = options
        self.task = task
        self.reset()

    @classmethod
    def check_task(cls, task: Any) -> str | None:
        """Why this evaluator cannot score ``task``, or None when it can."""
        if task is None:
            return None
        if task.is_classification:
            return ("needs generated text, which a sequence-classification task does not produce; "
                    "use accuracy, f1, precision or recall, or a causal-lm task with prompt and response templates")
        if not task.generates:
            return "needs a causal-lm task with prompt and response templates (there is no response to compare with)"
        return None

    def reset(self) -> None:
        self.generated: list[str] = []
        self.references: list[str] = []

    def update(self, batch: EvalBatch) -> None:
        if batch.generated is None or batch.reference_texts is None:
            raise RuntimeError(f"{self.name}: the evaluation batch has no generated text (needs_generation was not honoured)")
        self.generated += batch.generated
        self.references += batch.reference_texts


# --------------------------------------------------------------------------------------------
# exact_match
# --------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop ASCII punctuation, drop the articles
    a/an/the, and collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


class ExactMatchOptions(ComponentOptions):
    normalize: bool = True
    """Compare after SQuAD normalisation (see :func:`normalize_answer`); false: after
    stripping surrounding whitespace only."""
    pattern: str | None = None
    """A regular expression (Python ``re``): compare only the field it finds instead of
    the whole text. The first match in the generated text (``re.search``; its group 1 when
    the pattern has groups, else the whole match) must equal the first match in the
    reference, after ``normalize``. A generation without a match is a miss; an example
    whose reference has no match is left out of the score. Compiled when the recipe is
    validated, so a bad pattern is a recipe error. Example: ``"ORD-\\d+ to (\\w+)"``."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc}); "
                                 "write it in Python's re syntax, with backslashes doubled inside YAML double quotes") from None
        return value


def extract_field(pattern: re.Pattern[str], text: str) -> str | None:
    """The field ``pattern`` finds in ``text``: its first match's group 1 when the pattern
    has groups (None when the group did not take part), else the whole match; None when
    nothing matches."""
    found = pattern.search(text)
    if found is None:
        return None
    return found.group(1) if pattern.groups else found.group(0)


class ExactMatch(_Generative):
    """``exact_match``: the fraction of examples whose generated text equals the reference
    text after normalisation (SQuAD-style: case, punctuation, articles and extra whitespace
    are ignored, so "The Blue." matches "blue"). With ``pattern``, only the field the
    regular expression finds is compared (a department, an order number), so the rest of
    a long answer may differ; references without the field are left out."""

    Options = ExactMatchOptions
    name = "exact_match"
    directions = {"exact_match": "max"}

    def __init__(self, options: ExactMatchOptions | None = None, task: Any = None) -> None:
        super().__init__(options or ExactMatchOptions(), task)
        self.pattern = re.compile(self.options.pattern) if self.options.pattern is not None else None

    def compute(self) -> dict[str, float]:
        norm = normalize_answer if self.options.normalize else str.strip
        pairs = list(zip(self.generated, self.references))
        if self.pattern is not None:
            fields = [(extract_field(self.pattern, g), extract_field(self.pattern, r)) for g, r in pairs]
            pairs = [(g, r) for g, r in fields if r is not None]
            hits = sum(g is not None and norm(g) == norm(r) for g, r in pairs)
        else:
            hits = sum(norm(g) == norm(r) for g, r in pairs)
        if not pairs:
            return {"exact_match": float("nan")}
        return {"exact_match": hits / len(pairs)}


# --------------------------------------------------------------------------------------------
# rouge
# --------------------------------------------------------------------------------------------


class RougeOptions(ComponentOptions):
    stemmer: bool = True
    """Porter-stem words before matching ("cats" matches "cat")."""
    tokenizer: Literal["default", "unicode"] = "default"
    """``default``: rouge_score's own (lowercase, every character outside a-z and 0-9 is a
    separator, so text in other scripts scores 0); ``unicode``: lowercase words of any
    script (``\\w+``)."""


class _UnicodeTokenizer:
    """Lowercased ``\\w+`` words of any script, Porter-stemmed (words over 3 characters, as
    rouge_score does) when asked."""

    def __init__(self, stem: bool) -> None:
        self.stemmer = None
        if stem:
            from nltk.stem import porter

            self.stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        words = re.findall(r"\w+", text.lower())
        if self.stemmer is not None:
            words = [self.stemmer.stem(w) if len(w) > 3 else w for w in words]
        return words


class Rouge(_Generative):
    """``rouge1``, ``rouge2``, ``rougeL``: ROUGE F-measures of the generated text against the
    reference, averaged over examples. ROUGE-1 and ROUGE-2 count overlapping words and word
    pairs (F = 2PR/(P+R) of n-gram precision and recall); ROUGE-L uses the longest common
    subsequence of words. Computed with Google's ``rouge_score`` package; 0 to 1."""

    Options = RougeOptions
    name = "rouge"
    TYPES = ("rouge1", "rouge2", "rougeL")
    directions = dict.fromkeys(TYPES, "max")

    def __init__(self, options: RougeOptions | None = None, task: Any = None) -> None:
        super().__init__(options or RougeOptions(), task)
        from rouge_score import rouge_scorer

        tokenizer = _UnicodeTokenizer(self.options.stemmer) if self.options.tokenizer == "unicode" else None
        self.scorer = rouge_scorer.RougeScorer(list(self.TYPES), use_stemmer=self.options.stemmer, tokenizer=tokenizer)

    def compute(self) -> dict[str, float]:
        if not self.references:
            return {t: float("nan") for t in self.TYPES}
        totals = dict.fromkeys(self.TYPES, 0.0)
        for generated, reference in zip(self.generated, self.references):
            scores = self.scorer.score(reference, generated)  # (target, prediction)
            for t in self.TYPES:
                totals[t] += scores[t].fmeasure
        return {t: totals[t] / len(self.references) for t in self.TYPES}


# --------------------------------------------------------------------------------------------
# bleu
# --------------------------------------------------------------------------------------------


class BleuOptions(ComponentOptions):
    tokenize: Literal["13a", "intl", "char", "zh", "none"] = "13a"
    """sacrebleu's tokenizer: ``13a`` (the WMT standard), ``intl`` (Unicode punctuation),
    ``char`` (characters, for unsegmented scripts), ``zh`` (Chinese), ``none``."""
    lowercase: bool = False
    smooth_method: Literal["exp", "floor", "add-k", "none"] = "exp"
    max_ngram_order: int = Field(4, ge=1)


class Bleu(_Generative):
    """``bleu``: corpus BLEU of the generated texts against the references, from
    ``sacrebleu`` — the brevity-penalised geometric mean of the 1- to 4-gram precisions
    pooled over the whole split (not an average of sentence scores). On sacrebleu's scale,
    0 to 100."""

    Options = BleuOptions
    name = "bleu"
    directions = {"bleu": "max"}

    def __init__(self, options: BleuOptions | None = None, task: Any = None) -> None:
        super().__init__(options or BleuOptions(), task)
        from sacrebleu.metrics import BLEU

        o = self.options
        self.metric = BLEU(tokenize=o.tokenize, lowercase=o.lowercase, smooth_method=o.smooth_method,
                           max_ngram_order=o.max_ngram_order)

    def compute(self) -> dict[str, float]:
        if not self.references:
            return {"bleu": float("nan")}
        return {"bleu": float(self.metric.corpus_score(self.generated, [self.references]).score)}


@hookimpl
def register_evaluators(register):
    register("exact_match", ExactMatch)
    register("rouge", Rouge)
    register("bleu", Bleu)
