"""``ServingMetrics``: what ``plugtune serve`` reports at ``/metrics``, in Prometheus format
(``prometheus_client``), each server with its own registry (two in one process do not clash).

    metrics = ServingMetrics()
    metrics.watch_cache(cache)                       # loads, evictions, resident adapters
    metrics.set_queue(waiting=3, running=12)         # every scheduler step
    metrics.step(rows=12, tokens=76)                 # every forward
    metrics.first_token("support", 0.041)
    metrics.tokens("support", prompt=18, generated=16)
    metrics.request_done("support", "completions", 200, latency_s=0.62)
    body, content_type = metrics.render(request.headers.get("accept"))

Metric (type, labels), and vLLM's name where it has one:

===========================================  =========  ==========================  ===========================================
plugtune                                     type       labels                      vLLM
===========================================  =========  ==========================  ===========================================
``plugtune_requests_total``                  counter    adapter, endpoint, status   ``vllm:request_success_total`` (finished_reason)
``plugtune_prompt_tokens_total``             counter    adapter                     ``vllm:prompt_tokens_total``
``plugtune_generation_tokens_total``         counter    adapter                     ``vllm:generation_tokens_total``
``plugtune_adapter_loads_total``             counter                                (none)
``plugtune_adapter_evictions_total``         counter                                (none)
``plugtune_queue_depth``                     gauge                                  ``vllm:num_requests_waiting``
``plugtune_running_rows``                    gauge                                  ``vllm:num_requests_running``
``plugtune_resident_adapters``               gauge                                  ``vllm:lora_requests_info`` (a label of it)
``plugtune_batch_rows``                      histogram                              (none; rows per decode step)
``plugtune_step_tokens``                     histogram                              ``vllm:iteration_tokens_total``
``plugtune_time_to_first_token_seconds``     histogram                              ``vllm:time_to_first_token_seconds``
``plugtune_request_latency_seconds``         histogram                              ``vllm:e2e_request_latency_seconds``
===========================================  =========  ==========================  ===========================================

Plus the process's own (``process_resident_memory_bytes``, CPU seconds, ...), as vLLM has.

``adapter`` is the adapter a request resolved to (``None``: the bare base, reported as
``"base"``); never pass a name a client sent that did not resolve (a label per made-up name
would grow the page without bound): pass ``None`` or :data:`UNRESOLVED`. At most
``max_adapter_labels`` distinct names are kept; the rest count under ``"other"``.
The histograms carry no adapter label, for the same reason.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest

if TYPE_CHECKING:
    from plugtune.serving.cache import AdapterCache

BASE_LABEL = "base"
"""The ``adapter`` label of a request served by the bare base."""
UNRESOLVED = "unresolved"
"""The ``adapter`` label of a request whose model named nothing there is (a 404)."""
OTHER_LABEL = "other"
"""The ``adapter`` label past ``max_adapter_labels`` distinct names."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 60.0, 120.0)
"""Seconds, for time to first token and request latency: 1 ms to 120 s (then ``+Inf``)."""
ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
"""Rows in one decode step."""
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
"""Tokens in one forward step, prefill chunks included (vLLM's iteration-token buckets)."""


