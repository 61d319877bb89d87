"""Classification metrics over the per-example predictions the task produces: ``accuracy``,
``f1``, ``precision``, ``recall`` (macro) and ``confusion_matrix``.

For sequence classification a prediction is the argmax class. For a causal LM it is the
greedy continuation over the response tokens, so ``accuracy`` is exact match under greedy
decoding (computed in one teacher-forced forward pass) and the other metrics treat each
distinct reference response as a class.

Class names (for ``per_class: true`` and ``confusion_matrix``): the task's label names for
sequence classification; for a causal LM, the filled response template of the examples whose
reference it is (the label word, with ``label_words``), read from ``EvalBatch.examples``. A
causal-LM prediction that is no reference in the split is named ``<other>``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from plugtune import hookimpl
from plugtune.sdk import ComponentOptions, EvalBatch, NoOptions

OTHER = "<other>"


class Accuracy:
    """Fraction of examples whose prediction equals the reference."""

    Options = NoOptions
    directions = {"accuracy": "max"}

    def __init__(self, options: Any = None, task: Any = None) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, batch: EvalBatch) -> None:
        self.correct += sum(p == r for p, r in zip(batch.predictions, batch.references))
        self.total += len(batch.references)

    def compute(self) -> dict[str, float]:
        return {"accuracy": self.correct / self.total if self.total else float("nan")}


class _ClassNames:
    """Names the classes of a split: label names, or a causal LM's reference texts."""

    def __init__(self, task: Any) -> None:
        self.task = task
        self.reset()

    def reset(self) -> None:
        self.seen: dict[Any, str] = {}  # reference value -> its text (causal LM)

    def update(self, batch: EvalBatch) -> None:
        task = self.task
        if task is None or task.is_classification or not task.generates or not batch.examples:
            return
        for ref, example in zip(batch.references, batch.examples):
            if ref not in self.seen:
                self.seen[ref] = task.reference_text(dict(example)) or ""

    def labels(self) -> list[str] | None:
        """Every class of a classification task, in the task's order."""
        if self.task is not None and self.task.is_classification and self.task.labels:
            return list(self.task.labels)
        return None

    def name(self, value: Any, reference_values: set[Any]) -> str:
        labels = self.labels()
        if labels is not None and isinstance(value, int) and 0 <= value < len(labels):
            return labels[value]
        if value in self.seen:
            return self.seen[value]
        if self.task is not None and not self.task.is_classification and value not in reference_values:
            return OTHER
        if isinstance(value, tuple):
            return " ".join(map(str, value))
        return str(value)


class PerClassOptions(ComponentOptions):
    per_class: bool = False
    """Also report ``<metric>/<class name>`` for every class (see the module docstring)."""


class _MacroMetric:
    """Counts true positives, false positives and false negatives per class; subclasses
    turn them into one score per class and average those without weights over the classes
    seen as a reference or a prediction (as scikit-learn's ``average="macro"``). A class
    whose score has a zero denominator scores 0 (scikit-learn's ``zero_division=0``)."""

    Options = PerClassOptions
    key = ""

    def __init__(self, options: PerClassOptions | None = None, task: Any = None) -> None:
        self.options = options or PerClassOptions()
        self.task = task
        self.names = _ClassNames(task)
        self.reset()

    def reset(self) -> None:
        self.tp: Counter[Any] = Counter()
        self.fp: Counter[Any] = Counter()
        self.fn: Counter[Any] = Counter()
        self.names.reset()

    def update(self, batch: EvalBatch) -> None:
        for p, r in zip(batch.predictions, batch.references):
            if p == r:
                self.tp[r] += 1
            else:
                self.fp[p] += 1
                self.fn[r] += 1
        if self.options.per_class:
            self.names.update(batch)

    @staticmethod
    def score(tp: int, fp: int, fn: int) -> float:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        classes = set(self.tp) | set(self.fp) | set(self.fn)
        if not classes:
            return {self.key: float("nan")}
        metrics = {self.key: sum(self.score(self.tp[c], self.fp[c], self.fn[c]) for c in classes) / len(classes)}
        if self.options.per_class:
            metrics.update(self._per_class(classes))
        return metrics

    def _per_class(self, classes: set[Any]) -> dict[str, float]:
        labels = self.names.labels()
        if labels is not None:
            # every label of the task, in order; one absent from the split is undefined (nan)
            out = {}
            for i, label in enumerate(labels):
                present = i in classes
                out[f"{self.key}/{label}"] = self.score(self.tp[i], self.fp[i], self.fn[i]) if present else float("nan")
            return out
        references = set(self.tp) | set(self.fn)
        merged: dict[str, list[int]] = {}
        for c in sorted(references, key=repr):  # causal LM: the reference classes, by their text
            counts = merged.setdefault(self.names.name(c, references), [0, 0, 0])
            counts[0] += self.tp[c]
            counts[1] += self.fp[c]
            counts[2] += self.fn[c]
        return {f"{self.key}/{name}": self.score(*counts) for name, counts in sorted(merged.items())}


