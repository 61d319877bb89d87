"""The hostile-input catalog, server half: requests a hostile (or merely careless) client
can send ``plugtune serve``, and what an operator can get wrong when starting it. Each case
asserts the exact status and one-line OpenAI-shaped error, and that no other request was
hurt: the well-behaved requests sharing the server (and often the batch) get the answer
they would get alone, ``/health`` stays quick, nothing on disk changed, nothing was loaded.
Hypothesis fuzzes the request bodies of every endpoint (never a 500, never a hang)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from plugtune.artifacts.adapters import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE
from plugtune.kernel.errors import PlugtuneError
from plugtune.serving.decoding import GREEDY_BELOW, pick_tokens, sampling_probabilities
from plugtune.serving.host import AdapterHost
from plugtune.serving.server import LIMIT_VARIABLES, RequestLimits, Service, create_app, running
from starlette.testclient import TestClient
from test_hostile_input import snapshot
from test_server import alone as alone_with_reason, run_as_one_batch

SKY = "question : what is the colour of the sky ? answer :"
GRASS = "question : what is the colour of the grass ? answer :"
POISON = "question : what is the colour of the xyzzy ? answer :"  # 'xyzzy' is not in the vocabulary: <unk>
SMALL = RequestLimits(body_bytes=64 * 1024, inputs=8, characters=4000)


# -- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_task():
    from plugtune.data.tasks import build_task

    return build_task(dict(type="causal-lm", prompt="question : {question} answer :", response=" {answer}"))


@pytest.fixture(scope="module")
def adapters_root(tmp_path_factory, tiny_llama, lm_task) -> Path:
    """``alpha`` and ``beta``: random LoRA adapters on the tiny Llama (no training needed)."""
    from plugtune.artifacts.models import load_base
    from plugtune.plugins.methods.lora import random_lora_adapter

    root = tmp_path_factory.mktemp("hostile-served") / "adapters"
    base = load_base(str(tiny_llama), lm_task, dtype=torch.float32)
    for seed, name in enumerate(("alpha", "beta")):
        random_lora_adapter(root / name, base, lm_task, r=4, seed=seed, scale=0.5)
    return root


@pytest.fixture(scope="module")
def host(adapters_root) -> AdapterHost:
    host = AdapterHost.from_adapters(adapters_root / "alpha", adapters_root / "beta")
    host.use(None)
    return host


@pytest.fixture(scope="module")
def service(host, adapters_root) -> Service:
    return Service(host, adapters_root=adapters_root, max_batch=8, base_name="tiny-llama", limits=SMALL)


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as c:
        yield c


@pytest.fixture
def served(host, adapters_root):
    """A real server (uvicorn on a free port) of its own over the shared host: its URL and service."""
    service = Service(host, adapters_root=adapters_root, max_batch=8, base_name="tiny-llama", limits=SMALL)
    with running(create_app(service)) as base_url:
        yield base_url, service


def alone(host: AdapterHost, prompt: str, adapter: str | None, max_tokens: int) -> str:
    """The text ``host.stream`` gives for this prompt and adapter run by itself."""
    return alone_with_reason(host, prompt, adapter, max_tokens)[0]


def assert_error(response: httpx.Response, status: int, message: str | None = None, *, contains: str = "") -> dict:
    """An OpenAI-shaped error with ``status`` and exactly ``message`` (or one containing
    ``contains``), one line, no traceback."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if message is not None:
        assert error["message"] == message
    assert contains in error["message"], error["message"]
    assert "\n" not in error["message"] and "Traceback" not in response.text
    return error


def completion(client, prompt: str = SKY, **fields) -> httpx.Response:
    return client.post("/v1/completions", json={"model": "alpha", "prompt": prompt, "max_tokens": 4,
                                                "temperature": 0, **fields})


# -- sampling: numerically safe at every allowed temperature and top_p -------------------------


@pytest.mark.parametrize("temperature", [1e-39, 5e-324, 1e-7, GREEDY_BELOW, 2.0])
@pytest.mark.parametrize("top_p", [1e-30, 1.0])
def test_extreme_sampling_shares_a_batch_without_hurting_it(client, service, host, temperature, top_p):
    """``temperature: 1e-39`` made the probabilities NaN and failed the whole batch (every
    request in it a 500); now each row samples safely and the greedy neighbour is unchanged."""
    expected = alone(host, GRASS, "beta", 6)
    answers: dict[str, httpx.Response] = {}

    def hostile() -> None:
        answers["hostile"] = completion(client, SKY, temperature=temperature, top_p=top_p, max_tokens=6)

    def polite() -> None:
        answers["polite"] = completion(client, GRASS, model="beta", max_tokens=6)

    batches = service.worker.batches
    run_as_one_batch(service, [hostile, polite])
    assert service.worker.batches == batches + 1  # they did share one batch
    assert answers["hostile"].status_code == 200, answers["hostile"].text
    assert answers["hostile"].json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert answers["polite"].status_code == 200 and answers["polite"].json()["choices"][0]["text"] == expected


finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
special = st.sampled_from([float("inf"), float("-inf"), float("nan")])


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.lists(st.one_of(finite, finite, finite, special), min_size=5, max_size=5), min_size=1, max_size=4),
       temperature=st.one_of(st.floats(0, 2), st.sampled_from([0.0, 5e-324, 1e-39, 1e-300, 1e-6, 2.0])),
       top_p=st.one_of(st.floats(1e-300, 1), st.sampled_from([5e-324, 1e-30, 1.0])))
# found by hypothesis on a CI run: greedy picked the largest finite logit over +inf (nan_to_num's default)
@example(rows=[[0.0] * 5, [0.0, 0.0, 0.0, 3.4028234663852886e+38, float("inf")]], temperature=0.0, top_p=1.0)
def test_sampling_probabilities_are_finite_and_tokens_valid(rows, temperature, top_p):
    logits = torch.tensor(rows, dtype=torch.float32)
    t = torch.full((len(rows),), temperature)
    probs, usable = sampling_probabilities(logits, t)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert torch.allclose(probs[usable].sum(-1), torch.ones(int(usable.sum()), dtype=torch.float64))
    tokens = pick_tokens(logits, t, torch.full((len(rows),), top_p), torch.Generator().manual_seed(0))
    assert ((tokens >= 0) & (tokens < 5)).all()
    for row, token in zip(logits, tokens.tolist()):
        if torch.isposinf(row).any():  # an infinite logit is certain
            assert torch.isposinf(row[token])
        elif not torch.isfinite(row).any() and not torch.isposinf(row).any():
            assert token == 0  # nothing to choose from: greedy over -inf


# -- the request budget: size, count, characters, then tokens ---------------------------------


def big(n: int) -> str:
    return ("sky " * (n // 4 + 1))[:n]


OVERSIZED_BODIES = {
    "one huge prompt": {"prompt": big(100_000)},
    "many 20 kB prompts": {"prompt": [big(20_000)] * 8},
    "a huge chat message": {"messages": [{"role": "user", "content": big(100_000)}]},
    "a huge text to classify": {"input": big(100_000)},
}
PATHS = {"one huge prompt": "/v1/completions", "many 20 kB prompts": "/v1/completions",
         "a huge chat message": "/v1/chat/completions", "a huge text to classify": "/v1/classify"}


@pytest.mark.parametrize("case", list(OVERSIZED_BODIES))
def test_a_body_over_the_limit_is_refused_from_its_content_length(client, case):
    body = json.dumps(OVERSIZED_BODIES[case]).encode()
    error = assert_error(client.post(PATHS[case], content=body, headers={"content-type": "application/json"}), 413,
                         f"the request body has {len(body)} bytes, more than the server's limit of 65536 bytes; "
                         f"send less (the server's operator can raise PLUGTUNE_MAX_REQUEST_BYTES)")
    assert error["code"] == "request_too_large"


def test_a_streamed_body_without_content_length_is_read_only_up_to_the_limit(served):
    url, _ = served
    sent = []

    def chunks():
        for _ in range(1000):  # 64 MB if it were all read
            sent.append(1)
            yield b" " * 65536

    with httpx.Client(base_url=url, timeout=60) as c:
        try:
            response = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        except (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError):  # the server answered and closed while the rest was still being sent
            response = None
        if response is not None:
            assert_error(response, 413, "the request body is longer than the server's limit of 65536 bytes; send less "
                         "(the server's operator can raise PLUGTUNE_MAX_REQUEST_BYTES)")
        assert c.get("/health").status_code == 200
    assert len(sent) < 1000


CHARACTER_BOMBS = {
    "one long prompt": ("/v1/completions", {"prompt": big(4001)}, "prompt", 4001),
    "eight prompts": ("/v1/completions", {"prompt": [big(600)] * 8}, "prompt", 4800),
    "chat turns": ("/v1/chat/completions", {"messages": [{"role": "user", "content": big(1000)}] * 5}, "messages", 5000),
    "chat content parts": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": big(2500)}] * 2}]}, "messages", 5000),
}


@pytest.mark.parametrize("case", list(CHARACTER_BOMBS))
def test_too_many_characters_are_refused_before_tokenizing(client, service, case):
    path, body, field, total = CHARACTER_BOMBS[case]
    rows = service.worker.rows
    assert_error(client.post(path, json={"model": "alpha", **body}), 413,
                 f"{field}: {total} characters in this request, more than the server's limit of 4000; send shorter "
                 "text (the server's operator can raise PLUGTUNE_MAX_PROMPT_CHARS)")
    assert service.worker.rows == rows  # nothing reached the model


@pytest.mark.parametrize("field,path", [("prompt", "/v1/completions"), ("input", "/v1/classify")])
def test_more_prompts_than_the_limit_are_refused(client, field, path):
    response = client.post(path, json={field: ["sky"] * 9})
    if path == "/v1/classify":  # a language-model server refuses classify before counting
        assert_error(response, 400, contains="language-model base")
    else:
        assert_error(response, 400, "prompt: give a string or a list of 1 to 8 strings (got 9)")


def test_too_many_chat_messages_are_refused(client):
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}] * 1025})
    assert_error(response, 422, contains="messages: List should have at most 1024 items")


