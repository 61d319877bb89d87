"""Token-by-token decoding for the adapter host: all rows of a request batch advance
together, one forward per step per *group* (rows that can share a forward: every LoRA row and
every bare-base row form one group; each prefix or full-delta adapter is a group of its own),
with the KV cache carried between steps (transformers' ``DynamicCache``).

:class:`TextStream` is what :meth:`plugtune.serving.host.AdapterHost.stream` returns: iterate it to
get, per step, each row's new text; after (or during) iteration its ``finish_reasons`` says
why each row stopped (``"stop"``: an end-of-sequence token or a stop string; ``"length"``:
``max_new_tokens`` reached; ``"cancelled"``: :meth:`TextStream.cancel`; ``None``: still
running).

Stop strings and ``max_new_tokens`` may be given per row, so that one batch serves requests
with different settings (the server does). A row leaves its group's batch, KV-cache rows
included, in the step it finishes or when it is cancelled: rows cut early cost nothing more.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
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
    start: Start = no_prefix  # an initial cache (prefix tuning's virtual tokens), made with the group's adapter active
    # decoding state
    input_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    cache: Any = None


def _as_list(value: Any, n: int, what: str, cast: Callable[[Any], Any] = float) -> list[Any]:
    """One value per row, from one value for all rows or one per row."""
    from plugtune.kernel.errors import AdapterError

    if isinstance(value, (int, float)):
        return [cast(value)] * n
    values = [cast(v) for v in value]
    if len(values) != n:
        raise AdapterError(f"{n} prompts but {len(values)} {what} values; give one, or one per prompt")
    return values


def _stops_per_row(stop: str | Sequence[str] | Sequence[Sequence[str] | None] | None, n: int) -> list[list[str]]:
    """One list of stop strings per row (empty strings dropped), from ``None``, one string or
    one list of strings for all rows, or one list (or ``None``) per row."""
    from plugtune.kernel.errors import AdapterError

    if stop is None:
        return [[] for _ in range(n)]
    if isinstance(stop, str):
        stop = [stop]
    if all(isinstance(s, str) for s in stop):
        return [[s for s in stop if s] for _ in range(n)]
    if len(stop) != n or any(isinstance(s, str) for s in stop):
        raise AdapterError(f"{n} prompts but stop is neither a list of strings for all of them nor one list per prompt "
                           f"(got {len(stop)} items)")
    return [[s for s in (row or []) if s] for row in stop]


class TextStream(Iterator[list[str]]):
    """Iterator over decoding steps: each ``next()`` runs one forward per unfinished group and
    returns the new text of every row (``''`` for a row that produced none or has finished).

    ``max_new_tokens`` is one budget for all rows or one per row; ``stop`` is one list of stop
    strings for all rows or one list per row. :meth:`cancel` takes a row out at once.

    Attributes, updated as it runs: ``finish_reasons`` (``"stop"``/``"length"``/
    ``"cancelled"``/``None``), ``prompt_tokens`` and ``completion_tokens`` (per row), ``texts``
    (the text so far); ``max_new_tokens`` and ``stop`` hold the per-row values."""

    def __init__(self, tokenizer: Any, model_config: Any, texts: Sequence[str | Sequence[int]], groups: list[DecodeGroup], *,
                 max_new_tokens: int | Sequence[int], temperature: float | Sequence[float],
                 top_p: float | Sequence[float], seed: int | None,
                 stop: str | Sequence[str] | Sequence[Sequence[str] | None] | None, device: torch.device,
                 ignore_eos: bool = False, stop_ids: Sequence[Collection[int]] | None = None) -> None:
        n = len(texts)
        self.tokenizer = tokenizer
        self.groups = groups
        self.max_new_tokens: list[int] = _as_list(max_new_tokens, n, "max_new_tokens", cast=int)
        self.device = device
        self.temperature = torch.tensor(_as_list(temperature, n, "temperature"), device=device)
        self.top_p = torch.tensor(_as_list(top_p, n, "top_p"), device=device)
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.stop = _stops_per_row(stop, n)
        eos = _eos_ids(tokenizer, model_config)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
        self.eos = set() if ignore_eos else eos
        # per row, tokens that end it besides EOS (a chat adapter's end-of-turn token)
        self.row_eos = [set() if ignore_eos else set(ids) for ids in (stop_ids or [()] * n)]
        self.generated: list[list[int]] = [[] for _ in range(n)]
        self.texts = [""] * n  # emitted so far
        self.finish_reasons: list[str | None] = [None] * n
        self.completion_tokens = [0] * n
        self.prompt_tokens = [0] * n
        self._encode(texts)
        for i, budget in enumerate(self.max_new_tokens):
            if budget <= 0:  # nothing to decode: the row never enters a forward
                self.finish_reasons[i] = "length"
                self._leave_group(i)

    def _encode(self, texts: Sequence[str]) -> None:
        """Left-padded prompt ids per group; an empty prompt starts from the BOS token (or an
        end-of-sequence token when the tokenizer has none), as a model needs one position."""
        words = [i for i, t in enumerate(texts) if isinstance(t, str)]
        encoded: list[list[int]] = [list(t) if not isinstance(t, str) else [] for t in texts]  # ids are used as given
        for i, ids in zip(words, self.tokenizer([texts[i] for i in words])["input_ids"] if words else []):
            encoded[i] = ids
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else min(self.eos | {self.pad})
        for g in self.groups:
            ids = [encoded[i] or [start] for i in g.rows]
            width = max(len(row) for row in ids)
            g.input_ids = torch.tensor([[self.pad] * (width - len(row)) + row for row in ids], device=self.device)
            g.mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=self.device)
            for i, row in zip(g.rows, ids):
                self.prompt_tokens[i] = len(row)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> list[str]:
        if all(r is not None for r in self.finish_reasons):
            raise StopIteration
        new = [""] * len(self.texts)
        with torch.no_grad():
            for g in self.groups:
                if g.rows:  # a group whose rows have all finished runs no forward
                    self._step(g, new)
        return new

    def cancel(self, i: int) -> None:
        """Stop decoding row ``i`` now (the server calls it when a client goes away): it leaves
        its group's batch and KV cache before the next step, keeps the text it has, and its
        finish reason becomes ``"cancelled"``. The other rows decode on as before. A row that
        has already finished is left as it is."""
        if self.finish_reasons[i] is None:
            self.finish_reasons[i] = "cancelled"
            self._leave_group(i)

    def _leave_group(self, i: int) -> None:
        g = next(g for g in self.groups if i in g.rows)
        self._drop(g, [j for j, row in enumerate(g.rows) if row != i])

    def _step(self, g: DecodeGroup, new: list[str]) -> None:
        with g.activate(g.rows):  # the start too: it may run the base (a soft prompt's virtual tokens)
            if g.cache is None and g.positions is None:  # first step: the prompts (after any prefix)
                g.cache, offset = g.start(len(g.rows))
                g.positions = (g.mask.cumsum(-1) - 1).clamp(min=0) + offset
                if offset:
                    g.mask = torch.cat([g.mask.new_ones(len(g.rows), offset), g.mask], dim=1)
            out = g.model(input_ids=g.input_ids, attention_mask=g.mask, position_ids=g.positions,
                          cache=g.cache, use_cache=True, logits_to_keep=1)
        g.cache = out.cache
        tokens = self._pick(out.logits[:, -1, :].float(), g.rows)  # (rows,)
        picked = tokens.tolist()  # one device sync for the step, not one per row
        for j, i in enumerate(g.rows):
            token = picked[j]
            finished = token in self.eos or token in self.row_eos[i]
            if not finished:
                self.generated[i].append(token)
                self.completion_tokens[i] += 1
            reason = "stop" if finished else ("length" if self.completion_tokens[i] >= self.max_new_tokens[i] else None)
            new[i] = self._emit(i, reason)
        g.input_ids = tokens[:, None]
        g.mask = torch.cat([g.mask, g.mask.new_ones(len(g.rows), 1)], dim=1)
        g.positions = g.positions[:, -1:] + 1
        keep = [j for j, i in enumerate(g.rows) if self.finish_reasons[i] is None]
        if len(keep) < len(g.rows):
            self._drop(g, keep)

    @staticmethod
    def _drop(g: DecodeGroup, keep: list[int]) -> None:
        """Keep only rows ``keep`` (positions in ``g.rows``) in the group's batch and KV cache,
        so that the remaining rows do not pay for finished or cancelled ones; a group left
        empty lets its cache go. Works before the first step too (no cache, no positions yet:
        the prompts alone are narrowed)."""
        g.rows = [g.rows[j] for j in keep]
        if not keep:
            g.cache = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=g.input_ids.device)
        if g.cache is not None:
            g.cache.batch_select_indices(index)
        g.input_ids, g.mask = g.input_ids[index], g.mask[index]
        if g.positions is not None:
            g.positions = g.positions[index]

    def _pick(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Each row's next token: see :func:`pick_tokens`."""
        index = torch.tensor(rows, device=logits.device)
        return pick_tokens(logits, self.temperature[index], self.top_p[index], self.generator)

    def _emit(self, i: int, reason: str | None) -> str:
        """The row's new visible text; holds back what may be the start of a stop string or
        half of a multi-byte character until the next token settles it."""
        text = self.tokenizer.decode(self.generated[i], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = min((at for at in (text.find(s) for s in self.stop[i]) if at >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif reason is None:
            text = text[: len(text) - self._held_back(text, self.stop[i])]
        if reason is not None:
            self.finish_reasons[i] = reason
        if not text.startswith(self.texts[i]):  # a tokenizer that rewrites earlier text: emit nothing new
            return ""
        fresh = text[len(self.texts[i]):]
        self.texts[i] = text
        return fresh

    @staticmethod
    def _held_back(text: str, stops: list[str]) -> int:
        """How many characters at the end of ``text`` to hold back: half of a multi-byte
        character, or the longest end that begins one of the row's stop strings."""
        held = len(text) - len(text.rstrip("\ufffd"))
        for s in stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held


GREEDY_BELOW = 1e-5
"""Temperatures under this are decoded greedily: the distribution is a point mass on the top
token for all practical purposes, and dividing by such a temperature is where the
probabilities overflow (``temperature: 1e-39`` made them NaN)."""
TOP_P_FLOOR = 1e-12
"""The least nucleus mass used: a smaller (or zero) ``top_p`` keeps the top token alone, as it would."""


def sampling_probabilities(logits: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of ``logits / temperature`` per row, in float64 and finite for any logits
    (NaN counts as impossible, +inf as the largest finite value) and any positive
    temperature: the row maximum is subtracted before dividing, so every scaled logit is at
    most 0 and the top token's term is exactly 1. Returns ``(probs, usable)``: ``usable`` is
    False for rows with no finite logit at all (every token NaN or -inf), whose ``probs``
    are zero and which must be decoded greedily."""
    x = torch.nan_to_num(logits.double(), nan=float("-inf"), posinf=torch.finfo(torch.float64).max, neginf=float("-inf"))
    top = x.max(-1, keepdim=True).values
    usable = torch.isfinite(top).flatten()
    scaled = (x - top.nan_to_num(neginf=0.0)) / temperature.double().clamp(min=GREEDY_BELOW)[:, None]
    probs = scaled.nan_to_num(nan=float("-inf")).softmax(-1)
    return torch.where(usable[:, None], probs, torch.zeros_like(probs)), usable


def pick_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token per row of ``logits`` (rows, vocabulary): greedy where the row's
    temperature is under :data:`GREEDY_BELOW` or its logits have no finite value; top-p
    sampling at the row's temperature otherwise. Safe at every temperature and ``top_p``
    the server allows (and beyond: 0, subnormals, logits with inf or NaN): the sampling
    runs on float64 probabilities that are finite and sum to 1 (see
    :func:`sampling_probabilities`), and the nucleus always keeps the top token."""
    # nan_to_num would turn +inf into the largest float (a tie with a finite logit of that size): keep it infinite
    chosen = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")).argmax(-1)
    sampled = (temperature >= GREEDY_BELOW).nonzero().flatten()
    if len(sampled):
        probs, usable = sampling_probabilities(logits[sampled], temperature[sampled])
        sampled, probs = sampled[usable], probs[usable]
    if len(sampled):
        sorted_probs, order = probs.sort(-1, descending=True)
        nucleus = top_p[sampled].double().clamp(min=TOP_P_FLOOR)[:, None]
        beyond = sorted_probs.cumsum(-1) - sorted_probs > nucleus  # the smallest nucleus; the top token always stays
        sorted_probs = sorted_probs.masked_fill(beyond, 0)
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        chosen[sampled] = order.gather(-1, pick).flatten()
    return chosen


def _eos_ids(tokenizer: Any, model_config: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(s) for s in source)
    return ids
