"""``causal-lm``: train a language-model head on prompt -> response (or raw text).

``prompt`` and ``response`` templates (``"Review: {text}\\nSentiment:"`` and ``" {label}"``):
the model sees prompt + response + EOS and the loss covers the response tokens only. With a
``text`` template and no response, the loss covers every token (continued pre-training on
raw text). ``label_words`` maps raw label values to the words the model should say
(``{"0": negative, "1": positive}``), so a causal LM classifies through label words.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import model_validator

from plugtune import hookimpl
from plugtune.sdk import (
    ComponentOptions,
    EvalBatch,
    Example,
    Head,
    IGNORE_INDEX,
    LabelPositions,
    LabelWords,
    Labels,
    Task,
    Template,
    collate,
    eval_batch_from_label_logits,
    fill,
    fill_one,
    template_fields,
)

if TYPE_CHECKING:
    import torch


class CausalLmOptions(ComponentOptions):
    prompt: Template | None = None
    response: Template | None = None
    text: Template | None = None
    label: str = "label"
    labels: Labels = None
    label_words: LabelWords = None

    @model_validator(mode="after")
    def _templates(self) -> CausalLmOptions:
        if self.response is not None and self.prompt is None:
            raise ValueError("a causal-lm task with a 'response' template needs a 'prompt' template")
        if self.response is None and self.text is None:
            raise ValueError("a causal-lm task needs 'prompt' and 'response' templates, or a 'text' template for raw text")
        return self


class CausalLm(Task):
    """Prompt -> response on a language-model head; the options are plain attributes."""

    Options = CausalLmOptions
    head: ClassVar[Head] = "lm"

    def __init__(self, options: CausalLmOptions, name: str) -> None:
        self.type = name
        self.prompt = options.prompt
        self.response = options.response
        self.text = options.text
        self.label = options.label
        self.labels = options.labels
        self.label_words = options.label_words

    @classmethod
    def for_raw_prompts(cls, name: str) -> CausalLm:
        """The text given is the whole prompt; generation continues it."""
        return cls(CausalLmOptions.model_construct(prompt="{text}", response="", text=None, label="label",
                                                   labels=None, label_words=None), name)

    @property
    def generates(self) -> bool:  # type: ignore[override]
        return self.response is not None

    def required_fields(self) -> set[str]:
        return template_fields(self.prompt) | template_fields(self.response) | template_fields(self.text)

    def setup(self, train: list[Example]) -> None:
        """Nothing to learn from the data: the templates say everything."""

    def verbalize(self, example: Example) -> Example:
        """Replace the label column's value by its word (``label_words``)."""
        if not self.label_words or self.label not in example:
            return example
        value = str(example[self.label])
        return {**example, self.label: self.label_words.get(value, value)}

    def encode(self, example: Example, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
        example = self.verbalize(example)
        if self.response is None:  # raw text: loss on every token
            ids = tokenizer(fill(self.text or "{text}", example), add_special_tokens=True)["input_ids"]
            ids = (ids + _eos(tokenizer))[:max_length]
            return {"input_ids": ids, "labels": list(ids)}
        prompt_ids = self._prompt_ids(example, tokenizer)
        response_ids = tokenizer(fill(self.response, example), add_special_tokens=False)["input_ids"] + _eos(tokenizer)
        ids = (prompt_ids + response_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
        return {"input_ids": ids, "labels": labels}

    def collate(self, rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(rows, pad_id, classification=False)

    def eval_batch(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> EvalBatch:
        # logits (B, T, V): position t predicts token t+1; the rows are built from the logits
        # at the label positions, as on the label-position path (core/training/loss.py)
        labels = batch["labels"]  # (B, T)
        positions = LabelPositions.of(labels)
        logits = logits[:, logits.size(1) - labels.size(1):]  # leading virtual tokens, if any, predict no label
        return eval_batch_from_label_logits(logits[positions.rows, positions.columns], positions)

    def encode_prompt(self, example: Example, tokenizer: Any) -> list[int]:
        return self._prompt_ids(self.verbalize(example), tokenizer)

    def _prompt_ids(self, example: Example, tokenizer: Any) -> list[int]:
        return tokenizer(fill(self.prompt or "", example), add_special_tokens=True)["input_ids"]

    def reference_text(self, example: Example) -> str | None:
        return None if self.response is None else fill(self.response, self.verbalize(example)).strip()

    def format_prompt(self, text: str) -> str | None:
        return fill_one(self.prompt, text)

    def label_response(self, label: str) -> str | None:
        """The response this task trains for ``label`` (the response template filled with the
        label's word), so that a server can hold generation to the label words
        (``guided_choice: "labels"``); ``None`` when the template needs other fields."""
        if self.response is None or template_fields(self.response) - {self.label}:
            return None
        return fill(self.response, self.verbalize({self.label: label}))

    def __eq__(self, other: object) -> bool:
        """Same task: same class and same recorded fields (as the manifest would show)."""
        return type(other) is type(self) and other.to_dict() == self.to_dict()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable: setup() fills the labels

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "prompt": self.prompt, "response": self.response, "text": self.text,
                "label": self.label, "labels": self.labels, "label_words": self.label_words}


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


@hookimpl
def register_tasks(register: Any) -> None:
    register("causal-lm", CausalLm)