def test_a_prompt_within_characters_but_over_the_context_is_refused_by_tokens(client):
    assert_error(completion(client, big(1000), max_tokens=4), 400, contains="this model's context is 128 tokens")


@pytest.mark.parametrize("value", ["", "abc", "0", "-5", "1.5"])
def test_limit_variables_that_are_not_sizes_are_refused(value):
    if value == "":  # empty: the default
        assert RequestLimits.from_env({"PLUGTUNE_MAX_REQUEST_BYTES": value}) == RequestLimits()
        return
    with pytest.raises(PlugtuneError) as info:
        RequestLimits.from_env({"PLUGTUNE_MAX_PROMPT_CHARS": value})
    assert str(info.value) == f"PLUGTUNE_MAX_PROMPT_CHARS must be a whole number of at least 1 (got {value!r})"


def test_limit_variables_raise_the_limits():
    limits = RequestLimits.from_env({v: "12_345" for v in LIMIT_VARIABLES.values()})
    assert limits == RequestLimits(body_bytes=12345, inputs=12345, characters=12345)


def test_a_huge_request_does_not_block_health_or_other_clients(host, adapters_root):
    """Tokenizing runs off the event loop and the body is capped: while 20 MB bodies are
    refused and the largest allowed prompts are counted, /health answers within 1 s and a
    small completion is served."""
    roomy = RequestLimits(body_bytes=2_000_000, inputs=64, characters=2_000_000)
    service = Service(host, adapters_root=adapters_root, base_name="tiny-llama", limits=roomy)
    worst, done, failures = [0.0], threading.Event(), []
    with running(create_app(service)) as base:

        def hostile() -> None:
            try:
                with httpx.Client(base_url=base, timeout=120) as c:
                    for _ in range(2):
                        r = c.post("/v1/completions", json={"prompt": [big(30_000)] * 60, "max_tokens": 1})
                        assert r.status_code == 400 and "context" in r.text, r.text
                    try:
                        r = c.post("/v1/completions", content=b"x" * 20_000_000, headers={"content-type": "application/json"})
                        assert r.status_code == 413, r.text
                    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                        pass  # the server answered 413 and closed while this client was still sending: refused too
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)
            finally:
                done.set()

        thread = threading.Thread(target=hostile)
        thread.start()
        deadline = time.monotonic() + 300
        with httpx.Client(base_url=base, timeout=30) as c:
            while not done.is_set() and time.monotonic() < deadline:
                start = time.monotonic()
                assert c.get("/health").status_code == 200
                worst[0] = max(worst[0], time.monotonic() - start)
                time.sleep(0.02)
            answer = c.post("/v1/completions", json={"model": "alpha", "prompt": SKY, "max_tokens": 3, "temperature": 0})
        thread.join(timeout=60)
    assert not failures, failures
    assert done.is_set(), "the hostile client did not finish within 300 s"
    assert worst[0] < 1.0, worst
    assert answer.json()["choices"][0]["text"] == alone(host, SKY, "alpha", 3)


# -- one row's failure ends that row alone -------------------------------------------------------


def poisoned(module, args, kwargs) -> None:
    """A forward that fails whenever its batch holds the <unk> token (the POISON prompt)."""
    if (kwargs["input_ids"] == UNK[0]).any():
        raise RuntimeError("this row poisons the forward")