class MacroF1(_MacroMetric):
    """Macro F1: the unweighted mean over classes of F1 = 2TP / (2TP + FP + FN), the
    harmonic mean of precision and recall."""

    key = "f1"
    directions = {"f1": "max", "f1/*": "max"}

    @staticmethod
    def score(tp: int, fp: int, fn: int) -> float:
        denom = 2 * tp + fp + fn
        return 2 * tp / denom if denom else 0.0


class MacroPrecision(_MacroMetric):
    """Macro precision: the unweighted mean over classes of TP / (TP + FP), of the examples
    predicted as a class, the fraction that are that class."""

    key = "precision"
    directions = {"precision": "max", "precision/*": "max"}

    @staticmethod
    def score(tp: int, fp: int, fn: int) -> float:
        return tp / (tp + fp) if tp + fp else 0.0


class MacroRecall(_MacroMetric):
    """Macro recall: the unweighted mean over classes of TP / (TP + FN), of the examples of a
    class, the fraction predicted as that class (balanced accuracy)."""

    key = "recall"
    directions = {"recall": "max", "recall/*": "max"}

    @staticmethod
    def score(tp: int, fp: int, fn: int) -> float:
        return tp / (tp + fn) if tp + fn else 0.0


class ConfusionOptions(ComponentOptions):
    normalize: bool = False
    """Divide each row by its true class's count (each row then sums to 1; recall on the
    diagonal) instead of reporting counts."""


class ConfusionMatrix:
    """The confusion matrix as flat metrics: ``confusion/<true>/<predicted>`` is the number
    of examples of class ``<true>`` predicted as ``<predicted>``. For sequence classification
    every pair of the task's labels is reported, zeros included; for a causal LM, every pair
    of reference classes seen in the split, plus ``<other>`` as a predicted class when some
    prediction matched no reference.

    Its cells declare no direction (more is better on the diagonal, worse off it): they are
    shown, never selected on. :meth:`details` gives the same cells as one matrix."""

    Options = ConfusionOptions
    directions: dict[str, str] = {}

    def __init__(self, options: ConfusionOptions | None = None, task: Any = None) -> None:
        self.options = options or ConfusionOptions()
        self.names = _ClassNames(task)
        self.reset()

    def reset(self) -> None:
        self.pairs: Counter[tuple[Any, Any]] = Counter()
        self.names.reset()

    def update(self, batch: EvalBatch) -> None:
        self.pairs.update(zip(batch.references, batch.predictions))
        self.names.update(batch)

    def _cells(self) -> tuple[list[str], list[str], Counter[tuple[str, str]], Counter[str]]:
        """The true and predicted class names, in order, the count of each (true, predicted)
        pair and each true class's total."""
        references = {r for r, _ in self.pairs}
        counts: Counter[tuple[str, str]] = Counter()
        for (r, p), n in self.pairs.items():
            counts[self.names.name(r, references), self.names.name(p, references)] += n
        labels = self.names.labels()
        if labels is not None:
            true_names = labels
            pred_names = labels + sorted({p for _, p in counts} - set(labels))  # + an index outside the labels
        else:
            true_names = sorted({t for t, _ in counts})
            pred_names = true_names + sorted({p for _, p in counts} - set(true_names))
        totals: Counter[str] = Counter()
        for (t, _), n in counts.items():
            totals[t] += n
        return true_names, pred_names, counts, totals

    def _value(self, counts: Counter[tuple[str, str]], totals: Counter[str], t: str, p: str) -> float:
        n = counts[t, p]
        return (n / totals[t] if totals[t] else float("nan")) if self.options.normalize else n

    def compute(self) -> dict[str, float]:
        true_names, pred_names, counts, totals = self._cells()
        return {f"confusion/{t}/{p}": self._value(counts, totals, t, p) for t in true_names for p in pred_names}

    def details(self) -> dict[str, dict[str, Any]]:
        """The same cells as one matrix (the log's ``details``, a heatmap in ``plugtune report``):
        rows the true classes, columns the predicted ones; a NaN cell (normalized, a class
        absent from the split) is null."""
        true_names, pred_names, counts, totals = self._cells()
        values = [[None if (v := self._value(counts, totals, t, p)) != v else v for p in pred_names] for t in true_names]
        return {"confusion_matrix": {"kind": "matrix", "rows": true_names, "columns": pred_names, "values": values,
                                     "row_title": "true", "column_title": "predicted", "metrics_prefix": "confusion/",
                                     "normalized": self.options.normalize}}


@hookimpl
def register_evaluators(register):
    register("accuracy", Accuracy)
    register("f1", MacroF1)
    register("precision", MacroPrecision)
    register("recall", MacroRecall)
    register("confusion_matrix", ConfusionMatrix)
