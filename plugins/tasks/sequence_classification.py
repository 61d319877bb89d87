"""``sequence-classification``: one class per example on a classifier head.

A ``text`` template and a ``label`` column; the label names come from the training data
(sorted, numbers numerically) unless the recipe lists them as ``labels``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from plugtune import hookimpl
from plugtune.sdk import (
    ComponentOptions,
    DataError,
    EvalBatch,
    Example,
    Head,
    Labels,
    Task,
    Template,
    collate,
    fill,
    fill_one,
    natural_key,
    template_fields,
)

if TYPE_CHECKING:
    import torch


class SequenceClassificationOptions(ComponentOptions):
    text: Template | None = None  # default "{text}"
    label: str = "label"
    labels: Labels = None


class SequenceClassification(Task):
    """Text -> one of ``labels``; the options are plain attributes."""

    Options = SequenceClassificationOptions
    head: ClassVar[Head] = "classifier"
    generates: ClassVar[bool] = False

    def __init__(self, options: SequenceClassificationOptions, name: str) -> None:
        self.type = name
        self.text = options.text
        self.label = options.label
        self.labels = options.labels

    def required_fields(self) -> set[str]:
        return template_fields(self.text) | {self.label}

    def setup(self, train: list[Example]) -> None:
        """Fix the label names from the training data when the recipe lists none."""
        if not self.labels:
            self.labels = sorted({str(e[self.label]) for e in train}, key=natural_key)

    def encode(self, example: Example, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
        assert self.labels is not None, "setup() fixes the labels before encoding"
        ids = tokenizer(fill(self.text or "{text}", example), truncation=True, max_length=max_length)["input_ids"]
        label = str(example[self.label])
        if label not in self.labels:
            raise DataError(f"label {label!r} never appears in the training data (labels: {', '.join(self.labels)})")
        return {"input_ids": ids, "labels": [self.labels.index(label)]}

    def collate(self, rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(rows, pad_id, classification=True)

    def eval_batch(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> EvalBatch:
        import torch

        labels = batch["labels"]  # (B,)
        per_example = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")  # (B,) from (B, C)
        probs = logits.float().softmax(-1)  # (B, C)
        return EvalBatch(
            predictions=logits.argmax(-1).tolist(),
            references=labels.tolist(),
            loss_sum=float(per_example.sum()),
            n_targets=int(labels.numel()),
            scores=probs.max(-1).values.tolist(),
            losses=per_example.tolist(),
        )

    def encode_prompt(self, example: Example, tokenizer: Any) -> list[int]:
        return tokenizer(fill(self.text or "{text}", example), add_special_tokens=True)["input_ids"]

    def reference_text(self, example: Example) -> str | None:
        return None

    def format_prompt(self, text: str) -> str | None:
        return fill_one(self.text, text)

    def __eq__(self, other: object) -> bool:
        """Same task: same class and same recorded fields (as the manifest would show)."""
        return type(other) is type(self) and other.to_dict() == self.to_dict()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable: setup() fills the labels

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "text": self.text, "label": self.label, "labels": self.labels}


@hookimpl
def register_tasks(register: Any) -> None:
    register("sequence-classification", SequenceClassification)