UNK = [-1]


def test_a_row_that_fails_ends_alone_and_its_batch_is_answered(client, service, host):
    UNK[0] = host.tokenizer.unk_token_id
    expected = {SKY: alone(host, SKY, "alpha", 5), GRASS: alone(host, GRASS, None, 5)}
    answers: dict[str, httpx.Response] = {}

    def ask(prompt: str, model: str) -> None:
        answers[prompt] = completion(client, prompt, model=model, max_tokens=5)

    handle = host.base.model.register_forward_pre_hook(poisoned, with_kwargs=True)
    try:
        run_as_one_batch(service, [lambda: ask(SKY, "alpha"), lambda: ask(POISON, "beta"), lambda: ask(GRASS, "base")])
    finally:
        handle.remove()
    assert_error(answers[POISON], 500, "internal error (RuntimeError: this row poisons the forward); "
                                      "the server log has the traceback")
    for prompt in (SKY, GRASS):
        assert answers[prompt].status_code == 200, answers[prompt].text
        assert answers[prompt].json()["choices"][0]["text"] == expected[prompt]


def test_a_batch_that_fails_midway_resumes_each_row_alone(client, service, host):
    """A forward that fails once, three steps in: each row continues alone after the text it
    already had, with the rest of its budget."""
    calls = [0]

    def once(module, args, kwargs) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("a transient failure")

    answers: list = [None, None]

    def ask(i: int, prompt: str) -> None:
        answers[i] = completion(client, prompt, max_tokens=8, stream=False)

    handle = host.base.model.register_forward_pre_hook(once, with_kwargs=True)
    try:
        run_as_one_batch(service, [lambda: ask(0, SKY), lambda: ask(1, GRASS)])
    finally:
        handle.remove()
    for response in answers:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["usage"]["completion_tokens"] <= 8
        assert body["choices"][0]["finish_reason"] in ("length", "stop")


# -- operator mistakes: the API key ----------------------------------------------------------


@pytest.mark.parametrize("key", ["", " ", "\t\n"])
def test_an_empty_api_key_is_refused(host, adapters_root, key):
    with pytest.raises(PlugtuneError) as info:
        Service(host, adapters_root=adapters_root, api_key=key)
    assert str(info.value) == ("PLUGTUNE_API_KEY is set but empty: set it to the key clients must send, "
                               "or unset it to serve without authentication")


def test_an_api_key_with_stray_whitespace_is_refused(host, adapters_root):
    with pytest.raises(PlugtuneError) as info:
        Service(host, adapters_root=adapters_root, api_key="s3cret\n")
    assert str(info.value) == "PLUGTUNE_API_KEY starts or ends with whitespace, which no client sends; remove it"


