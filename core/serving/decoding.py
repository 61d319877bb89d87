"""Sampling for the decode engine, and the row groups the host runs forwards for.

:func:`pick_tokens` chooses each row's next token (greedy or top-p sampling at the row's
temperature), safe for any logits and settings; :class:`DecodeGroup` names rows that share
a forward (scoring and classifying use it; decoding runs through
:class:`plugtune.serving.engine.DecodeEngine`). Per-row settings given as one value or one
per row are spread by :func:`as_list` and :func:`stops_per_row`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

@dataclass
class DecodeGroup:
    """Rows that share one forward (scoring, classifying, logits): ``activate(rows)`` puts
    their adapter(s) in place for ``model``."""

    rows: list[int]
    model: torch.nn.Module
    activate: Callable[[list[int]], contextlib.AbstractContextManager[Any]]


def as_list(value: Any, n: int, what: str, cast: Callable[[Any], Any] = float) -> list[Any]:
    """One value per row, from one value for all rows or one per row."""
    from plugtune.kernel.errors import AdapterError

    if isinstance(value, (int, float)):
        return [cast(value)] * n
    values = [cast(v) for v in value]
    if len(values) != n:
        raise AdapterError(f"{n} prompts but {len(values)} {what} values; give one, or one per prompt")
    return values


def stops_per_row(stop: str | Sequence[str] | Sequence[Sequence[str] | None] | None, n: int) -> list[list[str]]:
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


def eos_ids(tokenizer: Any, model_config: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(s) for s in source)
    return ids
