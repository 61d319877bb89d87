"""The decode engine: continuous batching for one base model and its adapters.

Rows (one prompt each, with its own adapter, sampling, budget, stop strings, logprobs and
output constraint) can be added at any time; :meth:`DecodeEngine.step` advances every row
by one step and returns what each produced. Within a step:

1. **admission**: waiting rows join, oldest first, while fewer than ``max_rows`` run;
2. **prefill**: rows that joined feed their prompts in chunks of at most ``chunk_tokens``
   tokens, the whole step held to ``step_tokens`` (the running rows' decode tokens count
   first), so a long prompt takes several steps instead of stalling the others; a prompt's
   last chunk gives its first token;
3. **decode**: the running rows of each *group* advance one token in one forward, their KV
   caches side by side (left-padded, rows of different lengths masked apart); a row whose
   prompt is prefilled merges into its group's decode batch, and a finished row leaves it
   in the step it finishes.

A group is a set of rows that can share a forward (:class:`GroupParts`, made by the host):
every row whose adapter's handler mixes rows, and every bare-base row, share one; each
adapter of a handler that cannot mix runs as a group of its own. This is vLLM's
continuous batching with chunked prefill, within what transformers' eager models allow (one
padded rectangle per forward: decode rows and prefill chunks run as separate forwards of a
step rather than one ragged batch).

Greedy answers do not depend on what else runs: each row attends only to its own cache
positions and uses only its own adapter. A row with a ``seed`` samples from its own
generator, so the same seed gives the same text whatever else is in the batch.

The KV cache grows in place (:class:`SlabLayer`: capacity doubled when full), not by
concatenation per step as transformers' ``DynamicLayer`` does: a step's cost stays the
forward's, not a copy of the whole cache.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from transformers.cache_utils import DynamicCache, DynamicLayer

from plugtune.kernel.errors import DataError
from plugtune.serving.decoding import pick_tokens

Start = Callable[[int], tuple[Any, int]]  # batch size -> (initial cache or None, its length)


@dataclass
class GroupParts:
    """How rows of one group run: ``model`` (a transformers causal LM that takes ``cache`` and
    ``position_ids``), ``activate(names)`` (a context that puts these rows' adapters in place,
    one name per row), and ``start`` (an initial cache and its length for new rows: a prefix
    adapter's virtual tokens; ``None`` for none)."""

    model: torch.nn.Module
    activate: Callable[[list[str | None]], contextlib.AbstractContextManager[Any]]
    start: Start | None = None


@dataclass
class RowSpec:
    """What one row asks for. ``prompt`` is token ids. ``logprobs``: ``None`` for none, else
    how many alternatives (``top_logprobs``) to report beside each chosen token's log
    probability; ``prompt_logprobs``: also the log probability of every prompt token after
    the first (``echo`` in OpenAI's completions); ``constraint``: an object with
    ``accept(token)`` and ``finished``, masked through ``mask_fn`` (structured output)."""

    prompt: list[int]
    adapter: str | None = None
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_ids: Collection[int] = ()  # tokens that end the row besides EOS (a chat adapter's end of turn)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: bool = False
    constraint: Any = None


@dataclass
class TokenInfo:
    """One chosen token and, where asked, its log probability and the top alternatives."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Row:
    """A row's state while it runs; ``text`` is what has been emitted so far."""

    id: int
    spec: RowSpec
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)  # per generated token, when logprobs are asked
    prompt_info: list[TokenInfo] = field(default_factory=list)  # per prompt token after the first (echo)
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None
    alone: bool = False  # rerun alone after a forward it shared failed: it never shares one again

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)

    @property
    def prompt_tokens(self) -> int:
        return len(self.spec.prompt)


@dataclass
class StepEvent:
    """What a row produced in a step: new text, new tokens (with logprobs when asked), and its
    finish reason once it has finished (``"stop"``, ``"length"``, ``"cancelled"``, or
    ``"error"`` with ``row.error``)."""

    row: Row
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finished: str | None = None
    first: bool = False  # the row's first generated token came in this step