def test_plugtune_serve_with_an_empty_api_key_exits_with_one_line(adapters_root, monkeypatch, capsys):
    from plugtune.cli import main

    monkeypatch.setenv("PLUGTUNE_API_KEY", "")
    with socket.socket() as s:  # were it to start, it would serve here
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["serve", str(adapters_root / "alpha"), "--port", str(port)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert err.strip().splitlines() == ["error: PLUGTUNE_API_KEY is set but empty: set it to the key clients must send, "
                                        "or unset it to serve without authentication"]


# -- adapters loaded over HTTP: every file inside the root -------------------------------------


def planted(adapters_root: Path, tmp_path: Path, how: str) -> str:
    """An adapter folder inside the root, made hostile by ``how``; returns its name."""
    outside = tmp_path / "outside"
    shutil.copytree(adapters_root / "alpha", outside)
    name = f"planted-{how}"
    folder = adapters_root / name
    shutil.copytree(adapters_root / "alpha", folder)
    if how in (WEIGHTS_FILE, MANIFEST_FILE, CONFIG_FILE):
        (folder / how).unlink()
        (folder / how).symlink_to(outside / how)
    elif how == "linked-folder":
        (folder / "extra").symlink_to(outside, target_is_directory=True)
    elif how == "dangling":
        (folder / "notes.txt").symlink_to(tmp_path / "gone")
    elif how == "loop":
        (folder / "a").symlink_to(folder / "b")
        (folder / "b").symlink_to(folder / "a")
    return name


@pytest.mark.parametrize("how,entry,why", [
    (WEIGHTS_FILE, WEIGHTS_FILE, "links outside"), (MANIFEST_FILE, MANIFEST_FILE, "links outside"),
    (CONFIG_FILE, CONFIG_FILE, "links outside"), ("linked-folder", "extra", "links outside"),
    ("dangling", r"notes\.txt", "cannot be resolved"), ("loop", "[ab]", "cannot be resolved"),
])
def test_an_adapter_folder_whose_files_link_outside_the_root_is_refused(client, service, adapters_root, tmp_path, how,
                                                                       entry, why):
    name = planted(adapters_root, tmp_path, how)
    try:
        before = snapshot(tmp_path)
        response = client.post("/v1/adapters", json={"path": name, "name": "planted"})
        root = service.adapters_root
        if why == "links outside":
            assert_error(response, 403, f"adapter path {name!r}: {entry} links outside the adapters root {root}; copy "
                                        "the file into the adapter folder or restart the server with another --adapters-root")
        else:
            message = assert_error(response, 403)["message"]
            assert re.fullmatch(re.escape(f"adapter path {name!r}: ") + entry + re.escape(
                " cannot be resolved (a dangling or looping link); adapters loaded over HTTP must lie whole inside "
                f"the adapters root {root}"), message), message
        assert "planted" not in service.host.adapters
        assert snapshot(tmp_path) == before
    finally:
        shutil.rmtree(adapters_root / name)


def test_a_link_that_stays_inside_the_root_is_loaded(client, service, adapters_root):
    folder = adapters_root / "linked-inside"
    folder.mkdir()
    try:
        for f in (adapters_root / "alpha").iterdir():
            (folder / f.name).symlink_to(f)
        response = client.post("/v1/adapters", json={"path": "linked-inside", "name": "inside"})
        assert response.status_code == 201, response.text
        assert client.delete("/v1/adapters/inside").status_code == 200
    finally:
        shutil.rmtree(folder)


def test_an_adapter_folder_with_too_many_entries_is_refused(client, adapters_root):
    folder = adapters_root / "crowded"
    shutil.copytree(adapters_root / "alpha", folder)
    try:
        for i in range(1001):
            (folder / f"f{i}").touch()
        assert_error(client.post("/v1/adapters", json={"path": "crowded"}), 400,
                     "adapter folder 'crowded' holds more than 1000 entries; an adapter is a few files")
    finally:
        shutil.rmtree(folder)


# -- bugs: a one-line 500, the traceback in the log; every endpoint's errors are JSON ------------


@pytest.mark.parametrize("method,path,body,where", [
    ("POST", "/v1/completions", {"prompt": SKY, "max_tokens": 1}, "resolve"),
    ("GET", "/v1/models/alpha", None, "resolve"),
    ("GET", "/v1/adapters", None, "describe"),
])
def test_a_bug_in_a_handler_is_a_one_line_500_and_a_logged_traceback(client, service, monkeypatch, caplog, method,
                                                                     path, body, where):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(service, where, broken)
    with caplog.at_level(logging.ERROR, logger="plugtune.serving.server"):
        response = client.request(method, path, json=body)
    assert_error(response, 500, f"internal error in {method} {path} (KeyError: 'a bug'); the server log has the traceback")
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)
    monkeypatch.undo()
    assert client.get("/health").status_code == 200


ERROR_PATHS = [
    ("GET", "/v1/nothing", None, 404, "GET /v1/nothing: Not Found"),
    ("PUT", "/v1/completions", {}, 405, "PUT /v1/completions: Method Not Allowed"),
    ("POST", "/v1/completions", b"[1, 2", 400, None),
    ("POST", "/v1/chat/completions", b"\xff\xfe", 400, None),
    ("POST", "/v1/classify", b"{", 400, None),
    ("POST", "/v1/adapters", b"nul\x00", 400, None),
    ("POST", "/v1/adapters", {"path": 5}, 422, "path: Input should be a valid string"),
    ("POST", "/v1/adapters", {"path": "alpha", "extra": 1}, 422, "extra: Extra inputs are not permitted"),
    ("POST", "/v1/adapters", {"path": "a\x00b"}, 400, None),
    ("DELETE", "/v1/adapters/nobody", None, 404, "no adapter named 'nobody' is loaded"),
    ("GET", "/v1/models/nobody", None, 404, None),
    ("POST", "/v1/adapters", {"path": "a" * 300}, 404, None),  # ENAMETOOLONG: was a 500
    ("POST", "/v1/completions", [1, 2], 422, None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 422, None),
    ("POST", "/v1/completions", {"prompt": SKY, "max_tokens": 10 ** 30}, 400, None),
]


