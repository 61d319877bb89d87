"""Token-level data augmentation of training batches: ``word_dropout`` and ``span_mask``.

Both replace input tokens of *training* batches with the tokenizer's mask token (or its
unknown token) — the core calls ``transform_batch`` on training batches only, so evaluation
always sees the data as it is. The model must then get the answer from partial input, which
stops it from memorising a small training set through a few telltale words.

``word_dropout``
    Each eligible token independently, with probability ``p`` (0.1-0.2 is typical). Use it
    for classification on small data sets, where one memorised word can decide a label.
``span_mask``
    Contiguous spans (mean length ``span``) covering a fraction ``p`` of each row's eligible
    tokens. Use it when neighbouring tokens give each other away (sub-word pieces of one
    word, multi-word phrases), so dropping single tokens is too easy to undo.

Eligible tokens: not padding (``attention_mask == 1``), not special tokens (``[CLS]``,
``<s>``, ...). For causal LMs only prompt tokens (``labels == -100``) are eligible: the
response the loss is computed on is never changed, so a raw-text task (loss on every token)
is left untouched. Labels are never changed.

Randomness comes from a ``torch.Generator`` seeded with ``seed``, so runs are repeatable.
``<name>/fraction`` (changed / eligible tokens since the last step) is logged every step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from plugtune import hookimpl
from plugtune.sdk import ComponentOptions

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100


class _TokenAugmenter:
    """Shared machinery: replacement token, eligibility, generator, bookkeeping."""

    def __init__(self, options: Any) -> None:
        self.options = options
        self.replacement: int | None = None
        self.special: list[int] = []
        self.classification = False
        self.generator: Any = None
        self.changed = 0
        self.eligible = 0

    def setup(self, model: Any, task: Any, tokenizer: Any) -> None:
        import torch

        from plugtune.sdk import TrainingError

        mask = getattr(tokenizer, "mask_token_id", None)
        unk = getattr(tokenizer, "unk_token_id", None)
        choice = self.options.token
        if choice == "auto":
            self.replacement = mask if mask is not None else unk
        else:
            self.replacement = mask if choice == "mask" else unk
        if self.replacement is None:
            raise TrainingError(f"{type(self).__name__}: the tokenizer has no "
                                f"{'mask or unknown' if choice == 'auto' else choice} token to replace tokens with")
        self.special = sorted((set(getattr(tokenizer, "all_special_ids", []) or []) | {tokenizer.pad_token_id}) - {None})
        self.classification = bool(task.is_classification)
        self.generator = torch.Generator().manual_seed(self.options.seed)

    def eligible_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) bool: tokens that may be replaced."""
        import torch

        ids = batch["input_ids"]
        ok = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(ids, dtype=torch.bool)
        if self.special:
            ok &= ~torch.isin(ids, torch.tensor(self.special, device=ids.device))
        if not self.classification:
            labels = batch.get("labels")
            if labels is not None and labels.shape == ids.shape:
                ok &= labels == IGNORE_INDEX  # prompt tokens only; the response is what is learnt
        return ok

    def choose(self, eligible: torch.Tensor) -> torch.Tensor:  # (B, T) bool on CPU
        raise NotImplementedError

    def transform_batch(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        if self.replacement is None or self.options.p == 0:
            return batch
        eligible = self.eligible_mask(batch)
        chosen = self.choose(eligible.cpu()).to(eligible.device) & eligible
        self.changed += int(chosen.sum())
        self.eligible += int(eligible.sum())
        return {**batch, "input_ids": batch["input_ids"].masked_fill(chosen, self.replacement)}

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints: the generator's position and the counts since the last report."""
        return {"generator": self.generator.get_state() if self.generator is not None else None,
                "changed": self.changed, "eligible": self.eligible}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
        self.changed, self.eligible = int(state.get("changed", 0)), int(state.get("eligible", 0))

    def report(self, model: Any) -> dict[str, float]:
        fraction = self.changed / self.eligible if self.eligible else 0.0
        self.changed = self.eligible = 0
        return {"fraction": fraction}


class WordDropoutOptions(ComponentOptions):
    p: float = Field(0.1, ge=0, le=1, description="probability that an eligible token is replaced")
    token: Literal["auto", "mask", "unk"] = Field("auto", description="replacement: auto = mask token if the tokenizer has one, else unk")
    seed: int = 0


class WordDropout(_TokenAugmenter):
    """Replaces each eligible token with probability ``p``."""

    Options = WordDropoutOptions

    def choose(self, eligible: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.rand(eligible.shape, generator=self.generator) < self.options.p


class SpanMaskOptions(ComponentOptions):
    p: float = Field(0.15, ge=0, le=1, description="fraction of each row's eligible tokens to mask")
    span: float = Field(3.0, ge=1, description="mean span length (geometric distribution)")
    token: Literal["auto", "mask", "unk"] = Field("auto", description="replacement: auto = mask token if the tokenizer has one, else unk")
    seed: int = 0


class SpanMask(_TokenAugmenter):
    """Masks spans of geometric length (mean ``span``) over the eligible tokens of each row
    until ``p`` of them are masked (SpanBERT-style budget; the budget is rounded up or down at
    random so that its expectation is exactly ``p`` times the eligible count). Spans run over
    consecutive eligible tokens, e.g. across a prompt, never into padding or the response."""

    Options = SpanMaskOptions

    def _uniform(self) -> float:
        import torch

        return float(torch.rand((), generator=self.generator))

    def choose(self, eligible: torch.Tensor) -> torch.Tensor:
        import torch

        p, mean = self.options.p, self.options.span
        chosen = torch.zeros_like(eligible)
        for row in range(eligible.size(0)):
            positions = eligible[row].nonzero().flatten().tolist()
            n = len(positions)
            target = min(n, math.floor(p * n + self._uniform()))
            covered = [False] * n
            count = attempts = 0
            while count < target and attempts < 100 * n:
                attempts += 1
                start = min(n - 1, int(self._uniform() * n))
                if mean > 1:  # geometric on {1, 2, ...} with mean `span`
                    length = 1 + math.floor(math.log(max(self._uniform(), 1e-12)) / math.log1p(-1.0 / mean))
                else:
                    length = 1
                for j in range(start, min(n, start + length)):
                    if not covered[j]:
                        covered[j] = True
                        count += 1
                        if count >= target:
                            break
            for j, hit in enumerate(covered):
                if hit:
                    chosen[row, positions[j]] = True
        return chosen


@hookimpl
def register_regularizers(register):
    register("word_dropout", WordDropout)
    register("span_mask", SpanMask)
