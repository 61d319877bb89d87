"""``plugtune serve``: the real server (uvicorn on a free loopback port) over a tiny Llama
host with two trained LoRA adapters, spoken to with httpx and the official openai client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import plugtune
import pytest
import yaml
from plugtune.artifacts.adapters import MANIFEST_FILE, WEIGHTS_FILE
from plugtune.serving.host import AdapterHost
from plugtune.serving.server import ChatMessage, Service, create_app, running
from plugtune.testing import recipe_dict

SKY = "question : what is the colour of the sky ? answer :"
GRASS = "question : what is the colour of the grass ? answer :"
SUN = "question : what is the colour of the sun ? answer :"


def _train(root: Path, name: str, base: Path, data: Path, *, seed: int = 0, classification: bool = False,
           data_path: Path | None = None, **training) -> Path:
    recipe = recipe_dict(base, data, name=name, classification=classification)
    recipe["training"].update(seed=seed, **training)
    if data_path is not None:
        recipe["data"]["options"]["path"] = str(data_path)
    recipe["output"] = {"dir": str(root / name)}
    path = root.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return plugtune.run(path, show_progress=False).adapter_dir


@pytest.fixture(scope="module")
def adapters_root(tmp_path_factory, tiny_llama, tiny_data) -> Path:
    """``alpha`` and ``beta``: LoRA adapters trained on the tiny Llama, alpha on the true
    colours (the sky is blue), beta on swapped ones (the sky is red), so that each
    adapter's answers give it away."""
    root = tmp_path_factory.mktemp("served") / "adapters"
    root.mkdir()
    swapped = {"blue": "red", "green": "yellow", "yellow": "green"}
    rows = [json.loads(line) for line in (tiny_data / "sft.jsonl").read_text().splitlines()]
    other = root.parent / "swapped.jsonl"
    other.write_text("".join(json.dumps({**r, "answer": swapped[r["answer"]]}) + "\n" for r in rows))
    _train(root, "alpha", tiny_llama, tiny_data, seed=0)
    _train(root, "beta", tiny_llama, tiny_data, seed=1, data_path=other, max_steps=16)
    return root


@pytest.fixture(scope="module")
def host(adapters_root) -> AdapterHost:
    host = AdapterHost.from_adapters(adapters_root / "alpha", adapters_root / "beta")
    host.use(None)
    return host


@pytest.fixture(scope="module")
def service(host, adapters_root) -> Service:
    return Service(host, adapters_root=adapters_root, max_batch=8, base_name="tiny-llama")


@pytest.fixture(scope="module")
def url(service) -> str:
    with running(create_app(service)) as base_url:
        yield base_url


