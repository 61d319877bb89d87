"""Structured output through ``plugtune serve``: 100 requests with a JSON schema, sampled on
a tiny random Llama with a byte-level tokenizer (whose unconstrained text is never JSON), all
answer valid JSON for the schema
(checked with the ``jsonschema`` library); a guided choice is one of its strings; a regex is
matched in full; a classification-style causal adapter is held to its label words; malformed
requests are one-line 400s."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import pytest

from plugtune.data.tasks import build_task
from plugtune.plugins.methods.lora import random_lora_adapter
from plugtune.serving.host import AdapterHost
from plugtune.serving.server import Service, create_app, running
from plugtune.testing import build_tiny_bpe_llama
from test_server import SKY, assert_error, client  # noqa: F401 (client: this module's url)

PROMPT = "pet:"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "owner": {"type": "object", "properties": {"vip": {"type": "boolean"}}, "required": ["vip"],
                  "additionalProperties": False},
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory):
    return build_tiny_bpe_llama(tmp_path_factory.mktemp("bpe-llama"))


@pytest.fixture(scope="module")
def url(tmp_path_factory, bpe_llama):
    from plugtune.data.tasks import raw_prompt_task

    host = AdapterHost.from_base(str(bpe_llama), raw_prompt_task())
    service = Service(host, adapters_root=tmp_path_factory.mktemp("none"), max_batch=16, base_name="tiny")
    with running(create_app(service)) as base_url:
        yield base_url


def test_a_hundred_json_schema_requests_all_validate(url):
    async def one(c: httpx.AsyncClient, i: int) -> dict:
        body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 1.0, "seed": i,
                "response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}}
        response = await c.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    async def all_of_them() -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            return await asyncio.gather(*(one(c, i) for i in range(100)))

    choices = asyncio.run(all_of_them())
    values = []
    for choice in choices:
        value = json.loads(choice["text"])
        jsonschema.validate(value, SCHEMA)
        assert choice["finish_reason"] == "stop"
        values.append(json.dumps(value, sort_keys=True))
    assert len(set(values)) > 10  # sampled: the answers differ, each one valid
    unconstrained = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 40, "seed": 1}, timeout=60)
    with pytest.raises(ValueError):
        json.loads(unconstrained.json()["choices"][0]["text"])


def test_json_object_choice_and_regex(client):
    stopped = 0
    for seed in range(4):  # any JSON object: a random model may write one longer than the budget (cut: "length")
        choice = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 220, "temperature": 0.7, "seed": seed,
            "response_format": {"type": "json_object"}}).json()["choices"][0]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["content"]), dict)
            stopped += 1
        else:
            assert choice["message"]["content"].startswith("{")
    assert stopped
    for seed in range(5):
        choice = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": seed,
                                                       "guided_choice": ["blue sky", "red", "green grass"]}).json()
        assert choice["choices"][0]["text"] in ("blue sky", "red", "green grass")
        regex = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": seed,
                                                      "structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}}).json()
        assert re.fullmatch("[a-c]{3}-[0-9]{2}", regex["choices"][0]["text"])


def test_malformed_structured_output_is_a_one_line_400(client):
    assert_error(client.post("/v1/completions", json={"prompt": PROMPT, "response_format": {"type": "json_schema",
                 "json_schema": {"schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}),
                 400, "response_format.json_schema.schema")
    assert_error(client.post("/v1/completions", json={"prompt": PROMPT, "guided_choice": ["a"], "guided_regex": "b"}),
                 400, "guided_")
    assert_error(client.post("/v1/completions", json={"prompt": PROMPT, "response_format": {"type": "xml"}}),
                 400, "response_format")
    assert_error(client.post("/v1/completions", json={"prompt": PROMPT, "guided_choice": "labels"}), 400, "labels")


def test_a_grammar_the_tokenizer_cannot_write_ends_with_a_400(tmp_path, tiny_llama):
    """The word-level tiny tokenizer has no '{': a JSON answer is impossible, said in one line."""
    from plugtune.data.tasks import raw_prompt_task

    host = AdapterHost.from_base(str(tiny_llama), raw_prompt_task())
    service = Service(host, adapters_root=tmp_path, max_batch=4, base_name="tiny-llama")
    with running(create_app(service)) as base_url, httpx.Client(base_url=base_url, timeout=120) as c:
        assert_error(c.post("/v1/completions", json={"prompt": SKY, "response_format": {"type": "json_object"}}),
                     400, "cannot write what the grammar asks for")


def test_a_label_word_adapter_is_held_to_its_labels(tmp_path, bpe_llama):
    task = build_task(dict(type="causal-lm", prompt="review : {text} sentiment :", response=" {label}",
                           labels=["great", "awful"]))
    host = AdapterHost.from_base(str(bpe_llama), task)
    host.load(random_lora_adapter(tmp_path / "senti", host.base, task, r=4, seed=3, scale=0.5))
    host.use(None)
    service = Service(host, adapters_root=tmp_path, max_batch=4, base_name="tiny-llama")
    with running(create_app(service)) as base_url, httpx.Client(base_url=base_url, timeout=120) as c:
        for seed in range(6):
            body = c.post("/v1/completions", json={"model": "senti", "prompt": "review : the film was fun sentiment :",
                                                   "max_tokens": 8, "temperature": 1.5, "seed": seed,
                                                   "guided_choice": "labels"}).json()
            assert "choices" in body, body
            assert body["choices"][0]["text"] in (" great", " awful"), body