class SlabLayer(DynamicLayer):
    """One layer's keys and values in a preallocated buffer that grows by doubling: an update
    writes in place and ``keys``/``values`` are views of the filled part, instead of
    transformers' concatenation of the whole cache at every step."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> None:
        super().__init__()
        self.buffer_k: torch.Tensor | None = None
        self.buffer_v: torch.Tensor | None = None
        self.length = 0
        if keys is not None and values is not None and keys.numel():
            self._store(keys, values)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _store(self, keys: torch.Tensor, values: torch.Tensor, room: int = 16) -> None:
        b, h, t, d = keys.shape
        self.buffer_k = keys.new_zeros(b, h, t + room, d)
        self.buffer_v = values.new_zeros(b, values.shape[1], t + room, values.shape[3])
        self.buffer_k[:, :, :t] = keys
        self.buffer_v[:, :, :t] = values
        self.length = t
        self.device = keys.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self.buffer_k[:, :, : self.length]
        self.values = self.buffer_v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        if self.buffer_k is None:
            self._store(key_states, value_states, room=max(16, n))
            return self.keys, self.values
        if self.length + n > self.buffer_k.shape[2]:  # full: double the room
            self._store(self.keys, self.values, room=max(n, self.length))
        self.buffer_k[:, :, self.length: self.length + n] = key_states
        self.buffer_v[:, :, self.length: self.length + n] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.buffer_k is not None:
            self.buffer_k, self.buffer_v = self.buffer_k[indices], self.buffer_v[indices]
            self._views()

    def drop_front(self, k: int) -> None:
        """Forget the first ``k`` positions (padding no row attends to any more)."""
        if self.buffer_k is not None and k:
            self.buffer_k, self.buffer_v = self.buffer_k[:, :, k:], self.buffer_v[:, :, k:]
            self.length -= k
            self._views()


def slab_cache(cache: Any, model: torch.nn.Module) -> Any:
    """A transformers cache whose layers are :class:`SlabLayer` (``cache``'s contents copied
    in, or empty), or ``cache`` itself (``None`` included) when the model's layers are not
    plain full-attention ones (sliding windows, linear attention): those keep their own."""
    config = getattr(model, "config", None)
    fresh = DynamicCache(config=config) if config is not None else DynamicCache()
    source = cache if cache is not None else fresh
    layers = getattr(source, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer and not isinstance(layer, SlabLayer) for layer in layers):
        return cache
    source.layers = [layer if isinstance(layer, SlabLayer) else
                     SlabLayer(layer.keys, layer.values) if layer.is_initialized and layer.keys is not None else SlabLayer()
                    for layer in layers]
    return source


def _layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", []))


def right_aligned(blocks: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Key or value blocks ``(rows, heads, n_i, dim)`` side by side in one batch, each
    left-padded with zeros to ``width`` positions (the rows' masks keep the padding out)."""
    padded = [b if b.shape[2] == width else
              torch.cat([b.new_zeros(b.shape[0], b.shape[1], width - b.shape[2], b.shape[3]), b], dim=2) for b in blocks]
    return torch.cat(padded)


def left_padded(rows: Sequence[Sequence[int]], width: int, pad: int) -> list[list[int]]:
    """Each list of ``rows`` with ``pad`` in front up to ``width`` (prompts, and their masks)."""
    return [[pad] * (width - len(r)) + list(r) for r in rows]


def merge_caches(caches: list[Any], lengths: list[int], template: Any) -> Any:
    """One cache holding the rows of ``caches`` (each of cached length ``lengths[i]``) side by
    side, shorter ones right-aligned (:func:`right_aligned`). ``template`` is one of them: it
    becomes the merged cache."""
    width = max(lengths)
    for layer_index in range(len(_layers(template))):
        sources = [_layers(cache)[layer_index] for cache in caches]
        merged = SlabLayer()
        merged._store(right_aligned([l.keys for l in sources], width), right_aligned([l.values for l in sources], width),
                      room=32)
        template.layers[layer_index] = merged
    return template


