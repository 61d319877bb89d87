"""``plugtune serve``: one base model and its adapters behind an OpenAI-shaped HTTP API.

    plugtune serve adapters/support adapters/reviews --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="support", prompt="My card was charged twice", max_tokens=8)

The ``model`` field of a request names the adapter (an ``adapter`` field overrides it);
``"base"`` or the base model's name means no adapter.

Requests are served by one worker thread that owns the model (:class:`BatchWorker`): waiting
requests are taken together, up to ``max_batch`` of them, and run as one batch in which each
row uses its own adapter (:meth:`AdapterHost.stream`); requests that arrive while a batch runs
wait for the next one. Adapters are loaded and unloaded between batches, so a batch never
sees the adapter set change under it.

Safety: the server binds to 127.0.0.1 unless told otherwise; adapters loaded over HTTP must
lie inside ``adapters_root`` (paths are resolved, symlinks included, before the check) and
carry a safe name, and so must every file in the folder; errors are OpenAI-shaped JSON with
a one-line message, never a traceback (a bug is a 500 whose traceback goes to the log).

Availability: each request is held to a budget before any work (:class:`RequestLimits`:
body bytes, prompt count, characters, then tokens, counted off the event loop); a row that
fails in a batch ends alone (:meth:`BatchWorker._run` reruns the others one at a time); a
client that disconnects has its rows cancelled, streaming or not.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import hmac
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# At module level: FastAPI resolves the (postponed) annotations of dependencies here.
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from plugtune.kernel.errors import AdapterError, DataError, PlugtuneError
from plugtune.serving.cache import ADAPTER_NAME, AdapterCache, AdapterPathError, CacheFullError, adapter_folder
from plugtune.serving.decoding import eos_ids
from plugtune.serving.metrics import ServingMetrics

log = logging.getLogger("plugtune.serving.server")

BASE_ALIAS = "base"
DEFAULT_BATCH_WINDOW_S = 0.005
DEFAULT_STEP_TOKENS = 512
"""Tokens one engine step feeds at most (the running rows' decode tokens, then prompt chunks)."""
DEFAULT_PREFIX_CACHE_BYTES = 256 * 2**20
"""Room for prompt prefixes' keys and values (requests that start alike on one adapter feed
only the rest; ``--prefix-cache-mb``)."""
DEFAULT_CHUNK_TOKENS = 128
"""Most prompt tokens one row feeds in a step: a long prompt is prefilled over several steps
while the running rows keep decoding."""
MAX_MESSAGES = 1024
ACCOUNTED = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/classify"})
"""Endpoints whose requests the metrics count (per adapter and status) and time."""
MAX_N = 16
"""Most choices (``n``) one request may ask for per prompt."""
MAX_LOGPROBS = 20
"""Most alternatives per token ``logprobs`` / ``top_logprobs`` may ask for (as vLLM)."""
"""Most messages one chat request may carry."""


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for, checked in this order before any work is done for it:
    the body's size in bytes (from ``Content-Length`` before reading, then while it streams
    in), the number of prompts (or texts to classify), their total characters, and only
    then their tokens (counted off the event loop, against the model's context). Raise them
    with the environment variables in :data:`LIMIT_VARIABLES` when ``plugtune serve`` starts."""

    body_bytes: int = 8 * 1024 * 1024
    inputs: int = 64
    characters: int = 1_000_000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RequestLimits:
        """The defaults, with any set in ``environ`` (``os.environ``) instead; a value that is
        not a whole number of at least 1 is refused with one line."""
        environ = os.environ if environ is None else environ
        values = {}
        for name, variable in LIMIT_VARIABLES.items():
            raw = environ.get(variable)
            if raw is None or not raw.strip():
                continue
            try:
                value = int(raw.strip().replace("_", ""))
            except ValueError:
                value = 0
            if value < 1:
                raise PlugtuneError(f"{variable} must be a whole number of at least 1 (got {raw!r})")
            values[name] = value
        return cls(**values)


LIMIT_VARIABLES = {"body_bytes": "PLUGTUNE_MAX_REQUEST_BYTES", "inputs": "PLUGTUNE_MAX_PROMPTS",
                   "characters": "PLUGTUNE_MAX_PROMPT_CHARS"}
"""The environment variable that raises (or lowers) each of :class:`RequestLimits`."""


class ApiError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# -- request bodies ---------------------------------------------------------------------------


class _Request(BaseModel):
    # Clients send fields this server does not use (user, logit_bias, ...): ignore them.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    adapter: str | None = Field(None, description="overrides `model`: the adapter to use")


class _Sampling(_Request):
    # structured output (response_format, vLLM's guided_* and structured_outputs) is read
    # from the raw body by the constraints module: extra fields are kept for it
    model_config = ConfigDict(extra="allow")

    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = None
    best_of: int | None = None
    ignore_eos: bool = False  # vLLM's extra: decode exactly max_tokens (benchmarks)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: give at most 4 non-empty strings", param="stop")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def top_logprobs_wanted(self) -> int | None:
        """``None``: no logprobs; else how many alternatives per token."""
        raise NotImplementedError


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)  # OpenAI's default for completions; 0 only with echo (scoring a prompt)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """One prompt per row: a string, a list of strings, a list of token ids (one prompt)
        or a list of lists of token ids, as OpenAI's API takes them."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return [x if isinstance(x, str) else list(x) for x in p]  # type: ignore[union-attr]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts are understood
            kinds = {part.get("type") for part in self.content}
            if kinds - {"text"}:
                raise ApiError(400, f"message content parts of type {sorted(kinds - {'text'})} are not supported; send text",
                               param="messages")
            return "".join(str(part.get("text", "")) for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def top_logprobs_wanted(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs: set logprobs to true to get them", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ClassifyRequest(_Request):
    input: str | list[str] = Field(min_length=1)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    name: str | None = None


# -- the worker -------------------------------------------------------------------------------


@dataclass
class Job:
    """One row of a request: a prompt to continue, or a text to classify.

    The worker reports on ``events`` (an asyncio queue of the request's loop) with tuples
    ``(index, kind, payload)``: ``("start", None)`` when it joins the running batch,
    ``("prompt", [TokenInfo])`` once, for ``echo`` with logprobs (each prompt token after the
    first), ``("delta", (text, [TokenInfo]))`` per piece of new text (with the new tokens'
    logprobs when asked), ``("done", (finish_reason, completion_tokens))`` or ``("result",
    classification)`` at the end, ``("error", ApiError)`` on failure.
    """

    kind: Literal["generate", "classify"]
    text: str | list[int]  # a prompt's text, or its token ids (a chat request, already rendered)
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    index: int = 0
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's and the top k alternatives'
    echo: bool = False  # also the prompt's tokens and their logprobs
    constraint: Any = None  # a factory of the row's output constraint (structured output)
    ignore_eos: bool = False
    cancelled: bool = False  # the client went away: stop sending, drop the row when possible
    ended: bool = False  # its last event ("done", "result" or "error") was sent
    submitted_at: float = field(default_factory=time.monotonic)

    def emit(self, kind: str, payload: Any = None) -> None:
        if kind in ("done", "result", "error"):
            self.ended = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, payload))
        except RuntimeError:  # the server's loop is closed (shutdown): nobody is listening
            self.cancelled = True


class BatchWorker:
    """The one thread that runs the model: continuous batching on a
    :class:`~plugtune.serving.engine.DecodeEngine`.

    Every engine step it takes the jobs that arrived (holding ``lock``): generation jobs join
    the running batch at once (their prompts prefilled in bounded chunks while the running
    rows decode), classification jobs run together between steps. A finished or cancelled
    row leaves the batch in the step it ends. ``lock`` is held for one step at a time: take
    it to change the adapter set between steps. ``prepare(job)``, when given, runs on this
    thread before a job joins (the adapter cache loads its adapter there) and returns whether
    it can join now (``False``: it waits for a later step).

    Figures: ``batches`` (steps in which requests joined), ``rows`` (rows that joined),
    ``largest_batch`` (most rows running at once), ``steps``, ``submitted``.
    """

    def __init__(self, host: Any, *, max_batch: int = 16, window_s: float = DEFAULT_BATCH_WINDOW_S,
                 step_tokens: int = DEFAULT_STEP_TOKENS, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 mask_fn: Any = None, observer: Any = None, prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES) -> None:
        if max_batch < 1:
            raise PlugtuneError(f"max_batch must be at least 1 (got {max_batch})")
        self.host = host
        self.max_batch = max_batch
        self.window_s = window_s
        self.lock = threading.RLock()
        self.rows = 0
        self.submitted = 0  # jobs handed to submit(), ever (tests wait on it to batch requests together)
        self.prepare: Any = None
        self.observer = observer  # metrics: called with each step's figures and rows' first tokens and ends
        self.engine = None if host.task.is_classification else host.decode_engine(
            max_rows=max_batch, step_tokens=step_tokens, chunk_tokens=chunk_tokens, mask_fn=mask_fn,
            prefix_cache_bytes=prefix_cache_bytes)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: collections.deque[Job] = collections.deque()  # jobs that could not join yet
        self._jobs: dict[int, Job] = {}  # engine row id -> job
        self._rows: dict[int, Any] = {}  # engine row id -> row
        self._classify_batches = 0
        self._largest_classify = 0
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def waiting(self) -> int:
        queued = self._queue.qsize() + len(self._held)
        return queued + (len(self.engine.waiting) if self.engine is not None else 0)

    @property
    def running(self) -> int:
        return self.engine.running if self.engine is not None else 0

    @property
    def batches(self) -> int:
        return self.engine.waves if self.engine is not None else self._classify_batches

    @property
    def largest_batch(self) -> int:
        return self.engine.largest if self.engine is not None else self._largest_classify

    def in_use(self) -> set[str]:
        """Adapters that running or admitted rows use (they must not be unloaded)."""
        return self.engine.running_adapters() if self.engine is not None else set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="plugtune-batch-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        self._queue.put(job)
        self.submitted += 1

    # -- the loop -----------------------------------------------------------------------

    def _busy(self) -> bool:
        return bool(self._held) or (self.engine is not None and not self.engine.idle)

    def _loop(self) -> None:
        while not self._stopping or self._busy():
            arrived: list[Job] = []
            if not self._busy():  # idle: wait for work, then a moment for requests arriving with it
                first = self._queue.get()
                if first is None:
                    return
                arrived.append(first)
                deadline = time.monotonic() + self.window_s
                while len(arrived) < self.max_batch:
                    try:
                        job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if job is None:
                        self._stopping = True
                        break
                    arrived.append(job)
            with self.lock:  # the adapter set changes only between steps
                arrived += self._drain()
                self._step(arrived)

    def _drain(self) -> list[Job]:
        jobs = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is None:
                self._stopping = True
            else:
                jobs.append(job)

    def _step(self, arrived: list[Job]) -> None:
        """Admit what can join, run one engine step (or a batch of classifications), and
        send each row's events."""
        held, self._held = [*self._held, *arrived], collections.deque()
        classify = []
        for job in held:
            if job.cancelled:
                continue
            if job.kind == "classify":
                classify.append(job)
            else:
                self._admit(job)
        if classify:
            self._classify_all(classify)
        if self.engine is None or self.engine.idle:
            if self._held and not classify:
                time.sleep(0.001)  # jobs wait for an adapter slot, nothing runs: do not spin
            return
        for row_id, job in list(self._jobs.items()):
            if job.cancelled:
                self.engine.cancel(self._rows[row_id])
        try:
            events = self.engine.step()
        except Exception as exc:  # a bug in the engine itself: every running row ends with it
            log.error("a decode step failed", exc_info=exc)
            events = []
            for row_id, job in list(self._jobs.items()):
                self._fail(job, exc)
                self.engine.cancel(self._rows[row_id])
        if self.observer is not None:
            self.observer.step(self.engine.last_step_rows, self.engine.last_step_tokens, self.waiting)
        for event in events:
            self._report(event)

    def _admit(self, job: Job) -> None:
        """``job`` joins the engine, or waits (its adapter cannot be made resident yet)."""
        from plugtune.serving.engine import RowSpec

        try:
            if self.prepare is not None and not self.prepare(job):
                self._held.append(job)
                return
            if job.adapter is not None and job.adapter not in self.host.adapters:
                raise ApiError(404, f"adapter {job.adapter!r} was unloaded before the request ran", code="model_not_found")
            spec = RowSpec(self.host.prompt_ids(job.text), job.adapter, job.max_tokens, job.temperature, job.top_p,
                           job.seed, job.stop, set() if job.ignore_eos else self.host._end_of_turn(job.adapter),
                           job.ignore_eos, job.logprobs, job.echo, job.constraint() if job.constraint else None)
        except Exception as exc:
            self._fail(job, exc)
            return
        row = self.engine.add(spec)
        self._rows[row.id] = row
        self._jobs[row.id] = job
        self.rows += 1
        job.emit("start")

    def _report(self, event: Any) -> None:
        row = event.row
        job = self._jobs.get(row.id)
        if job is None:
            return
        if event.first and self.observer is not None:
            self.observer.first_token(job, time.monotonic() - job.submitted_at)
        if event.first and job.echo and not job.cancelled:
            job.emit("prompt", (row.spec.prompt, row.prompt_info))
        if (event.text or event.tokens) and not job.cancelled:
            job.emit("delta", (event.text, event.tokens))
        if event.finished is not None:
            del self._jobs[row.id]
            self._rows.pop(row.id, None)
            if event.finished == "error":
                self._fail(job, row.error)
            elif event.finished in ("stop", "length") and not job.ended:
                job.emit("done", (event.finished, row.completion_tokens))
            if self.observer is not None:
                self.observer.row_done(job, row, time.monotonic() - job.submitted_at)

    @staticmethod
    def _fail(job: Job, exc: BaseException) -> None:
        """Answer ``job`` with the error ``exc`` (logged with its traceback when it is a bug)."""
        error = _as_api_error(exc)
        if error.status >= 500:
            log.error("a request row failed", exc_info=exc)
        if not job.ended:
            job.emit("error", error)

    def _classify_all(self, jobs: list[Job]) -> None:
        """Classify ``jobs`` in batches of ``max_batch``; a batch that fails is rerun one job
        at a time, so that a failure that belongs to one row ends that row alone."""
        for at in range(0, len(jobs), self.max_batch):
            batch = jobs[at: at + self.max_batch]
            self._classify_batches += 1
            self._largest_classify = max(self._largest_classify, len(batch))
            self.rows += len(batch)
            try:
                self._classify(batch)
            except Exception as exc:
                if len(batch) == 1:
                    self._fail(batch[0], exc)
                    continue
                log.warning("a batch of %d rows failed (%s: %s); running its rows one at a time", len(batch),
                            type(exc).__name__, _one_line(str(exc))[:200])
                for job in batch:
                    if not job.ended and not job.cancelled:
                        try:
                            self._classify([job], started=True)
                        except Exception as row_exc:
                            self._fail(job, row_exc)

    def _classify(self, batch: list[Job], started: bool = False) -> None:
        usable = []
        for job in batch:
            if job.adapter is not None and job.adapter not in self.host.adapters:
                job.emit("error", ApiError(404, f"adapter {job.adapter!r} was unloaded before the request ran",
                                           code="model_not_found"))
            else:
                usable.append(job)
                if not started:
                    job.emit("start")
        if usable:
            results = self.host.classify([job.text for job in usable], [job.adapter for job in usable])
            for job, result in zip(usable, results):
                job.emit("result", result)


def _mask_fn() -> Any:
    """The engine's batched constraint mask (structured output)."""
    from plugtune.serving.constraints import apply_constraints

    return apply_constraints


class WorkerObserver:
    """What the worker reports to the metrics: each step's rows and tokens and the queue,
    each row's first token and its end."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics

    def step(self, rows: int, tokens: int, waiting: int) -> None:
        self.metrics.step(rows, tokens)
        self.metrics.set_queue(waiting, rows)

    def first_token(self, job: Job, seconds: float) -> None:
        self.metrics.first_token(seconds)

    def row_done(self, job: Job, row: Any, seconds: float) -> None:
        self.metrics.tokens(_label(job.adapter), row.prompt_tokens, row.completion_tokens)


def _label(adapter: str | None) -> str:
    return adapter if adapter is not None else BASE_ALIAS


def _as_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PlugtuneError):
        return ApiError(400, _one_line(str(exc)))
    return _internal_error(exc)


def _internal_error(exc: BaseException, where: str = "") -> ApiError:
    """A bug (an exception no rule expected) as a 500 with one line: its type and the start
    of its message, never a traceback; the server log has the traceback."""
    detail = _one_line(str(exc))[:200]
    return ApiError(500, f"internal error{f' in {where}' if where else ''} ({type(exc).__name__}"
                    f"{f': {detail}' if detail else ''}); the server log has the traceback")


# -- the application --------------------------------------------------------------------------


class Service:
    """What the HTTP routes need: the host, its worker, and the rules for names and paths."""

    def __init__(self, host: Any, *, adapters_root: str | Path = "adapters", max_batch: int = 16,
                 base_name: str | None = None, allow_pickle: bool = False,
                 window_s: float = DEFAULT_BATCH_WINDOW_S, default_chat_tokens: int = 256,
                 api_key: str | None = None, limits: RequestLimits | None = None,
                 max_adapters: int | None = None, pinned: Sequence[str] = (),
                 step_tokens: int = DEFAULT_STEP_TOKENS, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES) -> None:
        self.host = host
        self.adapters_root = Path(adapters_root).resolve()
        self.base_name = base_name or str(host.base.info.id)
        self.allow_pickle = allow_pickle
        self.api_key = checked_api_key(api_key)
        self.default_chat_tokens = default_chat_tokens
        self.limits = limits or RequestLimits.from_env()
        self.metrics = ServingMetrics()
        self.worker = BatchWorker(host, max_batch=max_batch, window_s=window_s, step_tokens=step_tokens,
                                  chunk_tokens=chunk_tokens, mask_fn=_mask_fn(), observer=WorkerObserver(self.metrics),
                                  prefix_cache_bytes=prefix_cache_bytes)
        # adapters under the root load on first request; at most max_adapters stay resident
        self.cache = AdapterCache(host, self.adapters_root, max_adapters=max_adapters, pinned=pinned,
                                  allow_pickle=allow_pickle)
        self.metrics.watch_cache(self.cache)
        self.worker.prepare = self._prepare
        self._compiler: Any = None
        self._compiler_lock = threading.Lock()
        # Counting tokens and rendering chat templates run on these threads, never on the event
        # loop (a long prompt must not hold up /health or other clients), each thread with its
        # own copy of the tokenizer, so that none shares mutable tokenizer state with another
        # or with the worker thread.
        self.tokenizing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="plugtune-tokenize")
        self._local = threading.local()
        self.created = int(time.time())
        self.context_length: int | None = getattr(host.base.model.config, "max_position_embeddings", None)

    @property
    def tokenizer(self) -> Any:
        """The calling thread's own copy of the host's tokenizer."""
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = copy.deepcopy(self.host.tokenizer)
        return tokenizer

    async def off_loop(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on a tokenizing thread, awaited."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)

    @property
    def classification(self) -> bool:
        return bool(self.host.task.is_classification)

    # -- names --------------------------------------------------------------------------------

    def resolve(self, request: _Request) -> tuple[str | None, str]:
        """The adapter a request asks for (``None``: the bare base) and the name to echo."""
        name = request.adapter if request.adapter is not None else request.model
        if name is None or name in (BASE_ALIAS, self.base_name):
            return None, self.base_name
        if name in self.host.adapters:
            return name, name
        loaded = ", ".join(self.host.adapters) or "none"
        raise ApiError(404, f"no adapter or model named {name!r} (loaded adapters: {loaded}; "
                       f"{BASE_ALIAS!r} or {self.base_name!r} is the base)", code="model_not_found", param="model")

    async def resolve_loading(self, request: _Request) -> tuple[str | None, str]:
        """:meth:`resolve`, or, for a name that is not loaded, an adapter folder of that name
        under the adapters root: its files are read now, off the model thread, and it is
        attached when its request joins the batch (evicting the least recently used adapter
        when ``max_adapters`` are resident)."""
        try:
            return self.resolve(request)
        except ApiError as missing:
            name = request.adapter if request.adapter is not None else request.model
            if name is None or not ADAPTER_NAME.fullmatch(name) or name not in await self.off_loop(self.cache.available):
                raise missing from None
            try:
                await asyncio.wrap_future(self.cache.prefetch(name))
            except AdapterError as exc:
                raise ApiError(400, _one_line(f"adapter {name!r} under {self.adapters_root}: {exc}"), param="model") from None
            return name, name

    def _prepare(self, job: Job) -> bool:
        """On the model thread, before ``job`` joins: make its adapter resident (attaching
        the files its request already read, evicting the least recently used adapter if
        needed). ``False``: not yet (its files are still being read, or every resident
        adapter is in use or pinned); the job waits for a later step, and the batch runs on."""
        if job.adapter is None:
            return True
        if self.cache.reading(job.adapter):  # its files are being read: the batch runs on meanwhile
            return False
        try:  # resident, read, or (its read dropped) read now
            self.cache.ensure(job.adapter, in_use=self.worker.in_use())
        except CacheFullError:
            return False
        except AdapterPathError as exc:
            raise ApiError(exc.status, _one_line(str(exc)), param="model") from None
        except AdapterError as exc:
            raise ApiError(400, _one_line(str(exc)), param="model") from None
        return True

    def constraint(self, body: dict[str, Any], adapter: str | None) -> Any:
        """The factory of a request's output constraint (``response_format`` with a JSON schema
        or ``json_object``; vLLM's ``guided_json``/``guided_regex``/``guided_choice`` or
        ``structured_outputs``; ``guided_choice: "labels"``: the adapter's label words), or
        ``None`` (call it through :meth:`off_loop`: compiling a grammar takes a moment, once
        per schema)."""
        from plugtune.serving.constraints import build_constraint, constraint_from_request

        try:
            if body.get("guided_choice") == "labels":
                body = {**body, "guided_choice": self.label_choices(adapter)}
            spec = constraint_from_request(body)
            if spec is None:
                return None
            return build_constraint(spec, self.compiler())
        except ValueError as exc:
            raise ApiError(400, _one_line(str(exc))) from None

    def label_choices(self, adapter: str | None) -> list[str]:
        """What a classification-style causal adapter answers: its labels as its response
        template renders them (``guided_choice: "labels"``)."""
        task = self.host.adapters[adapter].task if adapter is not None and adapter in self.host.adapters else None
        labels = (getattr(task, "labels", None) or list(getattr(task, "label_words", None) or {})) if task else None
        render = getattr(task, "label_response", None)
        choices = [render(str(label)) for label in labels or []] if render is not None else []
        if not choices or any(c is None or not c.strip() for c in choices):
            raise ApiError(400, "guided_choice: 'labels' needs an adapter trained on labels whose response template "
                           "names only the label (e.g. response ' {label}' with labels declared); give the choices "
                           "as a list of strings instead", param="guided_choice")
        return choices

    def compiler(self) -> Any:
        """The grammar compiler for this host's tokenizer (made on first use, then shared)."""
        from plugtune.serving.constraints import ConstraintCompiler

        with self._compiler_lock:
            if self._compiler is None:
                vocab = self.host.base.model.get_output_embeddings().weight.shape[0]
                stops = sorted(eos_ids(self.host.tokenizer, self.host.base.model.generation_config))
                self._compiler = ConstraintCompiler(self.host.tokenizer, vocab, stops)
            return self._compiler

    def adapter_path(self, path: str) -> Path:
        """``path`` (relative to the adapters root, or absolute) resolved, refused unless it
        and every file in it lie inside the adapters root
        (:func:`plugtune.serving.cache.adapter_folder`)."""
        try:
            return adapter_folder(self.adapters_root, path, fix="restart the server with another --adapters-root",
                                  who="adapters loaded over HTTP")
        except AdapterPathError as exc:
            raise ApiError(exc.status, str(exc), param="path") from None

    # -- adapters -----------------------------------------------------------------------------

    def describe(self, name: str) -> dict[str, Any]:
        hosted = self.host.adapters[name]
        m = hosted.manifest
        return {"name": name, "method": m.method.name, "size_bytes": hosted.size_bytes,
                "fingerprint": m.base_model.fingerprint, "base_model": m.base_model.id,
                "task": m.task.get("type"), "labels": m.task.get("labels"), "path": str(hosted.path)}

    def load(self, request: LoadRequest) -> dict[str, Any]:
        """Load an adapter from inside the adapters root (in a worker thread: it waits for
        the running batch)."""
        from plugtune.artifacts.adapters import read_manifest

        path = self.adapter_path(request.path)
        name = request.name
        if name is None:
            try:
                name = read_manifest(path).name
            except AdapterError as exc:
                raise ApiError(400, _one_line(str(exc)), param="path") from None
        if not ADAPTER_NAME.fullmatch(name) or name == BASE_ALIAS or name == self.base_name:
            raise ApiError(400, f"adapter name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
                           f"(at most 64, not starting with '.' or '-'), and not {BASE_ALIAS!r}", param="name")
        with self.worker.lock:
            if name in self.host.adapters:
                raise ApiError(409, f"an adapter named {name!r} is already loaded; unload it first or pick another name",
                               param="name")
            try:
                self.host.load(path, name=name, allow_pickle=self.allow_pickle)
            except AdapterError as exc:
                raise ApiError(400, _one_line(str(exc)), param="path") from None
        return self.describe(name)

    def unload(self, name: str, wait_s: float = 60.0) -> dict[str, Any]:
        """Unload ``name`` once no running row uses it (waiting up to ``wait_s``; the rows
        already running finish on it, new requests for it are refused once it is gone)."""
        deadline = time.monotonic() + wait_s
        while True:
            with self.worker.lock:
                if name not in self.host.adapters:
                    raise ApiError(404, f"no adapter named {name!r} is loaded", code="model_not_found")
                if name not in self.worker.in_use():
                    self.host.unload(name)
                    return {"id": name, "object": "adapter", "deleted": True}
            if time.monotonic() > deadline:
                raise ApiError(409, f"adapter {name!r} is still in use by running requests after {wait_s:.0f} s; "
                               "try again later", param="name")
            time.sleep(0.01)

    # -- prompts ------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def count_all(self, texts: list[str | list[int]]) -> list[int]:
        """Each prompt's token count, a prompt being text or token ids (call it through
        :meth:`off_loop`)."""
        return [len(ids) for ids in self.encode_all(texts)]

    def encode_all(self, texts: list[str | list[int]]) -> list[list[int]]:
        """Each prompt's token ids (ids are kept as given), so that the model thread never
        tokenizes (call it through :meth:`off_loop`)."""
        words = [t for t in texts if isinstance(t, str)]
        encoded = iter(self.tokenizer(words)["input_ids"] if words else [])
        return [list(next(encoded)) if isinstance(t, str) else list(t) for t in texts]

    def check_budget(self, texts: Sequence[str], field: str) -> None:
        """The request's count of texts and their total characters against :attr:`limits`,
        before anything is tokenized."""
        limits = self.limits
        if not texts or len(texts) > limits.inputs:
            raise ApiError(400, f"{field}: give a string or a list of 1 to {limits.inputs} strings (got {len(texts)})",
                           param=field)
        total = sum(len(t) for t in texts)
        if total > limits.characters:
            raise ApiError(413, f"{field}: {total} characters in this request, more than the server's limit of "
                           f"{limits.characters}; send shorter text (the server's operator can raise "
                           f"{LIMIT_VARIABLES['characters']})", code="request_too_large", param=field)

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if self.context_length and prompt_tokens + max_tokens > self.context_length:
            raise ApiError(400, f"this model's context is {self.context_length} tokens; the prompt has {prompt_tokens} "
                           f"and max_tokens asks for {max_tokens} more: shorten the prompt or lower max_tokens",
                           code="context_length_exceeded", param="max_tokens")

    def chat_prompt(self, messages: list[ChatMessage], adapter: str | None) -> list[int]:
        """The prompt ids for a chat request: :meth:`AdapterHost.chat_prompt`'s rule (an
        adapter trained on conversations renders the whole conversation with its own recorded
        template; one trained on single prompts gets its template filled with the last user
        message; the bare base uses the tokenizer's chat template)."""
        try:
            return self.host.chat_prompt([{"role": m.role, "content": m.text()} for m in messages], adapter,
                                         tokenizer=self.tokenizer)
        except DataError as exc:
            raise ApiError(400, str(exc), param="messages") from None


def checked_api_key(api_key: str | None) -> str | None:
    """``api_key`` as the server will require it; ``None``: no authentication. A key that is
    set but empty or only whitespace (``PLUGTUNE_API_KEY=``) is refused with one line rather
    than silently turning authentication off."""
    if api_key is None:
        return None
    if not api_key.strip():
        raise PlugtuneError("PLUGTUNE_API_KEY is set but empty: set it to the key clients must send, "
                            "or unset it to serve without authentication")
    if api_key != api_key.strip():
        raise PlugtuneError("PLUGTUNE_API_KEY starts or ends with whitespace, which no client sends; remove it")
    return api_key


class RequestGuard:
    """The outermost layer of the application (pure ASGI). Bounds each request body by
    ``body_bytes`` before the application sees it: a ``Content-Length`` over the limit is
    answered 413 before one byte is read, and a body streamed without one is read only up to
    the limit. Also the last guard: an exception that nothing else handled is logged with
    its traceback and answered as a 500 with one line (when the response has not begun)."""

    def __init__(self, app: Any, body_bytes: int) -> None:
        self.app = app
        self.body_bytes = body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        where = f"{scope.get('method', '')} {scope.get('path', '')}"
        try:
            body = await self._read_body(scope, receive)
            if isinstance(body, ApiError):
                await self._answer(tracked, body)
                return
            if body is None:  # the client left while sending
                return
            replay = [{"type": "http.request", "body": body, "more_body": False}]

            async def replayed() -> dict[str, Any]:
                return replay.pop() if replay else await receive()

            await self.app(scope, replayed, tracked)
        except Exception as exc:
            log.exception("%s failed", where)
            if not started:
                await self._answer(tracked, _internal_error(exc, where))

    def _too_large(self, size: int | None) -> ApiError:
        told = f"has {size} bytes, more than" if size is not None else "is longer than"
        return ApiError(413, f"the request body {told} the server's limit of {self.body_bytes} bytes; send less "
                        f"(the server's operator can raise {LIMIT_VARIABLES['body_bytes']})", code="request_too_large")

    async def _read_body(self, scope: dict[str, Any], receive: Any) -> bytes | ApiError | None:
        declared = [v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"]
        if declared:
            try:
                size = int(declared[0])
            except ValueError:
                size = -1
            if size < 0:
                return ApiError(400, "the Content-Length header is not a size in bytes")
            if size > self.body_bytes:
                return self._too_large(size)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.body_bytes:
                return self._too_large(None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _answer(send: Any, error: ApiError) -> None:
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _error(exc: ApiError) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status)


def _type_tag(part: Any) -> bool:
    """Pydantic names the member of a union that failed (``prompt.str``): not a field."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "list", "dict"} or "[" in part)


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(service: Service) -> Any:
    """The FastAPI application over ``service``; its lifespan starts and stops the worker."""
    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.worker.stop)
            service.tokenizing.shutdown(wait=False, cancel_futures=True)
            service.cache.close()

    async def authorize(request: Request) -> None:
        """With an API key set, every endpoint but /health wants ``Authorization: Bearer KEY``."""
        if service.api_key is None or request.url.path == "/health":
            return
        expected = f"Bearer {service.api_key}".encode()
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    app = FastAPI(title="plugtune", lifespan=lifespan, docs_url=None, redoc_url=None,
                  dependencies=[Depends(authorize)])
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Any:
        if request.url.path in ACCOUNTED:
            service.metrics.request_done(getattr(request.state, "adapter", "none"), request.url.path, exc.status,
                                         time.monotonic() - getattr(request.state, "started", time.monotonic()))
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Any:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return _error(ApiError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"))
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _type_tag(p))
        others = len({tuple(e.get("loc", ())[:2]) for e in errors}) - 1  # problems in other fields
        more = f" (and {others} more problem{'s' if others > 1 else ''})" if others > 0 else ""
        return _error(ApiError(422, _one_line(f"{where or 'body'}: {first.get('msg')}{more}"), param=where or None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:
        return _error(ApiError(exc.status_code, _one_line(f"{request.method} {request.url.path}: {exc.detail}")))

    @app.exception_handler(PlugtuneError)
    async def plugtune_error(request: Request, exc: PlugtuneError) -> Any:
        return _error(ApiError(400, _one_line(str(exc))))

    # Exceptions no handler above expects reach RequestGuard: a logged traceback and a one-line 500.
    app.add_middleware(RequestGuard, body_bytes=service.limits.body_bytes)

    # -- status -------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        worker = service.worker
        return {"status": "ok", "base_model": service.base_name, "task": service.host.task.type,
                "adapters": list(service.host.adapters), "waiting": worker.waiting, "batches": worker.batches,
                "rows": worker.rows, "largest_batch": worker.largest_batch, "max_batch": worker.max_batch,
                "running": worker.running, "steps": worker.engine.steps if worker.engine is not None else 0,
                "dtype": str(next(service.host.base.model.parameters()).dtype).removeprefix("torch."),
                "precision": getattr(service.host.precision, "reason", None)}

    def model_card(name: str | None) -> dict[str, Any]:
        return {"id": name or service.base_name, "object": "model", "created": service.created, "owned_by": "plugtune",
                "root": service.base_name, "parent": service.base_name if name else None}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(None), *(model_card(n) for n in list(service.host.adapters))]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        adapter, _ = service.resolve(_Request(model=name))
        return model_card(adapter)

    # -- adapters -----------------------------------------------------------------------------

    @app.get("/v1/adapters")
    async def list_adapters() -> dict[str, Any]:
        """Resident adapters (``data``, least recently used first where the cache tracks it)
        and the adapter folders under the root that load on first request (``available``)."""
        available = await service.off_loop(service.cache.available)
        return {"object": "list", "data": [service.describe(name) for name in list(service.host.adapters)],
                "available": available, "max_adapters": service.cache.max_adapters,
                "pinned": service.cache.pinned}

    @app.get("/metrics")
    async def metrics(request: Request) -> Any:
        """Prometheus metrics (text exposition format, or OpenMetrics when asked for)."""
        from fastapi.responses import Response

        body, content_type = service.metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(body: LoadRequest) -> dict[str, Any]:
        return await run_in_threadpool(service.load, body)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        return await run_in_threadpool(service.unload, name)

    # -- inference ----------------------------------------------------------------------------

    def submit(kind: str, texts: list[str | list[int]], adapter: str | None, sampling: _Sampling | None = None,
               max_tokens: int = 0, constraint: Any = None) -> tuple[asyncio.Queue, list[Job]]:
        """One job per prompt and choice (``n`` of them per prompt: choice ``p * n + j``; with
        a ``seed``, choice ``j`` samples with ``seed + j``, so choices differ and repeat)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        n = sampling.n if sampling is not None else 1
        for p, text in enumerate(texts):
            for j in range(n):
                job = Job(kind, text, adapter, loop, events, index=p * n + j)  # type: ignore[arg-type]
                if sampling is not None:
                    job.max_tokens, job.temperature, job.top_p = max_tokens, sampling.temperature, sampling.top_p
                    job.stop = sampling.stops()
                    job.seed = sampling.seed + j if sampling.seed is not None else None
                    job.logprobs = sampling.top_logprobs_wanted()
                    job.echo = bool(getattr(sampling, "echo", False))
                    job.ignore_eos = sampling.ignore_eos
                    job.constraint = constraint
                jobs.append(job)
        for job in jobs:
            service.worker.submit(job)
        return events, jobs

    async def started(events: asyncio.Queue, jobs: list[Job]) -> list[tuple[int, str, Any]]:
        """Wait until every job has joined the running batch; raise the first error before any
        response is sent. Returns events that arrived meanwhile, in order."""
        waiting, early = {job.index for job in jobs}, []
        while waiting:
            index, kind, payload = await events.get()
            if kind == "error":
                for job in jobs:
                    job.cancelled = True
                raise payload
            if kind == "start":
                waiting.discard(index)
            else:
                early.append((index, kind, payload))
        return early

    def check_generation(sampling: _Sampling) -> None:
        if service.classification:
            raise ApiError(400, "this server holds a classifier base; use POST /v1/classify")
        if sampling.best_of not in (None, 1, sampling.n):
            raise ApiError(400, "best_of: only best_of equal to n is supported (every sample is returned)",
                           param="best_of")

    async def generate(request: Request, texts: list[str | list[int]], adapter: str | None, sampling: _Sampling,
                       max_tokens: int | None, chat: bool, model_name: str, body: dict[str, Any]) -> Any:
        """``max_tokens`` ``None``: as much as the context leaves, up to the chat default."""
        encoded = await service.off_loop(service.encode_all, texts)
        prompt_tokens = [len(ids) for ids in encoded]
        if max_tokens is None:
            room = (service.context_length or 0) - max(prompt_tokens)
            max_tokens = max(1, min(service.default_chat_tokens, room)) if service.context_length else service.default_chat_tokens
        for n in prompt_tokens:
            if n == 0:  # nothing to continue from (no BOS token): refused rather than batched
                raise ApiError(400, "the prompt is empty: it encodes to no tokens", param="prompt")
            service.check_length(n, max_tokens)
        constraint = await service.off_loop(service.constraint, body, adapter)
        events, jobs = submit("generate", encoded, adapter, sampling, max_tokens, constraint)
        early = await unless_disconnected(request, jobs, started(events, jobs))
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}
        prompts = [texts[job.index // sampling.n] for job in jobs]
        render = LogprobRenderer(service.tokenizer, chat)
        if sampling.stream:
            def finished(failed: bool) -> None:
                service.metrics.request_done(_label(adapter), request.url.path, 500 if failed else 200,
                                             time.monotonic() - request.state.started)

            stream = _stream_events(events, jobs, early, head, chat, prompt_tokens, sampling, render, prompts, finished)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        out = [ChoiceText() for _ in jobs]

        async def collect() -> None:
            async with contextlib.aclosing(job_events(events, jobs, early)) as stream:
                async for index, kind, payload in stream:
                    if kind == "error":
                        raise payload
                    out[index].add(kind, payload)

        await unless_disconnected(request, jobs, collect())
        choices = []
        for job, choice, prompt in zip(jobs, out, prompts):
            logprobs = None
            if job.logprobs is not None:
                logprobs = render.logprobs(choice.prompt_info, choice.tokens, prompt if job.echo else None,
                                           choice.prompt_ids)
            if chat:
                choices.append({"index": job.index, "message": {"role": "assistant", "content": choice.text},
                                "logprobs": logprobs, "finish_reason": choice.finish})
            else:
                text = (render.prompt_text(prompt) if job.echo else "") + choice.text
                choices.append({"index": job.index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish})
        usage = _usage(sum(prompt_tokens), sum(c.completion for c in out))
        service.metrics.request_done(_label(adapter), request.url.path, 200, time.monotonic() - request.state.started)
        return JSONResponse({**head, "choices": choices, "usage": usage, "system_fingerprint": None})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        request.state.started = time.monotonic()
        check_generation(body)
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens: 0 generates nothing; give at least 1, or set echo to score the prompt",
                           param="max_tokens")
        if body.echo and body.stream and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs is not streamed; send it with stream false", param="echo")
        adapter, model_name = await service.resolve_loading(body)
        request.state.adapter = _label(adapter)
        prompts = body.prompts()
        service.check_budget([p if isinstance(p, str) else " " * len(p) for p in prompts], "prompt")
        if len(prompts) * body.n > service.limits.inputs:
            raise ApiError(400, f"n: {len(prompts)} prompts times n={body.n} is more than the server's "
                           f"{service.limits.inputs} rows per request", param="n")
        return await generate(request, prompts, adapter, body, body.max_tokens, chat=False, model_name=model_name,
                              body=body.model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        request.state.started = time.monotonic()
        check_generation(body)
        adapter, model_name = await service.resolve_loading(body)
        request.state.adapter = _label(adapter)
        service.check_budget(["".join(m.text() for m in body.messages)], "messages")
        prompt = await service.off_loop(service.chat_prompt, body.messages, adapter)
        return await generate(request, [prompt], adapter, body, body.token_budget(), chat=True, model_name=model_name,
                              body=body.model_dump())

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request) -> Any:
        if not service.classification:
            raise ApiError(400, "this server holds a language-model base; use POST /v1/completions or /v1/chat/completions")
        request.state.started = time.monotonic()
        adapter, model_name = service.resolve(body)
        request.state.adapter = _label(adapter)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        service.check_budget(texts, "input")
        counts = await service.off_loop(service.count_all, texts)
        events, jobs = submit("classify", texts, adapter)
        results = await unless_disconnected(request, jobs, classification_results(events, jobs))
        tokens = sum(counts)
        data = [{"object": "classification", "index": i, "score": r["score"]} if "label" not in r  # a reward model
                else {"object": "classification", "index": i, "label": r["label"], "scores": r["scores"]}
                for i, r in enumerate(results)]
        service.metrics.request_done(_label(adapter), "/v1/classify", 200, time.monotonic() - request.state.started)
        return {"object": "list", "model": model_name, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app


async def unless_disconnected(request: Request, jobs: list[Job], work: Awaitable[Any]) -> Any:
    """``work``'s result, unless the client disconnects first: then ``work`` is cancelled and
    so are ``jobs`` (their rows leave the batch, as a streaming client's do), and the
    request ends with a 499 nobody reads. Non-streaming requests wait through this, since
    nothing else would notice that their client has gone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request's own task is cancelled
        if not task.done():
            task.cancel()
            for job in jobs:
                job.cancelled = True
        watcher.cancel()
    if not task.done() or task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ApiError(499, "the client closed the request", code="client_closed_request")
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client of ``request`` (whose body has been read) disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def job_events(events: asyncio.Queue, jobs: list[Job],
                     early: Sequence[tuple[int, str, Any]] = ()) -> AsyncIterator[tuple[int, str, Any]]:
    """The events of one request's ``jobs`` as ``(index, kind, payload)``, ``early`` ones
    first, until every job has ended (``done`` or ``result``) or one failed (the ``error``
    event is the last one yielded). Completions, chat, their streams and classify all drain
    their jobs through it (use it inside ``contextlib.aclosing``).

    However it ends, every job is then marked cancelled: after the last event that changes
    nothing; on an error the other rows stop; and when the client disconnects (the request's
    task is cancelled while waiting here) the worker drops the rows nobody will read."""
    pending = {job.index for job in jobs}
    backlog = collections.deque(early)
    try:
        while pending:
            index, kind, payload = backlog.popleft() if backlog else await events.get()
            if kind in ("done", "result"):
                pending.discard(index)
            yield index, kind, payload
            if kind == "error":
                return
    finally:
        for job in jobs:
            job.cancelled = True


async def classification_results(events: asyncio.Queue, jobs: list[Job]) -> list[Any]:
    """Each classify job's result, in order; raises the first error (see :func:`job_events`)."""
    results: list[Any] = [None] * len(jobs)
    async with contextlib.aclosing(job_events(events, jobs)) as stream:
        async for index, kind, payload in stream:
            if kind == "error":
                raise payload
            if kind == "result":
                results[index] = payload
    return results


@dataclass
class ChoiceText:
    """One choice of a non-streamed answer, gathered from its job's events."""

    text: str = ""
    finish: str | None = None
    completion: int = 0
    tokens: list[Any] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    prompt_info: list[Any] = field(default_factory=list)

    def add(self, kind: str, payload: Any) -> None:
        if kind == "delta":
            text, tokens = payload
            self.text += text
            self.tokens += tokens
        elif kind == "prompt":
            self.prompt_ids, self.prompt_info = payload
        elif kind == "done":
            self.finish, self.completion = payload


LOGPROB_FLOOR = -9999.0
"""Log probabilities below this (``-inf`` included, which JSON cannot carry) are sent as it, as vLLM does."""


class LogprobRenderer:
    """Tokens and their log probabilities in OpenAI's two shapes: completions' ``{tokens,
    token_logprobs, top_logprobs, text_offset}`` (with ``echo``, the prompt's tokens first,
    the very first with ``None``) and chat's ``{content: [{token, logprob, bytes,
    top_logprobs}]}``. A token's text is its own decoding (a piece of a multi-byte character
    decodes to U+FFFD, as in vLLM)."""

    def __init__(self, tokenizer: Any, chat: bool) -> None:
        self.tokenizer = tokenizer
        self.chat = chat

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def prompt_text(self, prompt: str | list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.decode(prompt, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @staticmethod
    def _value(logprob: float) -> float:
        return max(float(logprob), LOGPROB_FLOOR)

    def logprobs(self, prompt_info: list[Any], tokens: list[Any], prompt: Any = None, prompt_ids: list[int] | None = None,
                 offset: int = 0) -> dict[str, Any]:
        if self.chat:
            return {"content": [self._chat_entry(t) for t in tokens], "refusal": None}
        entries: list[tuple[str, float | None, dict[str, float] | None]] = []
        if prompt is not None and prompt_ids:
            entries.append((self.token(prompt_ids[0]), None, None))
            entries += [(self.token(t.token), self._value(t.logprob), self._top(t)) for t in prompt_info]
        entries += [(self.token(t.token), self._value(t.logprob), self._top(t)) for t in tokens]
        offsets, at = [], offset
        for text, _, _ in entries:
            offsets.append(at)
            at += len(text)
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries], "text_offset": offsets}

    def _top(self, info: Any) -> dict[str, float] | None:
        if info.top is None:
            return None
        top: dict[str, float] = {}
        for token_id, logprob in info.top:
            top.setdefault(self.token(token_id), self._value(logprob))  # two ids may decode alike: the likelier stays
        return top

    def _chat_entry(self, info: Any) -> dict[str, Any]:
        text = self.token(info.token)
        return {"token": text, "logprob": self._value(info.logprob), "bytes": list(text.encode("utf-8")),
                "top_logprobs": [{"token": (t := self.token(i)), "logprob": self._value(lp), "bytes": list(t.encode("utf-8"))}
                                 for i, lp in (info.top or [])]}


async def _stream_events(events: asyncio.Queue, jobs: list[Job], early: list[tuple[int, str, Any]],
                         head: dict[str, Any], chat: bool, prompt_tokens: list[int], sampling: Any,
                         render: LogprobRenderer, prompts: list[Any],
                         finished: Any = None) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending ``data: [DONE]``; with logprobs,
    each chunk carries its new tokens'; with ``echo``, the prompt comes first."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    include_usage = sampling.include_usage()
    by_index = {job.index: job for job in jobs}
    offsets = {job.index: 0 for job in jobs}

    def logprobs(index: int, tokens: list[Any]) -> Any:
        job = by_index[index]
        if job.logprobs is None:
            return None
        rendered = render.logprobs([], tokens, offset=offsets[index])
        if not chat:
            offsets[index] = (rendered["text_offset"][-1] + len(rendered["tokens"][-1])) if rendered["tokens"] else offsets[index]
        return rendered

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False, tokens: list[Any] = ()) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs(index, list(tokens)) if tokens else None,
                      "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs(index, list(tokens)) if tokens else None,
                      "finish_reason": finish}
        return {**head, "choices": [choice]}

    completion = [0 for _ in jobs]
    failed = False
    try:
        if chat:
            for job in jobs:
                yield _sse(chunk(job.index, None, None, role=True))
        else:
            for job in jobs:
                if job.echo:
                    text = render.prompt_text(prompts[jobs.index(job)])
                    offsets[job.index] = len(text)
                    yield _sse(chunk(job.index, text, None))
        async with contextlib.aclosing(job_events(events, jobs, early)) as stream:
            async for index, kind, payload in stream:
                if kind == "delta":
                    text, tokens = payload
                    yield _sse(chunk(index, text, None, tokens=tokens))
                elif kind == "done":
                    reason, completion[index] = payload
                    yield _sse(chunk(index, None if chat else "", reason))
                elif kind == "error":
                    failed = True
                    yield _sse(payload.body())
        if include_usage and not failed:
            yield _sse({**head, "choices": [], "usage": _usage(sum(prompt_tokens), sum(completion))})
        yield _sse("[DONE]")
        if finished is not None:
            finished(failed)
    finally:
        for job in jobs:  # the stream closed before job_events started (the role chunks)
            job.cancelled = True


# -- running it -------------------------------------------------------------------------------


def build_host(adapter_dirs: Sequence[str | Path], base: str | None = None, *, allow_pickle: bool = False,
               dtype: str = "float32", rows: int = 16) -> Any:
    """The host ``plugtune serve`` holds: the base the first adapter names (or ``base``) and
    every adapter given, none of them active; with no adapters, ``base`` alone as a language model
    (the installed task that serves raw prompts). ``dtype``: ``float32``, ``bfloat16``, or
    ``auto`` (on a CPU, bf16 where the CPU has native bf16 and a probe at the model's shapes
    and ``rows`` rows per step shows it faster; on a GPU, bf16); the choice is on
    ``host.precision``."""
    import torch

    from plugtune.artifacts.adapters import read_manifest
    from plugtune.data.tasks import build_task, raw_prompt_task
    from plugtune.kernel.hardware import PrecisionChoice, choose_cpu_dtype
    from plugtune.serving.host import AdapterHost

    if dtype not in DTYPES:
        raise PlugtuneError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if adapter_dirs:
        first = read_manifest(adapter_dirs[0])
        task = build_task(first.task, where=f"adapter {adapter_dirs[0]}: task")
        base = base or first.base_model.id
    elif not base:
        raise PlugtuneError("give adapter folders (plugtune serve adapters/NAME ...) or --base MODEL")
    else:
        task = raw_prompt_task()
    gpu = torch.cuda.is_available()
    host = AdapterHost.from_base(base, task, dtype=torch.bfloat16 if gpu and dtype != "float32" else torch.float32)
    config = host.base.model.config
    if dtype == "auto" and not gpu:
        hidden = getattr(config, "hidden_size", None)
        choice = choose_cpu_dtype(hidden, getattr(config, "intermediate_size", 4 * hidden), rows=rows) if hidden else \
            PrecisionChoice(torch.float32, "fp32: the model's shapes are unknown")
    elif dtype == "auto":
        choice = PrecisionChoice(torch.bfloat16, "bf16: on a GPU")
    else:
        choice = PrecisionChoice(getattr(torch, dtype), f"{dtype}: as --dtype asked")
    if choice.dtype != next(host.base.model.parameters()).dtype:
        host.base.model.to(choice.dtype)
    host.precision = choice
    for directory in adapter_dirs:
        host.load(directory, allow_pickle=allow_pickle)
    host.use(None)  # a request names its adapter; none is active by default
    return host


DTYPES = ("auto", "float32", "bfloat16")
"""``plugtune serve --dtype`` choices."""


@contextlib.contextmanager
def running(app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread for the ``with`` block; yields the
    base URL (``port=0``: a free port). For tests, benchmarks and notebooks."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="plugtune-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise PlugtuneError(f"the server did not start on {host}:{sock.getsockname()[1]}")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def serve(adapter_dirs: Sequence[str | Path] = (), *, base: str | None = None, adapters_root: str | Path = "adapters",
          host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16, allow_pickle: bool = False,
          log_level: str = "info", threads: int | None = None, api_key: str | None = None,
          dtype: str = "auto", max_adapters: int | None = None,
          prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES) -> None:
    """Load the host and serve it until interrupted (``plugtune serve``). ``threads``: torch's
    CPU threads (on a CPU shared with other work, 1 avoids threads waiting on each other);
    ``api_key``: require ``Authorization: Bearer KEY`` on every endpoint but /health."""
    import torch
    import uvicorn

    if max_batch < 1:
        raise PlugtuneError(f"--max-batch must be at least 1 (got {max_batch})")
    api_key = checked_api_key(api_key)  # before the model loads: a refused key costs nothing
    limits = RequestLimits.from_env()
    if threads is not None:
        if threads < 1:
            raise PlugtuneError(f"--threads must be at least 1 (got {threads})")
        torch.set_num_threads(threads)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this port can run the model and load adapters from %s%s",
                    host, adapters_root, "" if api_key else "; there is no authentication (set PLUGTUNE_API_KEY)")
    if max_adapters is not None and max_adapters < max(1, len(adapter_dirs)):
        raise PlugtuneError(f"--max-adapters {max_adapters} is fewer than the {len(adapter_dirs)} adapters named on the "
                            "command line (they stay resident); raise it or name fewer")
    model_host = build_host(adapter_dirs, base, allow_pickle=allow_pickle, dtype=dtype, rows=max_batch)
    print(f"plugtune serve: precision {model_host.precision.reason}", file=sys.stderr, flush=True)
    service = Service(model_host, adapters_root=adapters_root, max_batch=max_batch, base_name=base,
                      allow_pickle=allow_pickle, api_key=api_key, limits=limits, max_adapters=max_adapters,
                      pinned=list(model_host.adapters), prefix_cache_bytes=prefix_cache_bytes)
    uvicorn.run(create_app(service), host=host, port=port, log_level=log_level)
