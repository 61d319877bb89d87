"""``plugtune serve`` past the basics: logprobs and top_logprobs (completions and chat, streamed
or not), echo with the prompt's logprobs (what lm-evaluation-harness scores through), n > 1,
token-id prompts, continuous batching seen from the outside (a short request that arrives
during a long one finishes first, and both answer as alone), the adapter cache (adapters
loaded on request under --max-adapters), and /metrics read back with prometheus_client's
parser."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from plugtune.serving.server import Service, create_app, running
from test_server import SKY, SUN, GRASS, adapters_root, alone, assert_error, client, host, service, sse_events, url  # noqa: F401


def forward_logprobs(host, ids: list[int], adapter: str | None) -> torch.Tensor:
    """Log-softmax over the vocabulary at every position of ``ids``, one plain forward."""
    with torch.no_grad(), host.using(adapter):
        return host.model(input_ids=torch.tensor([ids])).logits.float().log_softmax(-1)[0]


def test_completion_logprobs_are_the_models(client, host):
    body = client.post("/v1/completions", json={"model": "alpha", "prompt": SKY, "max_tokens": 5, "temperature": 0,
                                                "logprobs": 3}).json()
    choice = body["choices"][0]
    assert choice["text"] == alone(host, SKY, "alpha", 5)[0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    stopped = choice["finish_reason"] == "stop"  # the end-of-sequence token is listed last, not in the text
    assert "".join(lp["tokens"][:-1] if stopped else lp["tokens"]).strip() == choice["text"].strip()
    assert not stopped or lp["tokens"][-1] == host.tokenizer.eos_token
    prompt = host.tokenizer(SKY)["input_ids"]
    generated = host.tokenizer(choice["text"], add_special_tokens=False)["input_ids"]
    logp = forward_logprobs(host, prompt + generated, "alpha")
    for t, (token, value, top) in enumerate(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])):
        dist = logp[len(prompt) - 1 + t]
        assert value == pytest.approx(float(dist.max()), abs=1e-4)  # greedy: the top token's
        assert len(top) == 3 and max(top.values()) == pytest.approx(value, abs=1e-6)
        assert list(top.values()) == sorted(top.values(), reverse=True)
    offsets = [0]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets


def test_echo_scores_the_prompt_as_lm_eval_asks(client, host):
    """lm-evaluation-harness's loglikelihood: echo, logprobs, max_tokens 0 or 1, token ids."""
    prompt = host.tokenizer(SKY + " blue")["input_ids"]
    for max_tokens in (0, 1):
        body = client.post("/v1/completions", json={"model": "alpha", "prompt": prompt, "max_tokens": max_tokens,
                                                    "temperature": 0, "echo": True, "logprobs": 1,
                                                    "ignore_eos": True}).json()
        lp = body["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(prompt) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        logp = forward_logprobs(host, prompt, "alpha")
        want = [float(logp[t, prompt[t + 1]]) for t in range(len(prompt) - 1)]
        assert lp["token_logprobs"][1: len(prompt)] == pytest.approx(want, abs=1e-4)
        assert body["choices"][0]["text"].startswith(host.tokenizer.decode(prompt))
        assert body["usage"]["prompt_tokens"] == len(prompt)


def test_echo_with_a_stop_token_still_reports_its_logprob(client, host):
    """A completion that ends at end-of-sequence lists that token's logprob last (its text is
    not in the answer): lm-eval drops the last entry as the generated one."""
    prompt = host.tokenizer(SKY)["input_ids"]
    body = client.post("/v1/completions", json={"model": "alpha", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                "echo": True, "logprobs": 1}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt) + body["usage"]["completion_tokens"] + 1
    assert lp["tokens"][-1] == host.tokenizer.eos_token


def test_chat_logprobs_and_top_logprobs(client, host):
    body = client.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": SUN}],
                                                     "max_tokens": 4, "temperature": 0, "logprobs": True,
                                                     "top_logprobs": 2}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert 1 <= len(content) <= 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
    none = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": SUN}], "max_tokens": 2}).json()
    assert none["choices"][0]["logprobs"] is None


def test_streamed_logprobs_follow_the_text(client):
    with client.stream("POST", "/v1/completions", json={"model": "beta", "prompt": GRASS, "max_tokens": 6,
                                                        "temperature": 0, "logprobs": 1, "stream": True}) as response:
        chunks = sse_events(response)
    pieces = [c["choices"][0] for c in chunks]
    tokens = [t for p in pieces if p["logprobs"] for t in p["logprobs"]["tokens"]]
    offsets = [o for p in pieces if p["logprobs"] for o in p["logprobs"]["text_offset"]]
    assert 1 <= len(tokens) <= 6 and offsets == sorted(offsets) and offsets[0] == 0
    full = client.post("/v1/completions", json={"model": "beta", "prompt": GRASS, "max_tokens": 6, "temperature": 0,
                                                "logprobs": 1}).json()["choices"][0]["logprobs"]
    assert tokens == full["tokens"] and offsets == full["text_offset"]


