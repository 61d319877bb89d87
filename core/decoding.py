"""Token-by-token decoding for the adapter host: all rows of a request batch advance
together, one forward per step per *group* (rows that can share a forward: every LoRA row and
every bare-base row form one group; each prefix or full-delta adapter is a group of its own),
with the KV cache carried between steps (transformers' ``DynamicCache``).

:class:`TextStream` is what :meth:`plugtune.host.AdapterHost.stream` returns: iterate it to
get, per step, each row's new text; after (or during) iteration its ``finish_reasons`` says
why each row stopped (``"stop"``: an end-of-sequence token or a stop string; ``"length"``:
``max_new_tokens`` reached; ``None``: still running).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Start = Callable[[int], tuple[Any, int]]  # batch size -> (initial cache or None, its length)


def no_prefix(batch_size: int) -> tuple[Any, int]:
    return None, 0


@dataclass
class DecodeGroup:
    """Rows decoded by one forward per step."""

    rows: list[int]  # the request rows still decoding in this group (finished rows leave the batch)
    model: torch.nn.Module  # a transformers causal LM (takes cache, position_ids)
    activate: Callable[[list[int]], contextlib.AbstractContextManager[Any]]  # puts these rows' adapter(s) in place
    start: Start = no_prefix  # an initial cache (prefix tuning's virtual tokens)
    # decoding state
    input_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    cache: Any = None
    done: list[bool] = field(default_factory=list)


def _as_list(value: float | Sequence[float], n: int, what: str) -> list[float]:
    from .errors import AdapterError

    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise AdapterError(f"{n} prompts but {len(values)} {what} values; give one, or one per prompt")
    return values


class TextStream(Iterator[list[str]]):
    """Iterator over decoding steps: each ``next()`` runs one forward per unfinished group and
    returns the new text of every row (``''`` for a row that produced none or has finished).

    Attributes, updated as it runs: ``finish_reasons`` (``"stop"``/``"length"``/``None``),
    ``prompt_tokens`` and ``completion_tokens`` (per row), ``texts`` (the text so far)."""

    def __init__(self, tokenizer: Any, model_config: Any, texts: Sequence[str], groups: list[DecodeGroup], *,
                 max_new_tokens: int, temperature: float | Sequence[float], top_p: float | Sequence[float],
                 seed: int | None, stop: Sequence[str] | None, device: torch.device, ignore_eos: bool = False) -> None:
        n = len(texts)
        self.tokenizer = tokenizer
        self.groups = groups
        self.max_new_tokens = max_new_tokens
        self.device = device
        self.temperature = torch.tensor(_as_list(temperature, n, "temperature"), device=device)
        self.top_p = torch.tensor(_as_list(top_p, n, "top_p"), device=device)
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.stop = [s for s in (stop or []) if s]
        eos = _eos_ids(tokenizer, model_config)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
        self.eos = set() if ignore_eos else eos
        self.generated: list[list[int]] = [[] for _ in range(n)]
        self.texts = [""] * n  # emitted so far
        self.finish_reasons: list[str | None] = [None] * n
        self.completion_tokens = [0] * n
        self.prompt_tokens = [0] * n
        self._encode(texts)
        if max_new_tokens <= 0:
            self.finish_reasons = ["length"] * n

    def _encode(self, texts: Sequence[str]) -> None:
        """Left-padded prompt ids per group; an empty prompt starts from the BOS token (or an
        end-of-sequence token when the tokenizer has none), as a model needs one position."""
        encoded = self.tokenizer(list(texts))["input_ids"] if texts else []
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else min(self.eos | {self.pad})
        for g in self.groups:
            ids = [encoded[i] or [start] for i in g.rows]
            width = max(len(row) for row in ids)
            g.input_ids = torch.tensor([[self.pad] * (width - len(row)) + row for row in ids], device=self.device)
            g.mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=self.device)
            for i, row in zip(g.rows, ids):
                self.prompt_tokens[i] = len(row)
            g.done = [False] * len(g.rows)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> list[str]:
        if all(r is not None for r in self.finish_reasons):
            raise StopIteration
        new = [""] * len(self.texts)
        with torch.no_grad():
            for g in self.groups:
                if not all(g.done):
                    self._step(g, new)
        return new

    def _step(self, g: DecodeGroup, new: list[str]) -> None:
        if g.cache is None and g.positions is None:  # first step: the prompts (after any prefix)
            g.cache, offset = g.start(len(g.rows))
            g.positions = (g.mask.cumsum(-1) - 1).clamp(min=0) + offset
            if offset:
                g.mask = torch.cat([g.mask.new_ones(len(g.rows), offset), g.mask], dim=1)
        with g.activate(g.rows):
            out = g.model(input_ids=g.input_ids, attention_mask=g.mask, position_ids=g.positions,
                          cache=g.cache, use_cache=True, logits_to_keep=1)
        g.cache = out.cache
        tokens = self._pick(out.logits[:, -1, :].float(), g.rows)  # (rows,)
        picked = tokens.tolist()  # one device sync for the step, not one per row
        for j, i in enumerate(g.rows):
            if g.done[j]:
                continue
            token = picked[j]
            finished = token in self.eos
            if not finished:
                self.generated[i].append(token)
                self.completion_tokens[i] += 1
            reason = "stop" if finished else ("length" if self.completion_tokens[i] >= self.max_new_tokens else None)
            new[i] = self._emit(i, reason)
            g.done[j] = self.finish_reasons[i] is not None
        g.input_ids = tokens[:, None]
        g.mask = torch.cat([g.mask, g.mask.new_ones(len(g.rows), 1)], dim=1)
        g.positions = g.positions[:, -1:] + 1
        if any(g.done) and not all(g.done):
            self._drop_finished(g)

    @staticmethod
    def _drop_finished(g: DecodeGroup) -> None:
        """Take finished rows out of the group's batch (and its KV cache), so the remaining
        rows do not pay for them."""
        keep = [j for j, done in enumerate(g.done) if not done]
        index = torch.tensor(keep, device=g.input_ids.device)
        g.cache.batch_select_indices(index)
        g.input_ids, g.mask, g.positions = g.input_ids[index], g.mask[index], g.positions[index]
        g.rows = [g.rows[j] for j in keep]
        g.done = [False] * len(keep)

    def _pick(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Greedy for rows at temperature 0; top-p sampling at their temperature otherwise."""
        chosen = logits.argmax(-1)
        index = torch.tensor(rows, device=logits.device)
        temperature, top_p = self.temperature[index], self.top_p[index]
        sampled = (temperature > 0).nonzero().flatten()
        if len(sampled):
            probs = (logits[sampled] / temperature[sampled, None]).softmax(-1)
            sorted_probs, order = probs.sort(-1, descending=True)
            beyond = sorted_probs.cumsum(-1) - sorted_probs > top_p[sampled, None]  # keep the smallest nucleus
            sorted_probs = sorted_probs.masked_fill(beyond, 0)
            pick = torch.multinomial(sorted_probs, 1, generator=self.generator)
            chosen[sampled] = order.gather(-1, pick).flatten()
        return chosen

    def _emit(self, i: int, reason: str | None) -> str:
        """The row's new visible text; holds back what may be the start of a stop string or
        half of a multi-byte character until the next token settles it."""
        text = self.tokenizer.decode(self.generated[i], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = min((at for at in (text.find(s) for s in self.stop) if at >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif reason is None:
            text = text[: len(text) - self._held_back(text)]
        if reason is not None:
            self.finish_reasons[i] = reason
        if not text.startswith(self.texts[i]):  # a tokenizer that rewrites earlier text: emit nothing new
            return ""
        fresh = text[len(self.texts[i]):]
        self.texts[i] = text
        return fresh

    def _held_back(self, text: str) -> int:
        held = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held


def _eos_ids(tokenizer: Any, model_config: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(s) for s in source)
    return ids
