"""The serving metrics: each method lands in the metric it names, read back by parsing the
rendered page with prometheus_client's own parser; two instances do not share values; the
adapter label stays bounded; an adapter cache's loads and evictions are counted."""

from __future__ import annotations

import shutil

import pytest
from prometheus_client.parser import text_string_to_metric_families

from plugtune.serving.metrics import LATENCY_BUCKETS, ServingMetrics


def samples(metrics: ServingMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the rendered page, keyed by name and sorted labels."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(page, name, **labels) -> float:
    return page[(name, tuple(sorted((k, str(v)) for k, v in labels.items())))]


def test_requests_and_tokens_are_counted_per_adapter():
    metrics = ServingMetrics(process=False)
    metrics.request_done("support", "completions", 200, latency_s=0.2)
    metrics.request_done("support", "completions", 200, latency_s=0.4)
    metrics.request_done(None, "chat", 200, latency_s=3.0)
    metrics.request_done("nope", "completions", 404)  # refused before any work: no latency
    metrics.tokens("support", prompt=10, generated=16)
    metrics.tokens("support", prompt=5, generated=0)
    metrics.tokens(None, prompt=7, generated=3)
    page = samples(metrics)
    assert value(page, "plugtune_requests_total", adapter="support", endpoint="completions", status=200) == 2
    assert value(page, "plugtune_requests_total", adapter="base", endpoint="chat", status=200) == 1
    assert value(page, "plugtune_requests_total", adapter="nope", endpoint="completions", status=404) == 1
    assert value(page, "plugtune_prompt_tokens_total", adapter="support") == 15
    assert value(page, "plugtune_generation_tokens_total", adapter="support") == 16
    assert value(page, "plugtune_prompt_tokens_total", adapter="base") == 7
    assert value(page, "plugtune_generation_tokens_total", adapter="base") == 3
    assert value(page, "plugtune_request_latency_seconds_count") == 3
    assert value(page, "plugtune_request_latency_seconds_sum") == pytest.approx(3.6)
    assert value(page, "plugtune_request_latency_seconds_bucket", le="0.25") == 1
    assert value(page, "plugtune_request_latency_seconds_bucket", le="0.5") == 2
    assert value(page, "plugtune_request_latency_seconds_bucket", le="2.5") == 2
    assert value(page, "plugtune_request_latency_seconds_bucket", le="5.0") == 3
    assert value(page, "plugtune_request_latency_seconds_bucket", le="+Inf") == 3


def test_latency_buckets_span_a_millisecond_to_two_minutes():
    metrics = ServingMetrics(process=False)
    for seconds in (0.0005, 0.0012, 119.0, 500.0):
        metrics.first_token(seconds)
    page = samples(metrics)
    assert LATENCY_BUCKETS[0] == 0.001 and LATENCY_BUCKETS[-1] == 120.0
    assert value(page, "plugtune_time_to_first_token_seconds_bucket", le="0.001") == 1
    assert value(page, "plugtune_time_to_first_token_seconds_bucket", le="0.0025") == 2
    assert value(page, "plugtune_time_to_first_token_seconds_bucket", le="120.0") == 3
    assert value(page, "plugtune_time_to_first_token_seconds_bucket", le="+Inf") == 4
    assert value(page, "plugtune_time_to_first_token_seconds_count") == 4


def test_steps_queue_and_resident_gauges():
    metrics = ServingMetrics(process=False)
    metrics.step(rows=1, tokens=300)  # a prefill chunk
    metrics.step(rows=16, tokens=16)
    metrics.step(rows=16, tokens=16)
    metrics.set_queue(waiting=5, running=16)
    metrics.set_queue(waiting=2, running=12)
    metrics.set_resident(4)
    page = samples(metrics)
    assert value(page, "plugtune_batch_rows_count") == 3 and value(page, "plugtune_batch_rows_sum") == 33
    assert value(page, "plugtune_batch_rows_bucket", le="1.0") == 1
    assert value(page, "plugtune_batch_rows_bucket", le="12.0") == 1
    assert value(page, "plugtune_batch_rows_bucket", le="16.0") == 3
    assert value(page, "plugtune_step_tokens_sum") == 332
    assert value(page, "plugtune_step_tokens_bucket", le="16.0") == 2
    assert value(page, "plugtune_step_tokens_bucket", le="256.0") == 2
    assert value(page, "plugtune_step_tokens_bucket", le="512.0") == 3
    assert value(page, "plugtune_queue_depth") == 2 and value(page, "plugtune_running_rows") == 12
    assert value(page, "plugtune_resident_adapters") == 4


def test_adapter_events():
    metrics = ServingMetrics(process=False)
    for kind in ("load", "load", "evict", "load"):
        metrics.adapter_event(kind, "x")
    page = samples(metrics)
    assert value(page, "plugtune_adapter_loads_total") == 3
    assert value(page, "plugtune_adapter_evictions_total") == 1
    with pytest.raises(ValueError, match="unknown adapter event 'unload'"):
        metrics.adapter_event("unload", "x")


def test_two_servers_in_one_process_keep_their_own_values():
    one, two = ServingMetrics(), ServingMetrics()  # the same names, process metrics included: no clash
    one.request_done("a", "completions", 200, 0.1)
    assert value(samples(one), "plugtune_requests_total", adapter="a", endpoint="completions", status=200) == 1
    assert ("plugtune_requests_total", (("adapter", "a"), ("endpoint", "completions"), ("status", "200"))) \
        not in samples(two)
    assert value(samples(one), "process_resident_memory_bytes") > 0


def test_the_adapter_label_is_bounded():
    metrics = ServingMetrics(process=False, max_adapter_labels=3)
    for name in ("a", "b", "c", "d", "e", "a", None):
        metrics.tokens(name, prompt=1)
    page = samples(metrics)
    labels = {dict(k[1])["adapter"]: v for k, v in page.items() if k[0] == "plugtune_prompt_tokens_total"}
    assert labels == {"a": 2, "b": 1, "c": 1, "other": 2, "base": 1}


def test_openmetrics_when_the_scraper_asks():
    metrics = ServingMetrics(process=False)
    metrics.request_done("a", "chat", 200, 0.1)
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    assert body.decode().rstrip().endswith("# EOF")
    body, content_type = metrics.render("text/plain")
    assert content_type.startswith("text/plain; version=0.0.4") and b"plugtune_requests_total" in body


def test_an_adapter_caches_loads_and_evictions_are_counted(tiny_llama, tmp_path):
    from plugtune.data.tasks import build_task
    from plugtune.plugins.methods.lora import random_lora_adapter
    from plugtune.serving.cache import AdapterCache
    from plugtune.serving.host import AdapterHost

    task = build_task(dict(type="causal-lm", prompt="question : {q} answer :", response=" {a}"))
    host = AdapterHost.from_base(str(tiny_llama), task)
    for seed, name in enumerate("abc"):
        random_lora_adapter(tmp_path / name, host.base, task, r=2, seed=seed)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    cache = AdapterCache(host, tmp_path, max_adapters=2)
    metrics = ServingMetrics(process=False)
    metrics.watch_cache(cache)
    assert value(samples(metrics), "plugtune_resident_adapters") == 0
    for name in ("a", "b", "a", "c", "copy"):
        cache.ensure(name)
    page = samples(metrics)
    assert value(page, "plugtune_adapter_loads_total") == cache.loads == 4
    assert value(page, "plugtune_adapter_evictions_total") == cache.evictions == 2
    assert value(page, "plugtune_resident_adapters") == 2