def test_n_choices_sample_apart_and_repeat_with_a_seed(client, host):
    request = {"model": "alpha", "prompt": [SKY, SUN], "max_tokens": 6, "temperature": 1.5, "n": 3, "seed": 5}
    first = client.post("/v1/completions", json=request).json()
    assert [c["index"] for c in first["choices"]] == list(range(6))
    texts = [c["text"] for c in first["choices"]]
    assert len(set(texts[:3])) > 1  # the choices of one prompt differ
    assert texts[3] == alone(host, SUN, "alpha", 6, temperature=1.5, seed=5)[0]  # choice j samples with seed + j
    assert [c["text"] for c in client.post("/v1/completions", json=request).json()["choices"]] == texts
    greedy = client.post("/v1/completions", json={**request, "temperature": 0, "prompt": SKY}).json()
    assert len({c["text"] for c in greedy["choices"]}) == 1


def test_a_request_joins_the_running_batch_and_finishes_first(url, host, service):
    """Continuous batching from outside: a 4-token request sent while a 60-token one decodes
    joins it at the next step and ends long before it; both answer as they would alone."""
    results = {}

    def send(key, prompt, n):
        with httpx.Client(base_url=url, timeout=120) as c:
            body = c.post("/v1/completions", json={"model": "alpha", "prompt": prompt, "max_tokens": n,
                                                   "temperature": 0, "ignore_eos": True}).json()
        results[key] = (body["choices"][0]["text"], time.monotonic(), service.worker.engine.steps)

    long = threading.Thread(target=send, args=("long", SKY, 60))
    long.start()
    deadline = time.monotonic() + 60
    while service.worker.running == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    steps = service.worker.engine.steps
    send("short", SUN, 4)
    long.join(120)
    assert results["short"][1] < results["long"][1]
    # it did not wait for the long one to end: it ended at an earlier engine step, fewer than 60
    # steps after it was sent (the long one may have taken a step or two before `steps` was read)
    assert results["short"][2] < results["long"][2] and results["short"][2] - steps < 60
    assert results["long"][0] == alone(host, SKY, "alpha", 60, ignore_eos=True)[0]
    assert results["short"][0] == alone(host, SUN, "alpha", 4, ignore_eos=True)[0]


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_metrics_count_requests_tokens_and_first_tokens(client):
    before = client.get("/metrics").text
    for model in ("alpha", "base"):
        client.post("/v1/completions", json={"model": model, "prompt": SKY, "max_tokens": 3, "temperature": 0,
                                             "ignore_eos": True})
    client.post("/v1/completions", json={"model": "nope", "prompt": SKY})
    after = client.get("/metrics").text
    grew = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)  # noqa: E731
    assert grew("plugtune_requests_total", adapter="alpha", endpoint="/v1/completions", status="200") == 1
    assert grew("plugtune_requests_total", adapter="base", status="200") == 1
    assert grew("plugtune_requests_total", status="404") == 1
    assert grew("plugtune_generation_tokens_total", adapter="alpha") == 3
    assert grew("plugtune_time_to_first_token_seconds_count") == 2
    assert grew("plugtune_request_latency_seconds_count") >= 2
    assert metric(after, "plugtune_batch_rows_count") > 0 and metric(after, "plugtune_queue_depth") == 0


def test_adapters_load_on_request_and_the_least_recently_used_goes(tmp_path, host, adapters_root):
    """Three adapter folders under a root, at most two resident (alpha pinned): each request
    gets what its adapter gives alone, and loads and evictions show in /metrics."""
    from plugtune.serving.host import AdapterHost

    root = tmp_path / "root"
    root.mkdir()
    for name in ("alpha", "beta"):
        shutil.copytree(adapters_root / name, root / name)
    shutil.copytree(adapters_root / "beta", root / "gamma")
    expected = {name: alone(host, SKY, name, 5)[0] for name in ("alpha", "beta")}
    expected["gamma"] = expected["beta"]
    small = AdapterHost.from_adapters(root / "alpha")
    small.use(None)
    service = Service(small, adapters_root=root, max_batch=4, base_name="tiny-llama", max_adapters=2,
                      pinned=["alpha"])
    with running(create_app(service)) as base_url, httpx.Client(base_url=base_url, timeout=120) as c:
        listing = c.get("/v1/adapters").json()
        assert listing["available"] == ["alpha", "beta", "gamma"] and listing["pinned"] == ["alpha"]
        for name in ("beta", "gamma", "alpha", "beta", "gamma"):
            body = c.post("/v1/completions", json={"model": name, "prompt": SKY, "max_tokens": 5, "temperature": 0}).json()
            assert body["choices"][0]["text"] == expected[name], name
            assert len(small.adapters) <= 2 and "alpha" in small.adapters
        text = c.get("/metrics").text
        assert metric(text, "plugtune_adapter_loads_total") == 4  # beta, gamma, beta, gamma
        assert metric(text, "plugtune_adapter_evictions_total") == 3
        assert_error(c.post("/v1/completions", json={"model": "gama", "prompt": SKY}), 404, "'gama'")