@pytest.fixture
def client(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


def alone(host: AdapterHost, prompt: str, adapter: str | None, max_tokens: int, **options) -> tuple[str, str, int, int]:
    """What ``host.stream`` gives for this prompt and adapter run by itself: text, finish
    reason, prompt tokens, completion tokens."""
    stream = host.stream([prompt], [adapter], max_new_tokens=max_tokens, raw=True, **options)
    for _ in stream:
        pass
    return stream.texts[0], stream.finish_reasons[0], stream.prompt_tokens[0], stream.completion_tokens[0]


def sse_events(response: httpx.Response) -> list:
    """The ``data:`` payloads of a server-sent event stream, checked to be well formed."""
    lines = [line for line in response.iter_lines()]
    data = [line[len("data: "):] for line in lines if line]
    assert all(line.startswith("data: ") for line in lines if line), lines
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def run_as_one_batch(service: Service, calls: list, timeout: float = 120) -> None:
    """Start ``calls`` (each in a thread) while the worker is held, so that every request is
    submitted before the worker can take any (it takes the first, the others queue behind
    it); they then run as one batch. Waits for all. A call that ends without submitting (a
    request refused before it reaches the worker) is not waited for."""
    worker = service.worker
    with worker.lock:
        before = worker.submitted
        threads = [threading.Thread(target=call) for call in calls]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        while (worker.submitted - before + sum(not t.is_alive() for t in threads) < len(calls)
               and time.monotonic() < deadline):
            time.sleep(0.01)
    for t in threads:
        t.join(timeout)


def assert_error(response: httpx.Response, status: int, match: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert match in error["message"], error["message"]
    assert "\n" not in error["message"] and "Traceback" not in response.text
    return error


# -- status -----------------------------------------------------------------------------------


def test_health_and_models_list_base_and_adapters(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["task"] == "causal-lm"
    assert health["base_model"] == "tiny-llama" and set(health["adapters"]) >= {"alpha", "beta"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]][:3] == ["tiny-llama", "alpha", "beta"]
    assert all(m["object"] == "model" and m["owned_by"] == "plugtune" for m in models["data"])
    assert models["data"][1]["parent"] == "tiny-llama"
    assert client.get("/v1/models/alpha").json() == models["data"][1]
    assert_error(client.get("/v1/models/nope"), 404, "no adapter or model named 'nope'")


# -- completions ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["alpha", "beta", "base", "tiny-llama"])
def test_completion_equals_the_adapter_alone(client, host, model):
    adapter = None if model in ("base", "tiny-llama") else model
    text, reason, prompt_tokens, completion_tokens = alone(host, SKY, adapter, 6)
    body = client.post("/v1/completions", json={"model": model, "prompt": SKY, "max_tokens": 6, "temperature": 0}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == ("tiny-llama" if adapter is None else model)
    [choice] = body["choices"]
    assert (choice["text"], choice["finish_reason"], choice["index"]) == (text, reason, 0)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}


def test_adapters_really_differ(host):
    assert alone(host, SKY, "alpha", 8)[0].split()[:1] == ["blue"]
    assert alone(host, SKY, "beta", 8)[0].split()[:1] == ["red"]
    assert "blue" not in alone(host, SKY, None, 8)[0]


def test_adapter_field_overrides_model(client, host):
    body = client.post("/v1/completions", json={"model": "alpha", "adapter": "beta", "prompt": GRASS,
                                                "max_tokens": 5, "temperature": 0}).json()
    assert body["model"] == "beta"
    assert body["choices"][0]["text"] == alone(host, GRASS, "beta", 5)[0]


def test_a_list_of_prompts_gives_one_choice_each(client, host):
    body = client.post("/v1/completions", json={"model": "alpha", "prompt": [SKY, SUN], "max_tokens": 4,
                                                "temperature": 0}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == [alone(host, p, "alpha", 4)[0] for p in (SKY, SUN)]


def test_stop_string_cuts_the_text(client, host):
    prompt = "the film was"
    full = alone(host, prompt, None, 8)[0]
    stop = full[3:6]  # spans two tokens: its start is held back until the rest arrives
    cut = full.index(stop)
    assert cut > 0
    body = client.post("/v1/completions", json={"model": "base", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                "stop": ["never", stop]}).json()
    choice = body["choices"][0]
    assert choice["text"] == full[:cut] == alone(host, prompt, None, 8, stop=[stop])[0]
    assert choice["finish_reason"] == "stop"


def test_seeded_sampling_repeats_and_equals_the_host(client, host):
    request = {"model": "alpha", "prompt": SKY, "max_tokens": 8, "temperature": 1.5, "top_p": 0.9, "seed": 7}
    first = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    second = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    assert first == second == alone(host, SKY, "alpha", 8, temperature=1.5, top_p=0.9, seed=7)[0]


# -- streaming --------------------------------------------------------------------------------


def test_streamed_completion_chunks_join_to_the_same_text(client, host):
    text, reason, _, completion_tokens = alone(host, SUN, "alpha", 8)
    request = {"model": "alpha", "prompt": SUN, "max_tokens": 8, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = sse_events(response)
    *body, usage = chunks
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert len(body) >= 2  # streamed piece by piece, not as one block
    assert "".join(c["choices"][0]["text"] for c in body) == text
    assert [c["choices"][0]["finish_reason"] for c in body] == [None] * (len(body) - 1) + [reason]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == completion_tokens


def test_streamed_chat_uses_openai_chunk_shape(client, host):
    request = {"model": "beta", "messages": [{"role": "user", "content": "what is the colour of the sea ?"}],
               "max_tokens": 6, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=request) as response:
        chunks = sse_events(response)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] is not None
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == alone(host, "question : what is the colour of the sea ? answer :", "beta", 6)[0]


def test_a_client_that_leaves_mid_stream_does_not_stop_the_server(client, host):
    request = {"model": "alpha", "prompt": SKY, "max_tokens": 60, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=request) as response:
        next(response.iter_lines())
    body = client.post("/v1/completions", json={"model": "alpha", "prompt": SKY, "max_tokens": 3, "temperature": 0}).json()
    assert body["choices"][0]["text"] == alone(host, SKY, "alpha", 3)[0]


def _leave_a_stream(url: str, request: dict) -> None:
    """Read the first event of a streamed completion, then close the connection."""
    with httpx.Client(base_url=url, timeout=120) as c, c.stream("POST", "/v1/completions", json=request) as response:
        next(response.iter_lines())


def _leave_by_timing_out(url: str, request: dict) -> None:
    """Ask for a whole completion and give up after 0.3 s (a client timeout)."""
    with httpx.Client(base_url=url, timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json=request)


# leave, the staying request's tokens, the leaving one's, the sleep per forward, at most this many
# two-row forwards, the exact number of forwards (when it is known: the streaming client leaves
# after its first event)
LEAVERS = {"streaming": (_leave_a_stream, 30, 60, 0.01, 20, 30),
           "non-streaming": (_leave_by_timing_out, 40, 80, 0.02, 30, None)}


@pytest.mark.parametrize("how", sorted(LEAVERS))
def test_a_client_that_leaves_takes_its_row_out_of_the_batch(url, service, host, how):
    """A client that disconnects (a streaming one closing its stream, or a non-streaming one
    timing out) shares a batch with one that stays: its row is cancelled and leaves the batch
    within a few steps (forwards after that run one row), and the other client's answer is
    unchanged. Each forward sleeps, so the decode cannot outrun the disconnect."""
    leave, stay_tokens, leave_tokens, sleep, max_pairs, forwards = LEAVERS[how]
    stays = {"model": "base", "prompt": SKY, "max_tokens": stay_tokens, "temperature": 0}
    leaves = {"model": "base", "prompt": "the film was", "max_tokens": leave_tokens, "temperature": 0,
              "stream": leave is _leave_a_stream}
    text, reason, _, _ = alone(host, SKY, None, stay_tokens)
    assert reason == "length"
    sizes: list[int] = []

    def slow(module, args, kwargs) -> None:
        sizes.append(kwargs["input_ids"].shape[0])
        time.sleep(sleep)

    results: list = [None]

    def ask_and_stay() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            results[0] = c.post("/v1/completions", json=stays).json()

    handle = host.base.model.register_forward_pre_hook(slow, with_kwargs=True)
    try:
        run_as_one_batch(service, [ask_and_stay, lambda: leave(url, leaves)])
    finally:
        handle.remove()
    assert results[0]["choices"][0]["text"] == text
    assert sizes[0] == 2 and sizes[-1] == 1
    assert forwards is None or len(sizes) == forwards
    assert sizes.count(2) < max_pairs and sizes == sorted(sizes, reverse=True)


# -- chat -------------------------------------------------------------------------------------


def test_chat_fills_the_adapters_template_with_the_last_user_message(client, host):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the colour of the sky ?"},
                {"role": "assistant", "content": "blue"}, {"role": "user", "content": "what is the colour of the sun ?"}]
    body = client.post("/v1/chat/completions", json={"model": "alpha", "messages": messages, "max_tokens": 5,
                                                     "temperature": 0}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    assert message == {"role": "assistant", "content": alone(host, SUN, "alpha", 5)[0]}


def test_chat_on_the_base_renders_the_conversation(client, host, service):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the film was"}]
    body = client.post("/v1/chat/completions", json={"model": "base", "messages": messages, "max_tokens": 4,
                                                     "temperature": 0}).json()
    # the tiny tokenizer has no chat template: plain role lines
    prompt = "system: be brief\nuser: the film was\nassistant:"
    assert body["choices"][0]["message"]["content"] == alone(host, prompt, None, 4)[0]
    # without max_tokens, chat decodes as far as the context (128 for the tiny Llama) allows
    body = client.post("/v1/chat/completions", json={"model": "base", "messages": messages, "temperature": 0}).json()
    room = 128 - body["usage"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == room and body["choices"][0]["finish_reason"] == "length"
    # a tokenizer with a chat template renders through it
    templated = Service(host, base_name="x")
    templated.tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    try:  # rendered to ids as apply_chat_template does: the template writes any special tokens itself
        expected = templated.tokenizer("<system>be brief<user>the film was<assistant>", add_special_tokens=False)["input_ids"]
        assert templated.chat_prompt([ChatMessage(**m) for m in messages], None) == expected
    finally:
        templated.tokenizer.chat_template = None


# -- the openai client ------------------------------------------------------------------------


def test_the_official_openai_client_works(url, host):
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list()][:3] == ["tiny-llama", "alpha", "beta"]
    assert client.models.retrieve("alpha").parent == "tiny-llama" and client.models.retrieve("base").id == "tiny-llama"
    completion = client.completions.create(model="beta", prompt=GRASS, max_tokens=6, temperature=0)
    text, reason, _, tokens = alone(host, GRASS, "beta", 6)
    assert completion.choices[0].text == text and completion.choices[0].finish_reason == reason
    assert completion.usage.completion_tokens == tokens
    stream = client.chat.completions.create(model="alpha", max_tokens=6, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": "what is the colour of the grass ?"}])
    content = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert content == alone(host, GRASS, "alpha", 6)[0]


# -- batching ---------------------------------------------------------------------------------


def test_concurrent_clients_on_different_adapters_share_one_batch(url, service, host):
    """Six clients, three adapters (and the base), different prompts and budgets: held
    until all six wait, they run as one batch, and each gets what its adapter gives alone."""
    cases = [("alpha", SKY, 6), ("beta", SKY, 4), ("base", SKY, 5), ("alpha", GRASS, 3), ("beta", SUN, 8), ("base", SUN, 2)]
    expected = [alone(host, p, None if m == "base" else m, k) for m, p, k in cases]
    results: list = [None] * len(cases)

    def ask(i: int) -> None:
        model, prompt, k = cases[i]
        with httpx.Client(base_url=url, timeout=120) as c:
            results[i] = c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": k,
                                                         "temperature": 0}).json()

    worker = service.worker
    batches = worker.batches
    run_as_one_batch(service, [lambda i=i: ask(i) for i in range(len(cases))])
    assert worker.batches == batches + 1 and worker.largest_batch >= len(cases)
    for body, (text, reason, prompt_tokens, completion_tokens) in zip(results, expected):
        assert body["choices"][0]["text"] == text
        assert body["choices"][0]["finish_reason"] == reason
        assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}


def test_one_batch_with_different_budgets_and_stop_strings_answers_each_as_alone(url, service, host):
    """Two clients in one batch, one streaming with a stop string and a large budget, one
    with a small budget and a stop string it never meets: each answer (text, chunks that
    never run past the stop string, finish reason, usage) equals that request served alone."""
    prompt = "the film was"
    full = alone(host, prompt, None, 12)[0]
    stop = full[3:6]  # spans two tokens: its start is held back until the rest arrives
    assert full.index(stop) > 0
    requests = [{"model": "base", "prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": ["never", stop],
                 "stream": True, "stream_options": {"include_usage": True}},
                {"model": "base", "prompt": SUN, "max_tokens": 3, "temperature": 0, "stop": "zzz"}]

    def answer(c: httpx.Client, request: dict) -> tuple:
        if not request.get("stream"):
            body = c.post("/v1/completions", json=request).json()
            return body["choices"][0]["text"], body["choices"][0]["finish_reason"], body["usage"]
        with c.stream("POST", "/v1/completions", json=request) as response:
            *chunks, usage = sse_events(response)
        pieces = [c["choices"][0]["text"] for c in chunks]
        assert all(stop not in "".join(pieces[:k]) for k in range(len(pieces) + 1))
        return "".join(pieces), chunks[-1]["choices"][0]["finish_reason"], usage["usage"]

    with httpx.Client(base_url=url, timeout=120) as c:
        served_alone = [answer(c, r) for r in requests]
    assert served_alone[0][:2] == (full[: full.index(stop)], "stop")
    assert served_alone[1][:2] == alone(host, SUN, None, 3)[:2] and served_alone[1][1] == "length"

    results: list = [None] * len(requests)

    def ask(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            results[i] = answer(c, requests[i])

    batches = service.worker.batches
    run_as_one_batch(service, [lambda i=i: ask(i) for i in range(len(requests))])
    assert service.worker.batches == batches + 1
    assert results == served_alone


# -- adapter management -----------------------------------------------------------------------


def test_list_unload_and_load_adapters(client, host, adapters_root):
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}
    beta = listed["beta"]
    assert beta["method"] == "lora" and beta["task"] == "causal-lm"
    assert beta["size_bytes"] == (adapters_root / "beta" / WEIGHTS_FILE).stat().st_size
    assert beta["fingerprint"] == host.base.info.fingerprint
    expected = alone(host, SKY, "beta", 5)[0]

    assert client.delete("/v1/adapters/beta").json() == {"id": "beta", "object": "adapter", "deleted": True}
    assert "beta" not in host.adapters
    assert "beta" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "beta" in client.get("/v1/adapters").json()["available"]
    assert_error(client.post("/v1/completions", json={"model": "gamma", "prompt": SKY}), 404, "'gamma'")
    assert_error(client.delete("/v1/adapters/beta"), 404, "no adapter named 'beta'")
    # a request naming a folder under the adapters root loads it on first use
    body = client.post("/v1/completions", json={"model": "beta", "prompt": SKY, "max_tokens": 5, "temperature": 0}).json()
    assert body["choices"][0]["text"] == expected and "beta" in host.adapters
    client.delete("/v1/adapters/beta")

    response = client.post("/v1/adapters", json={"name": "beta-again", "path": "beta"})
    assert response.status_code == 201 and response.json()["name"] == "beta-again"
    body = client.post("/v1/completions", json={"model": "beta-again", "prompt": SKY, "max_tokens": 5, "temperature": 0}).json()
    assert body["choices"][0]["text"] == expected
    assert_error(client.post("/v1/adapters", json={"name": "beta-again", "path": "beta"}), 409, "already loaded")

    # back as it was: the manifest's name when none is given, by an absolute path inside the root
    client.delete("/v1/adapters/beta-again")
    assert client.post("/v1/adapters", json={"path": str(adapters_root / "beta")}).json()["name"] == "beta"


def test_loading_refuses_paths_outside_the_root_and_unsafe_names(client, adapters_root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(adapters_root / "alpha", outside)
    (adapters_root / "sneaky").symlink_to(outside, target_is_directory=True)
    try:
        for path in ("../../etc", "/etc", str(outside), "alpha/../../outside", "sneaky"):
            assert_error(client.post("/v1/adapters", json={"name": "x", "path": path}), 403, "outside the adapters root")
    finally:
        (adapters_root / "sneaky").unlink()
    assert_error(client.post("/v1/adapters", json={"name": "x", "path": "alpha\u0000"}), 400, "cannot be resolved")
    for name in ("../x", ".hidden", "a/b", "base", "tiny-llama", "x" * 65, "ok\n"):
        assert_error(client.post("/v1/adapters", json={"name": name, "path": "alpha"}), 400, "is not allowed")
    assert_error(client.post("/v1/adapters", json={"name": "x", "path": "missing"}), 404, "no adapter folder")
    assert_error(client.post("/v1/adapters", json={"name": "x", "path": "alpha", "extra": 1}), 422, "extra")
    assert "x" not in client.get("/health").json()["adapters"]


def test_loading_an_adapter_for_another_base_is_refused(client, adapters_root):
    foreign = adapters_root / "foreign"
    shutil.copytree(adapters_root / "alpha", foreign)
    manifest = json.loads((foreign / MANIFEST_FILE).read_text())
    manifest["base_model"]["fingerprint"] = "sha256:" + "0" * 64
    (foreign / MANIFEST_FILE).write_text(json.dumps(manifest))
    try:
        assert_error(client.post("/v1/adapters", json={"name": "foreign", "path": "foreign"}), 400, "was trained on base")
    finally:
        shutil.rmtree(foreign)


def test_pickled_weights_load_only_with_allow_pickle(client, host, adapters_root):
    import torch
    from safetensors.torch import load_file

    pickled = adapters_root / "pickled"
    shutil.copytree(adapters_root / "alpha", pickled)
    torch.save(load_file(pickled / WEIGHTS_FILE), pickled / "adapter_model.bin")
    (pickled / WEIGHTS_FILE).unlink()
    try:
        assert_error(client.post("/v1/adapters", json={"name": "pickled", "path": "pickled"}), 400,
                     "pickle files are not loaded")
        trusting = Service(host, adapters_root=adapters_root, allow_pickle=True)
        with running(create_app(trusting)) as url, httpx.Client(base_url=url, timeout=60) as c:
            assert c.post("/v1/adapters", json={"name": "pickled", "path": "pickled"}).status_code == 201
            body = c.post("/v1/completions", json={"model": "pickled", "prompt": SKY, "max_tokens": 5, "temperature": 0}).json()
            assert body["choices"][0]["text"] == alone(host, SKY, "alpha", 5)[0]
            c.delete("/v1/adapters/pickled")
    finally:
        shutil.rmtree(pickled)


def test_an_api_key_guards_everything_but_health(host, adapters_root):
    from openai import AuthenticationError, OpenAI

    guarded = Service(host, adapters_root=adapters_root, base_name="tiny-llama", api_key="s3cret")
    with running(create_app(guarded)) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        error = assert_error(c.get("/v1/models"), 401, "missing or wrong API key")
        assert error["code"] == "invalid_api_key"
        assert_error(c.post("/v1/adapters", json={"path": "alpha"}, headers={"Authorization": "Bearer wrong"}), 401, "API key")
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        client = OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        completion = client.completions.create(model="alpha", prompt=SKY, max_tokens=4, temperature=0)
        assert completion.choices[0].text == alone(host, SKY, "alpha", 4)[0]


# -- errors -----------------------------------------------------------------------------------


def test_errors_are_openai_shaped_one_liners(client):
    error = assert_error(client.post("/v1/completions", json={"model": "gamma", "prompt": SKY}), 404, "'gamma'")
    assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
    assert_error(client.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"}),
                 400, "not valid JSON")
    assert_error(client.post("/v1/completions", json={"model": "alpha"}), 422, "prompt: Field required")
    assert_error(client.post("/v1/completions", json={"prompt": SKY, "temperature": 5}), 422, "temperature")
    assert_error(client.post("/v1/chat/completions", json={"messages": []}), 422, "messages")
    assert_error(client.post("/v1/completions", json={"prompt": SKY, "n": 17}), 422, "n: Input should be less than or equal to 16")
    assert_error(client.post("/v1/completions", json={"prompt": [SKY] * 8, "n": 9}), 400, "8 prompts times n=9")
    assert_error(client.post("/v1/completions", json={"prompt": SKY, "n": 2, "best_of": 3}), 400, "best_of")
    assert_error(client.post("/v1/completions", json={"prompt": SKY, "logprobs": 21}), 422, "logprobs")
    assert_error(client.post("/v1/completions", json={"prompt": SKY, "max_tokens": 0}), 400, "set echo to score the prompt")
    assert_error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
                 400, "set logprobs to true")
    assert_error(client.post("/v1/completions", json={"prompt": SKY, "max_tokens": 500}), 400, "context is 128 tokens")
    assert_error(client.post("/v1/classify", json={"input": "x"}), 400, "language-model base")
    assert_error(client.post("/v1/completions", json={"prompt": ""}), 400, "the prompt is empty")
    assert_error(client.post("/v1/completions", json={"prompt": [SKY] * 65}), 400, "1 to 64 strings (got 65)")
    assert_error(client.post("/v1/completions", json={"prompt": []}), 400, "1 to 64 strings (got 0)")
    assert_error(client.get("/v1/nothing"), 404, "Not Found")


# -- classification ---------------------------------------------------------------------------


def test_classification_server(tmp_path, tiny_bert, tiny_data):
    root = tmp_path / "adapters"
    _train(root, "sentiment", tiny_bert, tiny_data, classification=True)
    host = AdapterHost.from_adapters(root / "sentiment")
    texts = ["a wonderful and charming film", "a dull and tedious plot", "the ending"]
    expected = host.classify(texts, "sentiment")
    base = host.classify(texts[:1], None)
    with running(create_app(Service(host, adapters_root=root))) as url, httpx.Client(base_url=url, timeout=60) as c:
        body = c.post("/v1/classify", json={"model": "sentiment", "input": texts}).json()
        assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["model"] == "sentiment"
        assert [{"label": d["label"], "scores": d["scores"]} for d in body["data"]] == expected
        assert set(body["data"][0]["scores"]) == {"negative", "positive"}
        single = c.post("/v1/classify", json={"model": "base", "input": texts[0]}).json()["data"]
        assert [{"label": d["label"], "scores": d["scores"]} for d in single] == base
        assert single[0]["scores"] != body["data"][0]["scores"]  # the adapter was applied, and only there
        assert_error(c.post("/v1/completions", json={"model": "sentiment", "prompt": "x"}), 400, "classifier base")
        assert_error(c.post("/v1/classify", json={"model": "sentiment", "input": []}), 422, "input")


# -- the command ------------------------------------------------------------------------------


def test_plugtune_serve_command(adapters_root, host, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "plugtune.cli", "serve", str(adapters_root / "alpha"), "--port", str(port),
               "--adapters-root", str(adapters_root), "--max-batch", "4", "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                health = httpx.get(f"{url}/health").json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert health["adapters"] == ["alpha"] and health["max_batch"] == 4
        body = httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": SKY, "max_tokens": 4,
                                                          "temperature": 0}, timeout=60).json()
        assert body["choices"][0]["text"] == alone(host, SKY, "alpha", 4)[0]
        assert httpx.post(f"{url}/v1/adapters", json={"path": "beta"}, timeout=60).json()["name"] == "beta"
    finally:
        process.terminate()
        process.wait(30)


