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
from plugtune.serving.cache import ADAPTER_NAME, AdapterPathError, adapter_folder

log = logging.getLogger("plugtune.serving.server")

BASE_ALIAS = "base"
DEFAULT_BATCH_WINDOW_S = 0.005
MAX_MESSAGES = 1024
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
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = None
    logprobs: bool | int | None = None
    best_of: int | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: give at most 4 non-empty strings", param="stop")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False


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
    """One row of a batch: a prompt to continue, or a text to classify.

    The worker reports on ``events`` (an asyncio queue of the request's loop) with tuples
    ``(index, kind, payload)``: ``("start", None)`` when its batch begins, ``("delta", text)``
    per piece of new text, ``("done", (finish_reason, completion_tokens))`` or
    ``("result", classification)`` at the end, ``("error", ApiError)`` on failure.
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
    cancelled: bool = False  # the client went away: stop sending, drop the row when possible
    ended: bool = False  # its last event ("done", "result" or "error") was sent
    sent: str = ""  # the text sent so far ("delta" events), so that a row can be resumed alone
    sent_tokens: int = 0  # the tokens generated so far

    def emit(self, kind: str, payload: Any = None) -> None:
        if kind in ("done", "result", "error"):
            self.ended = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, payload))
        except RuntimeError:  # the server's loop is closed (shutdown): nobody is listening
            self.cancelled = True


class BatchWorker:
    """The one thread that runs the model.

    It takes the first waiting job, then (holding ``lock``) the jobs queued behind it and
    those arriving within ``window_s``, and runs up to ``max_batch`` of them as one batch,
    each row with its own adapter. Jobs that arrive while a batch runs wait for the next. A job with a sampling ``seed`` runs in a batch of its own, so
    the same seed gives the same text whatever else is waiting. ``lock`` is held while a
    batch runs; take it to change the adapter set between batches.
    """

    def __init__(self, host: Any, *, max_batch: int = 16, window_s: float = DEFAULT_BATCH_WINDOW_S) -> None:
        if max_batch < 1:
            raise PlugtuneError(f"max_batch must be at least 1 (got {max_batch})")
        self.host = host
        self.max_batch = max_batch
        self.window_s = window_s
        self.lock = threading.RLock()
        self.batches = 0
        self.rows = 0
        self.largest_batch = 0
        self.submitted = 0  # jobs handed to submit(), ever (tests wait on it to batch requests together)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._deferred: collections.deque[Job] = collections.deque()
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._deferred)

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

    def _loop(self) -> None:
        while True:
            first = self._deferred.popleft() if self._deferred else self._queue.get()
            if first is None:
                return
            with self.lock:  # the adapter set changes only between batches
                batch = [job for job in self._fill(first) if not job.cancelled]
                if batch:
                    self._run(batch)

    def _fill(self, first: Job) -> list[Job]:
        """``first`` and the jobs that can join it: those waiting, then those arriving
        within the window, up to ``max_batch``. Jobs that cannot join wait for a later batch."""
        batch = [first]
        if first.seed is not None:
            return batch

        def fits(job: Job) -> bool:
            return job.seed is None and job.kind == first.kind

        for job in list(self._deferred):  # earlier arrivals first
            if len(batch) < self.max_batch and fits(job):
                self._deferred.remove(job)
                batch.append(job)
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            if fits(job):
                batch.append(job)
            else:
                self._deferred.append(job)
        return batch

    def _run(self, batch: list[Job]) -> None:
        """Run ``batch``; if it fails, run each of its rows that had not ended again alone
        (a generation resumes after the text it already sent), so that a failure that
        belongs to one row ends that row alone, never its batch."""
        self.batches += 1
        self.rows += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            self._run_kind(batch, resume=False)
        except Exception as exc:  # the worker must outlive any one batch
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return
            log.warning("a batch of %d rows failed (%s: %s); running its rows one at a time", len(batch),
                        type(exc).__name__, _one_line(str(exc))[:200])
            for job in batch:
                if job.ended or job.cancelled:
                    continue
                try:
                    self._run_kind([job], resume=True)
                except Exception as row_exc:
                    self._fail(job, row_exc)

    def _run_kind(self, batch: list[Job], *, resume: bool) -> None:
        if batch[0].kind == "classify":
            self._classify(batch, resume=resume)
        else:
            self._generate(batch, resume=resume)

    @staticmethod
    def _fail(job: Job, exc: Exception) -> None:
        """Answer ``job`` with the error ``exc`` (logged with its traceback when it is a bug)."""
        error = _as_api_error(exc)
        if error.status >= 500:
            log.error("a request row failed", exc_info=exc)
        if not job.ended:
            job.emit("error", error)

    def _usable(self, batch: list[Job]) -> list[Job]:
        """The jobs whose adapter is still loaded; the others are answered 404."""
        usable = []
        for job in batch:
            if job.adapter is not None and job.adapter not in self.host.adapters:
                job.emit("error", ApiError(404, f"adapter {job.adapter!r} was unloaded before the request ran",
                                           code="model_not_found"))
            else:
                usable.append(job)
        return usable

    def _begin(self, batch: list[Job], resume: bool) -> list[Job]:
        """The jobs of ``batch`` that can run (see :meth:`_usable`), told they started unless
        they are ``resume``d rows of a failed batch (they were told then)."""
        batch = self._usable(batch)
        if not resume:
            for job in batch:
                job.emit("start")
        return batch

    def _classify(self, batch: list[Job], *, resume: bool = False) -> None:
        batch = self._begin(batch, resume)
        if not batch:
            return
        results = self.host.classify([job.text for job in batch], [job.adapter for job in batch])
        for job, result in zip(batch, results):
            job.emit("result", result)

    def _resumed(self, job: Job) -> str | list[int]:
        """The job's prompt followed by the text it already sent (none unless resumed)."""
        if isinstance(job.text, str):
            return job.text + job.sent
        return job.text + (self.host.tokenizer(job.sent, add_special_tokens=False)["input_ids"] if job.sent else [])

    def _generate(self, batch: list[Job], *, resume: bool = False) -> None:
        """Decode the batch as one stream, each row with its own adapter, sampling, token
        budget and stop strings (the stream cuts each row and takes it out of the batch).
        Before every step, rows whose client went away are cancelled, so they stop costing
        forwards; after it, each row's new text and, once it has finished, its finish reason
        and token count are sent to its request. ``resume``: the rows ran before in a batch
        that failed; each continues from its prompt and the text it already sent, with what
        is left of its token budget."""
        batch = self._begin(batch, resume)
        if not batch:
            return
        already = [job.sent_tokens for job in batch]
        stream = self.host.stream(
            [self._resumed(job) for job in batch], [job.adapter for job in batch], raw=True,
            max_new_tokens=[max(0, job.max_tokens - job.sent_tokens) for job in batch],
            stop=[job.stop for job in batch], temperature=[job.temperature for job in batch],
            top_p=[job.top_p for job in batch], seed=batch[0].seed,
        )

        def report() -> None:
            for i, job in enumerate(batch):
                job.sent_tokens = already[i] + stream.completion_tokens[i]
                if stream.finish_reasons[i] in ("stop", "length") and not job.ended:
                    job.emit("done", (stream.finish_reasons[i], job.sent_tokens))

        while True:
            for i, job in enumerate(batch):
                if job.cancelled:
                    stream.cancel(i)
            deltas = next(stream, None)
            if deltas is None:  # every row has finished or been cancelled
                break
            for i, job in enumerate(batch):
                if deltas[i] and not job.cancelled:
                    job.sent += deltas[i]
                    job.emit("delta", deltas[i])
            report()
        report()  # rows that finished before any step (no budget left)


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
                 api_key: str | None = None, limits: RequestLimits | None = None) -> None:
        self.host = host
        self.adapters_root = Path(adapters_root).resolve()
        self.base_name = base_name or str(host.base.info.id)
        self.allow_pickle = allow_pickle
        self.api_key = checked_api_key(api_key)
        self.default_chat_tokens = default_chat_tokens
        self.limits = limits or RequestLimits.from_env()
        self.worker = BatchWorker(host, max_batch=max_batch, window_s=window_s)
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

    def unload(self, name: str) -> dict[str, Any]:
        with self.worker.lock:
            if name not in self.host.adapters:
                raise ApiError(404, f"no adapter named {name!r} is loaded", code="model_not_found")
            self.host.unload(name)
        return {"id": name, "object": "adapter", "deleted": True}

    # -- prompts ------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def count_all(self, texts: list[str | list[int]]) -> list[int]:
        """Each prompt's token count, a prompt being text or token ids (call it through
        :meth:`off_loop`)."""
        words = [t for t in texts if isinstance(t, str)]
        counts = iter([len(ids) for ids in self.tokenizer(words)["input_ids"]] if words else [])
        return [next(counts) if isinstance(t, str) else len(t) for t in texts]

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
                "rows": worker.rows, "largest_batch": worker.largest_batch, "max_batch": worker.max_batch}

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
        return {"object": "list", "data": [service.describe(name) for name in list(service.host.adapters)]}

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(body: LoadRequest) -> dict[str, Any]:
        return await run_in_threadpool(service.load, body)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        return await run_in_threadpool(service.unload, name)

    # -- inference ----------------------------------------------------------------------------

    def submit(kind: str, texts: list[str | list[int]], adapter: str | None, sampling: _Sampling | None = None,
               max_tokens: int = 0) -> tuple[asyncio.Queue, list[Job]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for index, text in enumerate(texts):
            job = Job(kind, text, adapter, loop, events, index=index)  # type: ignore[arg-type]
            if sampling is not None:
                job.max_tokens, job.temperature, job.top_p = max_tokens, sampling.temperature, sampling.top_p
                job.stop, job.seed = sampling.stops(), sampling.seed
            jobs.append(job)
        for job in jobs:
            service.worker.submit(job)
        return events, jobs

    async def started(events: asyncio.Queue, jobs: list[Job]) -> list[tuple[int, str, Any]]:
        """Wait until every job's batch has begun; raise the first error before any
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
        if sampling.n != 1:
            raise ApiError(400, "n: only n=1 is supported; send the request again for more samples", param="n")
        if sampling.best_of not in (None, 1):
            raise ApiError(400, "best_of: only 1 is supported", param="best_of")
        if sampling.logprobs not in (None, False):
            raise ApiError(400, "logprobs are not supported by this server; leave the field out", param="logprobs")

    async def generate(request: Request, texts: list[str | list[int]], adapter: str | None, sampling: _Sampling,
                       max_tokens: int | None, chat: bool, model_name: str) -> Any:
        """``max_tokens`` ``None``: as much as the context leaves, up to the chat default."""
        prompt_tokens = await service.off_loop(service.count_all, texts)
        if max_tokens is None:
            room = (service.context_length or 0) - max(prompt_tokens)
            max_tokens = max(1, min(service.default_chat_tokens, room)) if service.context_length else service.default_chat_tokens
        for n in prompt_tokens:
            if n == 0:  # nothing to continue from (no BOS token): refused rather than batched
                raise ApiError(400, "the prompt is empty: it encodes to no tokens", param="prompt")
            service.check_length(n, max_tokens)
        events, jobs = submit("generate", texts, adapter, sampling, max_tokens)
        early = await unless_disconnected(request, jobs, started(events, jobs))
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}
        if sampling.stream:
            stream = _stream_events(events, jobs, early, head, chat, prompt_tokens, sampling.include_usage())
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts_out, finish, completion = ["" for _ in jobs], ["" for _ in jobs], [0 for _ in jobs]

        async def collect() -> None:
            async with contextlib.aclosing(job_events(events, jobs, early)) as stream:
                async for index, kind, payload in stream:
                    if kind == "delta":
                        texts_out[index] += payload
                    elif kind == "done":
                        finish[index], completion[index] = payload
                    elif kind == "error":
                        raise payload

        await unless_disconnected(request, jobs, collect())
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(texts_out, finish))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts_out, finish))]
        usage = _usage(sum(prompt_tokens), sum(completion))
        return JSONResponse({**head, "choices": choices, "usage": usage, "system_fingerprint": None})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_generation(body)
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        adapter, model_name = service.resolve(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        service.check_budget(prompts, "prompt")
        return await generate(request, prompts, adapter, body, body.max_tokens, chat=False, model_name=model_name)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        check_generation(body)
        adapter, model_name = service.resolve(body)
        service.check_budget(["".join(m.text() for m in body.messages)], "messages")
        prompt = await service.off_loop(service.chat_prompt, body.messages, adapter)
        return await generate(request, [prompt], adapter, body, body.token_budget(), chat=True, model_name=model_name)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request) -> Any:
        if not service.classification:
            raise ApiError(400, "this server holds a language-model base; use POST /v1/completions or /v1/chat/completions")
        adapter, model_name = service.resolve(body)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        service.check_budget(texts, "input")
        counts = await service.off_loop(service.count_all, texts)
        events, jobs = submit("classify", texts, adapter)
        results = await unless_disconnected(request, jobs, classification_results(events, jobs))
        tokens = sum(counts)
        data = [{"object": "classification", "index": i, "score": r["score"]} if "label" not in r  # a reward model
                else {"object": "classification", "index": i, "label": r["label"], "scores": r["scores"]}
                for i, r in enumerate(results)]
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


async def _stream_events(events: asyncio.Queue, jobs: list[Job], early: list[tuple[int, str, Any]],
                         head: dict[str, Any], chat: bool, prompt_tokens: list[int],
                         include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending ``data: [DONE]``."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice]}

    completion = [0 for _ in jobs]
    failed = False
    try:
        if chat:
            for job in jobs:
                yield _sse(chunk(job.index, None, None, role=True))
        async with contextlib.aclosing(job_events(events, jobs, early)) as stream:
            async for index, kind, payload in stream:
                if kind == "delta":
                    yield _sse(chunk(index, payload, None))
                elif kind == "done":
                    reason, completion[index] = payload
                    yield _sse(chunk(index, None if chat else "", reason))
                elif kind == "error":
                    failed = True
                    yield _sse(payload.body())
        if include_usage and not failed:
            yield _sse({**head, "choices": [], "usage": _usage(sum(prompt_tokens), sum(completion))})
        yield _sse("[DONE]")
    finally:
        for job in jobs:  # the stream closed before job_events started (the role chunks)
            job.cancelled = True


# -- running it -------------------------------------------------------------------------------


def build_host(adapter_dirs: Sequence[str | Path], base: str | None = None, *, allow_pickle: bool = False) -> Any:
    """The host ``plugtune serve`` holds: the base the first adapter names (or ``base``) and
    every adapter given, none of them active; with no adapters, ``base`` alone as a language model
    (the installed task that serves raw prompts)."""
    from plugtune.serving.host import AdapterHost
    from plugtune.data.tasks import raw_prompt_task

    if adapter_dirs:
        host = AdapterHost.from_adapters(*adapter_dirs, base_model=base, allow_pickle=allow_pickle)
        host.use(None)  # a request names its adapter; none is active by default
        return host
    if not base:
        raise PlugtuneError("give adapter folders (plugtune serve adapters/NAME ...) or --base MODEL")
    return AdapterHost.from_base(base, raw_prompt_task())


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
          log_level: str = "info", threads: int | None = None, api_key: str | None = None) -> None:
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
    model_host = build_host(adapter_dirs, base, allow_pickle=allow_pickle)
    service = Service(model_host, adapters_root=adapters_root, max_batch=max_batch, base_name=base,
                      allow_pickle=allow_pickle, api_key=api_key, limits=limits)
    uvicorn.run(create_app(service), host=host, port=port, log_level=log_level)
