"""Tasks: how examples become model inputs and how outputs become predictions.

Two tasks ship with the core:

``causal-lm``
    ``prompt`` and ``response`` templates (``"Review: {text}\\nSentiment:"`` and
    ``" {label}"``). The model sees prompt + response + EOS; the loss covers the response
    tokens only. With a ``text`` template and no response, the loss covers every token
    (continued pre-training on raw text).
    ``label_words`` maps raw label values to the words the model should say
    (``{"0": negative, "1": positive}``), so a causal LM classifies through label words.
``sequence-classification``
    a ``text`` template and a ``label`` column; label names come from the training data
    (sorted) unless the recipe lists them.

Templates are Python format strings over the example's keys: ``{column}``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plugtune.data.labels import IGNORE_INDEX
from plugtune.kernel.components import EvalBatch

if TYPE_CHECKING:
    import torch

CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFICATION = "sequence-classification"
TASK_TYPES = (CAUSAL_LM, SEQUENCE_CLASSIFICATION)


def template_fields(template: str | None) -> set[str]:
    """The column names a template refers to (``"{a} and {b}"`` -> ``{"a", "b"}``)."""
    if not template:
        return set()
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def fill(template: str, example: dict[str, Any]) -> str:
    return template.format_map({k: "" if v is None else v for k, v in example.items()})


@dataclass
class Task:
    """A validated task block. ``labels`` is filled from the data for classification."""

    type: str
    prompt: str | None = None
    response: str | None = None
    text: str | None = None
    label: str = "label"
    labels: list[str] | None = None
    label_words: dict[str, str] | None = None

    @property
    def is_classification(self) -> bool:
        return self.type == SEQUENCE_CLASSIFICATION

    def required_fields(self) -> set[str]:
        if self.is_classification:
            return template_fields(self.text) | {self.label}
        return template_fields(self.prompt) | template_fields(self.response) | template_fields(self.text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "prompt": self.prompt,
            "response": self.response,
            "text": self.text,
            "label": self.label,
            "labels": self.labels,
            "label_words": self.label_words,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    # -- labels -------------------------------------------------------------------------

    def label_of(self, example: dict[str, Any]) -> str:
        return str(example[self.label])

    def infer_labels(self, train: list[dict[str, Any]]) -> None:
        if self.is_classification and not self.labels:
            self.labels = sorted({self.label_of(e) for e in train}, key=_natural)

    # -- encoding -----------------------------------------------------------------------

    def encode(self, example: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
        """Token ids (and labels) for one example, truncated to ``max_length``."""
        if self.is_classification:
            assert self.labels is not None
            ids = tokenizer(fill(self.text or "{text}", example), truncation=True, max_length=max_length)["input_ids"]
            label = self.label_of(example)
            if label not in self.labels:
                raise KeyError(label)
            return {"input_ids": ids, "labels": [self.labels.index(label)]}
        example = self.verbalize(example)
        if self.response is None:  # raw text: loss on every token
            ids = tokenizer(fill(self.text or "{text}", example), add_special_tokens=True)["input_ids"]
            ids = (ids + _eos(tokenizer))[:max_length]
            return {"input_ids": ids, "labels": list(ids)}
        prompt_ids = self.encode_prompt(example, tokenizer)
        response_ids = tokenizer(fill(self.response, example), add_special_tokens=False)["input_ids"] + _eos(tokenizer)
        ids = (prompt_ids + response_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
        return {"input_ids": ids, "labels": labels}

    def verbalize(self, example: dict[str, Any]) -> dict[str, Any]:
        """For causal LMs: replace the label column's value by its word (``label_words``)."""
        if not self.label_words or self.label not in example:
            return example
        value = str(example[self.label])
        return {**example, self.label: self.label_words.get(value, value)}

    def encode_prompt(self, example: dict[str, Any], tokenizer: Any) -> list[int]:
        """The prompt's ids alone: what generation starts from."""
        return tokenizer(fill(self.prompt or "", example), add_special_tokens=True)["input_ids"]

    # -- evaluation ---------------------------------------------------------------------

    def eval_batch(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> EvalBatch:
        """Per-example predictions, references and summed loss for one batch."""
        import torch

        labels = batch["labels"]
        if self.is_classification:
            # logits (B, C), labels (B,)
            per_example = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")  # (B,)
            probs = logits.float().softmax(-1)  # (B, C)
            return EvalBatch(
                predictions=logits.argmax(-1).tolist(),
                references=labels.tolist(),
                loss_sum=float(per_example.sum()),
                n_targets=int(labels.numel()),
                scores=probs.max(-1).values.tolist(),
                losses=per_example.tolist(),
            )
        # logits (B, T, V): position t predicts token t+1; the rows are built from the
        # logits at the label positions, as on the label-position path (core/loss.py)
        from plugtune.data.labels import LabelPositions, eval_batch_from_label_logits

        positions = LabelPositions.of(labels)
        logits = logits[:, logits.size(1) - labels.size(1):]  # leading virtual tokens, if any, predict no label
        return eval_batch_from_label_logits(logits[positions.rows, positions.columns], positions)

    def class_names(self) -> list[str] | None:
        return list(self.labels) if self.is_classification and self.labels else None


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _natural(label: str) -> tuple[int, Any]:
    """Sort "2" before "10" when labels are numbers."""
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def collate(rows: list[dict[str, list[int]]], pad_id: int, classification: bool) -> dict[str, torch.Tensor]:
    """Pad a list of encoded rows to the longest one (right padding)."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = (
        torch.tensor([r["labels"][0] for r in rows], dtype=torch.long)
        if classification
        else torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    )
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"])
        attention[i, :n] = 1
        if not classification:
            labels[i, :n] = torch.tensor(r["labels"])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