def test_serve_without_adapters_or_base_is_a_one_line_error(capsys):
    from plugtune.cli import main

    assert main(["serve"]) == 1
    assert capsys.readouterr().err.strip() == "error: give adapter folders (plugtune serve adapters/NAME ...) or --base MODEL"


# -- a real model -----------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_server_with_its_chat_template_and_a_mixed_batch(tmp_path):
    """SmolLM2-135M-Instruct: chat on the base goes through its own chat template, and three
    concurrent clients (two random LoRA adapters and the base) batched together each get
    what their adapter gives alone."""
    from plugtune.plugins.methods.lora import random_lora_adapter
    from plugtune.data.tasks import build_task

    task = build_task(dict(type="causal-lm", prompt="Message: {text}\nDepartment:", response=" {label}"))
    host = AdapterHost.from_base("smollm2-135m", task)
    for i in range(2):
        host.load(random_lora_adapter(tmp_path / f"r{i}", host.base, task, seed=i, scale=0.5))
    service = Service(host, adapters_root=tmp_path)
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."}]
    prompt = host.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    cases = [("r0", "Message: I was charged twice\nDepartment:"), ("r1", "Message: I was charged twice\nDepartment:"),
             ("base", "The capital of France is")]
    expected = [alone(host, p, None if m == "base" else m, 8)[0] for m, p in cases]
    assert expected[0] != expected[1]  # the two adapters really differ
    results: list = [None] * len(cases)
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=300) as client:
        body = client.post("/v1/chat/completions", json={"model": "base", "messages": messages, "max_tokens": 8,
                                                         "temperature": 0}).json()
        assert body["choices"][0]["message"]["content"] == alone(host, prompt, None, 8)[0]

        def ask(i: int) -> None:
            model, text = cases[i]
            results[i] = client.post("/v1/completions", json={"model": model, "prompt": text, "max_tokens": 8,
                                                              "temperature": 0}).json()["choices"][0]["text"]

        batches = service.worker.batches
        run_as_one_batch(service, [lambda i=i: ask(i) for i in range(len(cases))], timeout=300)
        assert service.worker.batches == batches + 1
    assert results == expected