@pytest.mark.parametrize("method,path,body,status,message", ERROR_PATHS)
def test_every_endpoints_errors_are_openai_shaped_one_liners(client, method, path, body, status, message):
    if isinstance(body, bytes):
        response = client.request(method, path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.request(method, path, json=body)
    assert_error(response, status, message)


# -- fuzzing: never a 500, never a hang ---------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
texts = st.one_of(st.text(max_size=60), st.sampled_from([SKY, GRASS, "", " ", "\x00", "\ud7ff" * 3, "{x}"]))
sampling = {
    "model": st.one_of(st.sampled_from(["alpha", "beta", "base", "tiny-llama", "gamma", "", "../alpha"]), json_values),
    "temperature": st.one_of(st.floats(), st.sampled_from([0, 1e-39, 5e-324, 2, 2.0000001]), json_values),
    "top_p": st.one_of(st.floats(), st.sampled_from([1e-30, 5e-324, 1, 0]), json_values),
    "max_tokens": st.one_of(st.integers(-3, 6), st.sampled_from([127, 128, 10 ** 20]), json_values),
    "stop": st.one_of(st.none(), texts, st.lists(texts, max_size=6), json_values),
    "stream": st.one_of(st.booleans(), json_values),
    "seed": st.one_of(st.none(), st.integers(-2 ** 70, 2 ** 70), json_values),
    "n": st.one_of(st.integers(-1, 3), json_values),
    "logprobs": st.one_of(st.none(), st.booleans(), st.integers(-1, 5)),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": json_values}), json_values),
}
completion_bodies = st.fixed_dictionaries({}, optional={
    "prompt": st.one_of(texts, st.lists(texts, max_size=10), json_values), "echo": json_values, **sampling})
message = st.fixed_dictionaries({}, optional={
    "role": st.one_of(st.sampled_from(["system", "user", "assistant", "developer", "tool", "bot"]), json_values),
    "content": st.one_of(texts, st.lists(st.fixed_dictionaries({}, optional={
        "type": st.one_of(st.sampled_from(["text", "image_url"]), json_values), "text": json_values}), max_size=3),
        json_values)})
chat_bodies = st.fixed_dictionaries({}, optional={
    "messages": st.one_of(st.lists(message, max_size=5), json_values),
    "max_completion_tokens": st.one_of(st.integers(-1, 6), json_values), **sampling})
classify_bodies = st.fixed_dictionaries({}, optional={
    "input": st.one_of(texts, st.lists(texts, max_size=10), json_values), "model": json_values})
adapter_bodies = st.fixed_dictionaries({}, optional={
    "path": st.one_of(st.sampled_from(["alpha", "../alpha", "/etc", "", ".", "alpha/../beta", "nope", "a" * 300]),
                      texts, json_values),
    "name": st.one_of(st.sampled_from(["alpha", "base", "tiny-llama", ".x", "-x", "ok", "a" * 65]), texts, json_values)})

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])


def fuzz_post(client, service, path: str, body: object, raw: bool) -> httpx.Response:
    content = json.dumps(body, allow_nan=True).encode()
    if raw:  # the same body, cut short: malformed JSON
        content = content[: max(0, len(content) - 2)]
    start = time.monotonic()
    response = client.post(path, content=content, headers={"content-type": "application/json"})
    assert time.monotonic() - start < 20, (path, body)
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert_error(response, response.status_code)
    return response


@FUZZ
@given(body=completion_bodies, raw=st.booleans())
def test_fuzz_completions(client, service, body, raw):
    response = fuzz_post(client, service, "/v1/completions", body, raw)
    if response.status_code == 200 and not body.get("stream"):
        assert response.json()["choices"]


@FUZZ
@given(body=chat_bodies, raw=st.booleans())
def test_fuzz_chat(client, service, body, raw):
    fuzz_post(client, service, "/v1/chat/completions", body, raw)


@FUZZ
@given(body=classify_bodies, raw=st.booleans())
def test_fuzz_classify(client, service, body, raw):
    fuzz_post(client, service, "/v1/classify", body, raw)


@FUZZ
@given(body=adapter_bodies, raw=st.booleans())
def test_fuzz_adapters(client, service, body, raw):
    response = fuzz_post(client, service, "/v1/adapters", body, raw)
    if response.status_code == 201:  # a valid load: undo it so the next example sees the same set
        assert client.delete(f"/v1/adapters/{response.json()['name']}").status_code == 200
    assert set(service.host.adapters) == {"alpha", "beta"}