class ServingMetrics:
    """The serving metrics in their own :class:`~prometheus_client.CollectorRegistry`
    (``registry``: one to add them to instead). Every method is cheap and thread-safe."""

    def __init__(self, registry: CollectorRegistry | None = None, *, max_adapter_labels: int = 512,
                 process: bool = True) -> None:
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        self.max_adapter_labels = max_adapter_labels
        self._labels: set[str] = set()
        self._lock = threading.Lock()
        self.requests = Counter("plugtune_requests", "Requests answered, by adapter, endpoint and HTTP status.",
                                ["adapter", "endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("plugtune_prompt_tokens", "Prompt tokens prefilled, by adapter.", ["adapter"],
                                     registry=registry)
        self.generation_tokens = Counter("plugtune_generation_tokens", "Tokens generated, by adapter.", ["adapter"],
                                         registry=registry)
        self.adapter_loads = Counter("plugtune_adapter_loads", "Adapters loaded by the adapter cache.",
                                     registry=registry)
        self.adapter_evictions = Counter("plugtune_adapter_evictions", "Adapters evicted by the adapter cache.",
                                         registry=registry)
        self.queue_depth = Gauge("plugtune_queue_depth", "Requests waiting to start.", registry=registry)
        self.running_rows = Gauge("plugtune_running_rows", "Rows being decoded.", registry=registry)
        self.resident_adapters = Gauge("plugtune_resident_adapters", "Adapters the host holds.", registry=registry)
        self.batch_rows = Histogram("plugtune_batch_rows", "Rows per decode step.", buckets=ROW_BUCKETS,
                                    registry=registry)
        self.step_tokens = Histogram("plugtune_step_tokens", "Tokens per forward step, prefill chunks included.",
                                     buckets=TOKEN_BUCKETS, registry=registry)
        self.time_to_first_token = Histogram("plugtune_time_to_first_token_seconds",
                                             "Seconds from a request's arrival to its first generated token.",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.request_latency = Histogram("plugtune_request_latency_seconds",
                                         "Seconds from a request's arrival to its last token (or answer).",
                                         buckets=LATENCY_BUCKETS, registry=registry)
        if process:
            ProcessCollector(registry=registry)

    def _adapter(self, adapter: str | None) -> str:
        """The label for ``adapter``: ``"base"`` for none, ``"other"`` past the cap."""
        if adapter is None:
            return BASE_LABEL
        if adapter in self._labels:
            return adapter
        with self._lock:
            if len(self._labels) >= self.max_adapter_labels:
                return OTHER_LABEL
            self._labels.add(adapter)
        return adapter

    # -- what the server and the engine call ---------------------------------------------------

    def request_done(self, adapter: str | None, endpoint: str, status: int | str, latency_s: float | None = None) -> None:
        """A request answered (``status``: its HTTP status, e.g. 200, 400, 499 for a client
        gone); ``latency_s``, when given, goes into the latency histogram (give it for
        requests that ran, not for ones refused before any work)."""
        self.requests.labels(self._adapter(adapter), endpoint, str(status)).inc()
        if latency_s is not None:
            self.request_latency.observe(latency_s)

    def first_token(self, seconds: float) -> None:
        """A request's first generated token, ``seconds`` after it arrived."""
        self.time_to_first_token.observe(seconds)

    def tokens(self, adapter: str | None, prompt: int = 0, generated: int = 0) -> None:
        """``prompt`` tokens prefilled and ``generated`` tokens generated for ``adapter``."""
        label = self._adapter(adapter)
        if prompt:
            self.prompt_tokens.labels(label).inc(prompt)
        if generated:
            self.generation_tokens.labels(label).inc(generated)

    def step(self, rows: int, tokens: int) -> None:
        """One forward step: ``rows`` rows decoding, ``tokens`` tokens run (prefill chunks
        included)."""
        self.batch_rows.observe(rows)
        self.step_tokens.observe(tokens)

    def set_queue(self, waiting: int, running: int) -> None:
        """Requests waiting to start and rows running now."""
        self.queue_depth.set(waiting)
        self.running_rows.set(running)

    def set_resident(self, count: int) -> None:
        """Adapters resident now (unneeded after :meth:`watch_cache`, which reads it at each scrape)."""
        self.resident_adapters.set(count)

    def adapter_event(self, kind: str, name: str) -> None:
        """An adapter cache's event (``"load"`` or ``"evict"``): :meth:`AdapterCache.on_event`'s
        listener."""
        if kind == "load":
            self.adapter_loads.inc()
        elif kind == "evict":
            self.adapter_evictions.inc()
        else:
            raise ValueError(f"unknown adapter event {kind!r}: 'load' or 'evict'")

    def watch_cache(self, cache: AdapterCache) -> None:
        """Count ``cache``'s loads and evictions, and read its resident count at each scrape."""
        cache.on_event(self.adapter_event)
        self.resident_adapters.set_function(lambda: len(cache.resident()))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The page and its content type: Prometheus' text format, or OpenMetrics when the
        ``accept`` header (a scraper's) asks for it."""
        if accept is None:
            return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