class PrefixCache:
    """Keys and values of prompt prefixes already computed, per adapter, in whole blocks of
    :data:`BLOCK` tokens (as vLLM's automatic prefix caching): a request whose prompt starts
    like an earlier one's on the same adapter feeds only the rest. Entries are kept least
    recently used first and dropped past ``budget_bytes``. ``owner`` names the weights the
    values came from (the adapter and its load), so an adapter reloaded under the same name
    never meets its predecessor's entries. At least the prompt's last token is always fed:
    its logits give the first new token."""

    BLOCK = 16

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.bytes = 0
        self.entries: OrderedDict[tuple[Any, tuple[int, ...]], tuple[list[torch.Tensor], list[torch.Tensor], int]] = OrderedDict()

    def _lengths(self, prompt: Sequence[int]) -> range:
        """The block lengths a prompt can hit or store, longest first (never the last token)."""
        top = (len(prompt) - 1) // self.BLOCK * self.BLOCK
        return range(top, 0, -self.BLOCK)

    def lookup(self, owner: Any, prompt: Sequence[int]) -> tuple[int, Any]:
        for n in self._lengths(prompt):
            entry = self.entries.get((owner, tuple(prompt[:n])))
            if entry is not None:
                self.entries.move_to_end((owner, tuple(prompt[:n])))
                return n, entry
        return 0, None

    def wants(self, owner: Any, prompt: Sequence[int]) -> bool:
        lengths = self._lengths(prompt)
        return bool(lengths) and (owner, tuple(prompt[: lengths[0]])) not in self.entries

    def store(self, owner: Any, prompt: Sequence[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep the prompt's block prefixes (one copy of its keys and values, shared by all)."""
        per_token = sum(k.nbytes + v.nbytes for k, v in zip(keys, values)) // max(1, keys[0].shape[2])
        for n in self._lengths(prompt):
            key = (owner, tuple(prompt[:n]))
            if key not in self.entries:
                self.entries[key] = (keys, values, n * per_token)
                self.bytes += n * per_token
        while self.bytes > self.budget and self.entries:
            _, (_, _, size) = self.entries.popitem(last=False)
            self.bytes -= size



@dataclass
class Segment:
    """Rows of one group that share a KV cache: the group's decode batch, or rows still
    feeding their prompts (``pending``: the left-padded prompt tokens not yet fed)."""

    key: Any
    parts: GroupParts
    rows: list[Row]
    mask: torch.Tensor  # (rows, cached + pending) 1 = a real position
    positions: torch.Tensor  # (rows,) the position of each row's next token
    cache: Any = None
    cached: int = 0  # positions in the cache
    pending: torch.Tensor | None = None  # (rows, n) prompt tokens still to feed
    offset: int = 0  # positions of the group's start (virtual tokens) before the prompts
    width: int = 0  # the padded prompt width
    next_input: torch.Tensor | None = None  # (rows, 1) each row's last token (decode segments)

    @property
    def prefilling(self) -> bool:
        return self.pending is not None and self.pending.shape[1] > 0


class DecodeEngine:
    """Continuous batching over a host's groups (see the module docstring).

    ``parts(key, adapter)``: the :class:`GroupParts` of a group key; ``group_key(adapter)``:
    which group a row of that adapter joins. ``tokenizer`` decodes text; ``eos``: tokens that
    end every row (unless it ignores EOS). ``max_rows``: rows running at once;
    ``step_tokens``: tokens fed per step (decode rows first, then prefill chunks);
    ``chunk_tokens``: the most prompt tokens one row feeds in a step."""

    def __init__(self, tokenizer: Any, *, group_key: Callable[[str | None], Any],
                 parts: Callable[[Any], GroupParts], eos: Collection[int], pad: int, device: torch.device,
                 max_rows: int = 16, step_tokens: int = 512, chunk_tokens: int = 256,
                 mask_fn: Callable[[torch.Tensor, list[Any]], None] | None = None,
                 seed: int | None = None, prefix_key: Callable[[str | None], Any] | None = None,
                 prefix_cache_bytes: int = 0) -> None:
        self.tokenizer = tokenizer
        self.group_key = group_key
        self.parts = parts
        self.eos = set(eos)
        self.pad = pad
        self.device = device
        self.max_rows = max_rows
        self.step_tokens = max(step_tokens, max_rows + 1)
        self.chunk_tokens = max(1, chunk_tokens)
        self.mask_fn = mask_fn
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.prefix_key = prefix_key or (lambda adapter: None)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_key is not None and prefix_cache_bytes > 0 else None
        self.prefix_hits = 0  # prompt tokens taken from the prefix cache instead of fed
        self.waiting: deque[Row] = deque()
        self.segments: list[Segment] = []
        self._ids = itertools.count()
        # figures for /health and metrics
        self.steps = 0
        self.waves = 0  # steps in which rows were admitted
        self.largest = 0  # most rows running at once
        self.last_step_rows = 0
        self.last_step_tokens = 0

    # -- rows ---------------------------------------------------------------------------

    def add(self, spec: RowSpec) -> Row:
        """Queue a row; it joins at the next step with room (a row with no token budget
        finishes at once, with reason ``"length"``, at that step)."""
        if not spec.prompt:
            raise ValueError("a row needs at least one prompt token")
        row = Row(next(self._ids), spec)
        if spec.seed is not None:
            row.generator = torch.Generator(device=self.device)
            row.generator.manual_seed(spec.seed)
        if spec.max_new_tokens <= 0 and not spec.prompt_logprobs:  # nothing to decode: it never enters a forward
            row.finish_reason = "length"
        self.waiting.append(row)
        return row

    def cancel(self, row: Row) -> None:
        """Stop ``row`` now: it leaves its batch before the next forward, keeping its text."""
        if row.finish_reason is None:
            row.finish_reason = "cancelled"

    @property
    def running(self) -> int:
        return sum(len(s.rows) for s in self.segments)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.segments

    def running_adapters(self) -> set[str]:
        return {r.spec.adapter for s in self.segments for r in s.rows if r.spec.adapter is not None} | \
               {r.spec.adapter for r in self.waiting if r.spec.adapter is not None}

    # -- the step -----------------------------------------------------------------------

    def step(self) -> list[StepEvent]:
        """Admit, prefill a chunk, decode one token for every running row; the events of the
        rows that changed (finished rows included, once)."""
        events: dict[int, StepEvent] = {}
        self._drop_finished(events)
        self._admit(events)
        ran = self.running  # rows in this step's forwards
        decoding = [s for s in self.segments if not s.prefilling and s.next_input is not None]
        fed = sum(len(s.rows) for s in decoding)
        budget = self.step_tokens - fed
        with torch.no_grad():
            for seg in [s for s in self.segments if s.prefilling]:
                if budget <= 0:
                    break
                width = max(1, min(self.chunk_tokens, budget // max(1, len(seg.rows)), seg.pending.shape[1]))
                budget -= width * len(seg.rows)
                fed += width * len(seg.rows)
                self._run(seg, self._prefill, events, width)
            for seg in decoding:
                self._run(seg, self._decode, events)
        self._drop_finished(events)
        self._merge_ready()
        self.steps += 1
        self.last_step_rows = ran
        self.last_step_tokens = fed
        self.largest = max(self.largest, self.last_step_rows)
        return list(events.values())

    def _event(self, events: dict[int, StepEvent], row: Row) -> StepEvent:
        event = events.get(row.id)
        if event is None:
            event = events[row.id] = StepEvent(row)
        return event

    def _admit(self, events: dict[int, StepEvent]) -> None:
        """Waiting rows join, oldest first, while fewer than ``max_rows`` run; the rows of one
        group admitted together start one segment (a row rerun alone starts its own)."""
        room = self.max_rows - self.running
        admitted: dict[Any, list[Row]] = {}
        while self.waiting and room > 0:
            row = self.waiting.popleft()
            if row.finish_reason is not None:  # cancelled while waiting
                self._event(events, row).finished = row.finish_reason
                continue
            if row.spec.max_new_tokens <= len(row.generated) and row.generated:
                row.finish_reason = "length"
                self._event(events, row).finished = "length"
                continue
            key = ("alone", row.id) if row.alone else self.group_key(row.spec.adapter)
            admitted.setdefault(key, []).append(row)
            room -= 1
        if admitted:
            self.waves += 1
        for key, rows in admitted.items():
            parts = self.parts(self.group_key(rows[0].spec.adapter))
            self.segments.append(self._new_segment(key, parts, rows))

    def _new_segment(self, key: Any, parts: GroupParts, rows: list[Row]) -> Segment:
        """A segment for ``rows``: their prompts left-padded to one width, all still to feed,
        after the group's start (a prefix adapter's virtual tokens) where it has one, or after
        the longest prompt prefix each row finds in the prefix cache (its keys and values
        copied in; the mask keeps the rows' cached and fed parts apart)."""
        prompts = [self._input(r) for r in rows]
        hits = [self._cached_prefix(r, p, parts) for r, p in zip(rows, prompts)]
        rest = [p[n:] for p, (n, _) in zip(prompts, hits)]
        width = max(len(p) for p in rest)
        ids = torch.tensor(left_padded(rest, width, self.pad), device=self.device)
        mask = torch.tensor(left_padded([[1] * len(p) for p in rest], width, 0), device=self.device)
        cache, offset = None, 0
        if parts.start is not None:
            with parts.activate([r.spec.adapter for r in rows]):
                cache, offset = parts.start(len(rows))
        elif any(n for n, _ in hits):
            cache, offset = self._cache_from_hits(hits, parts.model)
            held = torch.tensor(left_padded([[1] * n for n, _ in hits], offset, 0), device=self.device)
            mask = torch.cat([held, mask], dim=1)
        if offset and parts.start is not None:
            mask = torch.cat([mask.new_ones(len(rows), offset), mask], dim=1)
        self.prefix_hits += sum(n for n, _ in hits)
        return Segment(key, parts, rows, mask, torch.full((len(rows),), offset, device=self.device),
                       cache=slab_cache(cache, parts.model), cached=offset, pending=ids, offset=offset, width=width)

    def _cached_prefix(self, row: Row, prompt: list[int], parts: GroupParts) -> tuple[int, Any]:
        """How many of ``prompt``'s first tokens the prefix cache holds for this row's
        adapter, and their keys and values (``0, None`` for none). Never for rows that score
        their prompt (``echo``: every position's logits are needed) or groups with a start."""
        if self.prefix_cache is None or parts.start is not None or row.spec.prompt_logprobs:
            return 0, None
        owner = self.prefix_key(row.spec.adapter)
        return (0, None) if owner is None else self.prefix_cache.lookup(owner, prompt)

    def _cache_from_hits(self, hits: list[tuple[int, Any]], model: torch.nn.Module) -> tuple[Any, int]:
        """A cache for rows that found cached prefixes: each row's first ``n`` keys and values
        (none for a row without a hit), right-aligned to the longest hit."""
        width = max(n for n, _ in hits)
        template = next(entry for n, entry in hits if n)
        fresh = slab_cache(None, model)
        for i, layer in enumerate(_layers(fresh)):
            keys = [entry[0][i][:, :, :n] if n else template[0][i][:, :, :0] for n, entry in hits]
            values = [entry[1][i][:, :, :n] if n else template[1][i][:, :, :0] for n, entry in hits]
            layer._store(right_aligned(keys, width), right_aligned(values, width), room=32)
        return fresh, width

    def _remember_prefixes(self, seg: Segment) -> None:
        """After a segment's prompts are fed: keep each row's prompt keys and values in the
        prefix cache (whole blocks of it), for later requests that start alike."""
        if self.prefix_cache is None or seg.parts.start is not None or not _is_slab(seg.cache):
            return
        layers = _layers(seg.cache)
        for j, row in enumerate(seg.rows):
            owner = self.prefix_key(row.spec.adapter)
            prompt = self._input(row)
            if owner is None or not self.prefix_cache.wants(owner, prompt):
                continue
            real = seg.mask[j, : seg.cached].nonzero().flatten()  # this row's cached positions, in order
            keys = [layer.keys[j: j + 1].index_select(2, real) for layer in layers]
            values = [layer.values[j: j + 1].index_select(2, real) for layer in layers]
            self.prefix_cache.store(owner, prompt, keys, values)

    @staticmethod
    def _input(row: Row) -> list[int]:
        """What a row feeds when it (re)starts: its prompt and anything it generated before
        (a row rerun alone continues exactly the sequence it had)."""
        return row.spec.prompt + row.generated

    def _run(self, seg: Segment, fn: Callable[..., None], events: dict[int, StepEvent], *args: Any) -> None:
        """``fn(seg, events, ...)``, a failure kept to its rows: a segment of one row ends with
        the error; a shared one is split, each row to run again alone from where it is."""
        try:
            fn(seg, events, *args)
        except Exception as exc:  # the engine outlives any one forward
            self.segments.remove(seg)
            if len(seg.rows) == 1:
                row = seg.rows[0]
                row.finish_reason, row.error = "error", exc
                self._event(events, row).finished = "error"
                return
            for row in reversed(seg.rows):
                if row.finish_reason is None:
                    row.alone = True
                    self.waiting.appendleft(row)

    def _forward(self, seg: Segment, input_ids: torch.Tensor, positions: torch.Tensor, keep: int) -> torch.Tensor:
        with seg.parts.activate([r.spec.adapter for r in seg.rows]):
            out = seg.parts.model(input_ids=input_ids, attention_mask=seg.mask[:, : seg.cached + input_ids.shape[1]],
                                  position_ids=positions, cache=seg.cache, use_cache=True, logits_to_keep=keep)
        seg.cache = out.cache  # the same slab cache, grown in place (or the model's own kind)
        seg.cached += input_ids.shape[1]
        return out.logits

    def _prefill(self, seg: Segment, events: dict[int, StepEvent], width: int) -> None:
        """Feed the next ``width`` prompt tokens of every row of ``seg``; the last chunk's
        logits give each row its first token. Rows that asked for prompt logprobs get them
        from the chunk's logits at every position."""
        chunk, seg.pending = seg.pending[:, :width], seg.pending[:, width:]
        before = seg.cached
        mask = seg.mask[:, : before + width]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, before:]
        echo = any(r.spec.prompt_logprobs and not r.generated for r in seg.rows)
        last = not seg.prefilling
        logits = self._forward(seg, chunk, positions, 0 if echo else 1)
        if echo:
            self._prompt_logprobs(seg, logits, before - seg.offset)
        if last:
            seg.positions = positions[:, -1] + 1
            self._remember_prefixes(seg)
            self._choose(seg, logits[:, -1, :], events)

    def _prompt_logprobs(self, seg: Segment, logits: torch.Tensor, first_column: int) -> None:
        """Each prompt token's log probability given the tokens before it (``echo``): the
        logits at padded column ``c`` predict prompt token ``c + 1 - (width - len(prompt))``."""
        logp = logits.float().log_softmax(-1)  # (rows, chunk, V)
        for j, row in enumerate(seg.rows):
            if not row.spec.prompt_logprobs or row.generated:
                continue
            prompt, k = row.spec.prompt, row.spec.logprobs or 0
            lead = seg.width - len(prompt)
            for t in range(logp.shape[1]):
                index = first_column + t + 1 - lead
                if 1 <= index < len(prompt):
                    dist = logp[j, t]
                    top = None
                    if k:
                        values, ids = dist.topk(k)
                        top = list(zip(ids.tolist(), values.tolist()))
                    row.prompt_info.append(TokenInfo(prompt[index], float(dist[prompt[index]]), top))

    def _decode(self, seg: Segment, events: dict[int, StepEvent]) -> None:
        positions = seg.positions[:, None]
        seg.mask = torch.cat([seg.mask, seg.mask.new_ones(len(seg.rows), 1)], dim=1)
        logits = self._forward(seg, seg.next_input, positions, 1)
        seg.positions = seg.positions + 1
        self._choose(seg, logits[:, -1, :], events)

    # -- choosing tokens ----------------------------------------------------------------

    def _choose(self, seg: Segment, logits: torch.Tensor, events: dict[int, StepEvent]) -> None:
        """Each row's next token (constrained, sampled or greedy), its logprobs where asked,
        and the row's text, stop strings and finish."""
        logits = logits.float()
        raw = logits
        constraints = [r.spec.constraint for r in seg.rows]
        if self.mask_fn is not None and any(c is not None for c in constraints):
            logits = logits.clone()
            self.mask_fn(logits, constraints)
            for j in (~torch.isfinite(logits).any(-1)).nonzero().flatten().tolist():
                row = seg.rows[j]  # the grammar allows no token this tokenizer has: it cannot go on
                row.finish_reason = "error"
                row.error = DataError("structured output: the grammar allows none of this model's tokens after "
                                      f"{row.text!r}; its tokenizer cannot write what the grammar asks for")
        temperature = torch.tensor([r.spec.temperature for r in seg.rows], device=logits.device)
        top_p = torch.tensor([r.spec.top_p for r in seg.rows], device=logits.device)
        own = [j for j, r in enumerate(seg.rows) if r.generator is not None and r.spec.temperature > 0]
        chosen = pick_tokens(logits, temperature, top_p, self.generator)
        for j in own:
            chosen[j] = pick_tokens(logits[j: j + 1], temperature[j: j + 1], top_p[j: j + 1], seg.rows[j].generator)[0]
        picked = chosen.tolist()  # one device sync for the step
        wants = [j for j, r in enumerate(seg.rows) if r.spec.logprobs is not None]
        infos: dict[int, TokenInfo] = {}
        if wants:
            logp = raw[wants].log_softmax(-1)
            for n, j in enumerate(wants):
                k = seg.rows[j].spec.logprobs or 0
                top = None
                if k:
                    values, ids = logp[n].topk(k)
                    top = list(zip(ids.tolist(), values.tolist()))
                infos[j] = TokenInfo(picked[j], float(logp[n, picked[j]]), top)
        seg.next_input = chosen[:, None]
        for j, row in enumerate(seg.rows):
            if row.finish_reason is not None:
                continue
            if len(row.generated) >= row.spec.max_new_tokens:  # a prompt scored only (echo, no budget)
                row.finish_reason = "length"
                self._event(events, row).finished = "length"
                self._event(events, row).first = True
                continue
            self._advance(row, picked[j], infos.get(j), self._event(events, row))

    def _advance(self, row: Row, token: int, info: TokenInfo | None, event: StepEvent) -> None:
        spec = row.spec
        first = not row.generated and not row.tokens
        ends = (not spec.ignore_eos and token in self.eos) or token in spec.stop_ids
        reason = None
        if ends:  # the stop token is not text, but its logprob is reported (as vLLM does; lm-eval reads it)
            reason = "stop"
            if info is not None:
                row.tokens.append(info)
                event.tokens.append(info)
        else:
            row.generated.append(token)
            if info is not None:
                row.tokens.append(info)
                event.tokens.append(info)
            if spec.constraint is not None:
                try:
                    spec.constraint.accept(token)
                except Exception as exc:
                    row.finish_reason, row.error = "error", exc
                    event.finished = "error"
                    return
                if spec.constraint.finished:
                    reason = "stop"
            if reason is None and len(row.generated) >= spec.max_new_tokens:
                reason = "length"
        event.first = event.first or first
        event.text += self._emit(row, reason)
        if row.finish_reason is not None:
            event.finished = row.finish_reason

    def _emit(self, row: Row, reason: str | None) -> str:
        """The row's new visible text; holds back what may be the start of a stop string or
        half of a multi-byte character until the next token settles it."""
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        stops = [s for s in row.spec.stop if s]
        cut = min((at for at in (text.find(s) for s in stops) if at >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif reason is None:
            text = text[: len(text) - held_back(text, stops)]
        if reason is not None:
            row.finish_reason = reason
        if not text.startswith(row.text):  # a tokenizer that rewrites earlier text: emit nothing new
            return ""
        fresh = text[len(row.text):]
        row.text = text
        return fresh

    # -- batch upkeep -------------------------------------------------------------------

    def _drop_finished(self, events: dict[int, StepEvent]) -> None:
        for seg in list(self.segments):
            keep = [j for j, r in enumerate(seg.rows) if r.finish_reason is None]
            for r in seg.rows:
                if r.finish_reason is not None:
                    self._event(events, r).finished = r.finish_reason
            if len(keep) == len(seg.rows):
                continue
            if not keep:
                self.segments.remove(seg)
                continue
            self._select(seg, keep)

    def _select(self, seg: Segment, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        seg.rows = [seg.rows[j] for j in keep]
        seg.mask, seg.positions = seg.mask[index], seg.positions[index]
        if seg.pending is not None:
            seg.pending = seg.pending[index]
        if seg.next_input is not None:
            seg.next_input = seg.next_input[index]
        if seg.cache is not None:
            for layer in _layers(seg.cache):
                layer.batch_select_indices(index)
        # positions no remaining row attends to (the left padding of longer rows gone)
        unused = int((seg.mask[:, : seg.cached].sum(0) == 0).cumprod(0).sum().item()) if seg.cached else 0
        if unused and _is_slab(seg.cache):
            for layer in _layers(seg.cache):
                layer.drop_front(unused)
            seg.mask = seg.mask[:, unused:]
            seg.cached -= unused

    def _merge_ready(self) -> None:
        """Segments whose prompts are all fed join their group's decode batch."""
        by_key: dict[Any, list[Segment]] = {}
        for seg in self.segments:
            if not seg.prefilling and seg.next_input is not None:
                by_key.setdefault(seg.key, []).append(seg)
        for key, segs in by_key.items():
            if len(segs) < 2 or not all(_is_slab(s.cache) for s in segs):
                continue
            lengths = [s.cached for s in segs]
            width = max(lengths)
            merged = segs[0]
            merged.cache = merge_caches([s.cache for s in segs], lengths, segs[0].cache)
            merged.mask = right_aligned([s.mask[:, None, :, None] for s in segs], width)[:, 0, :, 0]  # masks as 1-head blocks
            merged.positions = torch.cat([s.positions for s in segs])
            merged.next_input = torch.cat([s.next_input for s in segs])
            merged.rows = [r for s in segs for r in s.rows]
            merged.cached = width
            for s in segs[1:]:
                self.segments.remove(s)


def _is_slab(cache: Any) -> bool:
    layers = _layers(cache)
    return bool(layers) and all(isinstance(layer, SlabLayer) for layer in layers)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` to hold back: half of a multi-byte
    character, or the longest end that begins one of the stop strings."""
    held = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                held = max(held, k)
                break
    return held


class TextStream(Iterator[list[str]]):
    """Iterator over decoding steps of a fixed set of rows (what
    :meth:`plugtune.serving.host.AdapterHost.stream` returns): each ``next()`` runs one
    engine step and returns the new text of every row (``''`` for a row that produced none
    or has finished).

    Attributes, updated as it runs: ``finish_reasons`` (``"stop"``/``"length"``/
    ``"cancelled"``/``None``), ``prompt_tokens`` and ``completion_tokens`` (per row),
    ``texts`` (the text so far), ``rows`` (the engine's rows: their tokens and logprobs);
    :meth:`cancel` takes a row out at once. A row whose forward failed raises its error."""

    def __init__(self, engine: DecodeEngine, specs: Sequence[RowSpec]) -> None:
        self.engine = engine
        self.rows = [engine.add(spec) for spec in specs]
        self.max_new_tokens = [spec.max_new_tokens for spec in specs]
        self.stop = [list(spec.stop) for spec in specs]

    @property
    def finish_reasons(self) -> list[str | None]:
        return [r.finish_reason for r in self.rows]

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.rows]

    @property
    def completion_tokens(self) -> list[int]:
        return [r.completion_tokens for r in self.rows]

    @property
    def generated(self) -> list[list[int]]:
        """Each row's generated token ids (an end-of-sequence token that stopped it excluded)."""
        return [r.generated for r in self.rows]

    @property
    def prompt_tokens(self) -> list[int]:
        return [r.prompt_tokens for r in self.rows]

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> list[str]:
        if self.engine.idle:
            raise StopIteration
        index = {r.id: i for i, r in enumerate(self.rows)}
        new = [""] * len(self.rows)
        for event in self.engine.step():
            i = index[event.row.id]
            if event.finished == "error":
                raise event.row.error
            new[i] += event.text
        return new

    def cancel(self, i: int) -> None:
        """Stop decoding row ``i`` now (a client gone): it leaves its batch before the next
        step, keeps the text it has, and its finish reason becomes ``"cancelled"``."""
        self.engine.cancel(self.rows[i])
