"""The ``chat`` task: formats, masks from template offsets, truncation by whole turns, the
template travelling with the adapter, and chat requests rendered at inference exactly as
the conversations were in training."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml
from transformers import AutoTokenizer

import plugtune
from plugtune.artifacts.adapters import read_manifest
from plugtune.data.conversations import ChatTemplate, to_messages
from plugtune.data.datacheck import normalize_splits
from plugtune.data.tasks import build_task
from plugtune.kernel.errors import DataError, PlugtuneError, RecipeError
from plugtune.serving.host import AdapterHost
from plugtune.serving.server import Service, create_app, running
from plugtune.testing import CHATML_TEMPLATE
from plugtune.training.recipe import load_recipe

# chatml with transformers' {% generation %} markers around what the assistant must say: the
# mask transformers (and TRL's assistant-only loss) derive from it is the independent check
CHATML_WITH_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# a template that writes text between turns and a default system prompt: masks must not drift
SEPARATED = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nbe brief<|im_end|>' }}{% endif %}"
    "{% for message in messages %}{% if not loop.first or messages[0]['role'] != 'system' %}{{ ' the ' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + ' : ' + message['content'] | trim + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' the <|im_start|>assistant : ' }}{% endif %}")

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is the colour of the sky ?"},
    {"role": "assistant", "content": "blue"},
    {"role": "user", "content": "and the sun ?"},
    {"role": "assistant", "content": "yellow"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_llama):
    return AutoTokenizer.from_pretrained(tiny_chat_llama)


def chat_task(tokenizer=None, **options):
    task = build_task({"type": "chat", **options}, strict=True)
    if tokenizer is not None:
        task.bind_tokenizer(tokenizer)
    return task


def trained_tokens(tokenizer, row) -> list[str]:
    return tokenizer.convert_ids_to_tokens([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100])


# -- formats ----------------------------------------------------------------------------------


def test_openai_sharegpt_and_alpaca_rows_become_the_same_messages():
    openai = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]}
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}
    alpaca = {"instruction": "hi", "input": "", "output": "ok"}
    task = chat_task()
    expected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    assert [task.normalize(r)["messages"] for r in (openai, sharegpt, alpaca)] == [expected] * 3
    assert task.notes() == ["chat: detected conversation format openai (1 rows), sharegpt (1 rows), alpaca (1 rows)"]
    with_input = to_messages({"instruction": "translate", "input": "the sky", "output": "el cielo", "system": "s"}, "alpaca")
    assert with_input == [{"role": "system", "content": "s"}, {"role": "user", "content": "translate\n\nthe sky"},
                          {"role": "assistant", "content": "el cielo"}]
    # a JSON list in a CSV cell is read as the messages
    assert task.normalize({"messages": json.dumps(openai["messages"])})["messages"] == expected


def test_a_row_that_fits_no_format_is_one_line_naming_the_row():
    task = chat_task()
    splits = {"train": [{"messages": [{"role": "user", "content": "hi"}]}, {"prompt": "hi", "reply": "ok"}], "test": []}
    with pytest.raises(DataError) as err:
        normalize_splits(splits, task)
    assert str(err.value).startswith("train row 2: fits none of the conversation formats: openai ('messages'), "
                                     "sharegpt ('conversations') or alpaca ('instruction' and 'output') (keys: prompt, reply)")
    bad_role = {"messages": [{"role": "robot", "content": "hi"}]}
    with pytest.raises(DataError, match=r"^train row 1: messages\[0\]\.role: unknown role 'robot'"):
        normalize_splits({"train": [bad_role]}, task)
    with pytest.raises(DataError, match=r"unknown speaker 'narrator'"):
        chat_task(format="sharegpt").normalize({"conversations": [{"from": "narrator", "value": "x"}]})
    with pytest.raises(DataError, match=r"^not an alpaca row: it has no 'instruction' \(keys: messages\)"):
        chat_task(format="alpaca").normalize({"messages": []})


# -- masks --------------------------------------------------------------------------------------


def test_mask_equals_transformers_assistant_mask_from_generation_markers(tokenizer):
    """The independent derivation (the mechanism TRL's assistant_only_loss uses): same
    token count, same positions."""
    row = chat_task(tokenizer, template="chatml").encode({"messages": CONVERSATION}, tokenizer, 256)
    theirs = tokenizer.apply_chat_template(CONVERSATION, chat_template=CHATML_WITH_GENERATION, tokenize=True,
                                           return_dict=True, return_assistant_tokens_mask=True)
    assert row["input_ids"] == list(theirs["input_ids"])
    assert [l != -100 for l in row["labels"]] == [bool(m) for m in theirs["assistant_masks"]]
    assert trained_tokens(tokenizer, row) == ["blue", "<|im_end|>", "yellow", "<|im_end|>"]


def test_mask_options_roles_last_turn_and_end_of_turn(tokenizer):
    example = {"messages": CONVERSATION}
    assert trained_tokens(tokenizer, chat_task(tokenizer, last_turn_only=True).encode(example, tokenizer, 256)) == [
        "yellow", "<|im_end|>"]
    assert trained_tokens(tokenizer, chat_task(tokenizer, train_end_of_turn=False).encode(example, tokenizer, 256)) == [
        "blue", "yellow"]
    both = chat_task(tokenizer, roles=["user", "assistant"]).encode(example, tokenizer, 256)
    assert trained_tokens(tokenizer, both) == ["what", "is", "the", "colour", "of", "the", "sky", "?", "<|im_end|>", "blue",
                                               "<|im_end|>", "and", "the", "sun", "?", "<|im_end|>", "yellow", "<|im_end|>"]
    with pytest.raises(DataError, match="no message with a trained role"):
        chat_task(tokenizer).encode({"messages": CONVERSATION[:2]}, tokenizer, 256)


def test_a_template_that_writes_text_between_turns_masks_only_the_answers(tokenizer):
    task = chat_task(tokenizer, template_text=SEPARATED)
    no_system = {"messages": CONVERSATION[1:]}
    row = task.encode(no_system, tokenizer, 256)
    text = tokenizer.decode(row["input_ids"])
    assert text.count(" the ") >= 3 and text.startswith("<|im_start|> system be brief")  # the inserted text is there
    assert trained_tokens(tokenizer, row) == ["blue", "<|im_end|>", "yellow", "<|im_end|>"]
    # content with surrounding spaces is trimmed by the template: the mask follows the rendering
    padded = {"messages": [*CONVERSATION[1:2], {"role": "assistant", "content": "  blue  "}]}
    assert trained_tokens(tokenizer, task.encode(padded, tokenizer, 256)) == ["blue", "<|im_end|>"]


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # shows only the last user message: adding a turn changes what came before
    last_only = ("{% for message in messages %}{% if loop.last or message['role'] != 'user' %}{{ message['role'] + ' : ' "
                 "+ message['content'] + ' . ' }}{% endif %}{% endfor %}")
    with pytest.raises(DataError, match="not prefix-stable"):
        chat_task(tokenizer, template_text=last_only).encode({"messages": CONVERSATION}, tokenizer, 256)


def test_truncation_keeps_whole_turns_and_counts_what_it_cut(tokenizer):
    task = chat_task(tokenizer)
    full = task.encode({"messages": CONVERSATION}, tokenizer, 256)
    cut = task.encode({"messages": CONVERSATION}, tokenizer, len(full["input_ids"]) - 2)
    assert cut["turns_cut"] == [2]  # the second question and its answer left out, whole
    assert trained_tokens(tokenizer, cut) == ["blue", "<|im_end|>"]
    assert cut["input_ids"] == task.encode({"messages": CONVERSATION[:3]}, tokenizer, 256)["input_ids"]
    assert full["turns_cut"] == [0]
    # not even the first exchange fits: cut inside it
    tiny = task.encode({"messages": CONVERSATION}, tokenizer, 10)
    assert len(tiny["input_ids"]) == 10 and tiny["turns_cut"] == [4]


# -- options at validation ---------------------------------------------------------------------


def test_template_options_are_checked_at_validation(tmp_path, tiny_chat_llama, tiny_chats):
    good = tmp_path / "t.jinja"
    good.write_text(CHATML_TEMPLATE)
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }")

    def recipe(**task):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({
            "name": "c", "base_model": str(tiny_chat_llama), "task": {"type": "chat", **task},
            "data": {"loader": "table", "options": {"path": str(tiny_chats / "chats.jsonl")}},
            "method": "lora", "evaluators": ["loss"]}))
        return path

    assert load_recipe(recipe(template="t.jinja")).task.options.template_text == CHATML_TEMPLATE
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe(template="ChatML", roles=["bot"]))
    assert "- task.template: unknown chat template 'ChatML'; did you mean 'chatml'?" in str(err.value)
    assert "- task.roles[0]: Input should be 'system', 'user', 'assistant' or 'tool' (got 'bot')" in str(err.value)
    with pytest.raises(RecipeError, match=r"task.template: the chat template is not valid Jinja \(line 1"):
        load_recipe(recipe(template="bad.jinja"))
    with pytest.raises(RecipeError, match=r"task.template: .*missing.jinja: cannot read"):
        load_recipe(recipe(template="missing.jinja"))
    with pytest.raises(RecipeError, match=r"task.format: alpaca needs column 'instruction' \(columns: messages\)"):
        load_recipe(recipe(format="alpaca"))


# -- training, the manifest and inference -------------------------------------------------------


@pytest.fixture(scope="module")
def chat_adapter(tmp_path_factory, tiny_chat_llama, tiny_chats) -> Path:
    root = tmp_path_factory.mktemp("chat")
    path = root / "chat.yaml"
    path.write_text(yaml.safe_dump({
        "name": "chatty", "base_model": str(tiny_chat_llama), "task": {"type": "chat"},
        "data": {"loader": "table", "options": {"path": str(tiny_chats / "chats.jsonl"), "test_size": 0.25}},
        # full weights: a rank-4 LoRA on a random 32-wide model cannot tell the colours apart
        # (plain peft plateaus at the same loss); the LoRA path is checked on SmolLM2 below
        "method": "full",
        "evaluators": ["loss", "exact_match"],
        "training": {"max_steps": 60, "batch_size": 8, "learning_rate": 1e-2, "max_length": 64, "device": "cpu",
                     "max_new_tokens": 4},
        "output": {"dir": str(root / "adapters" / "chatty")}}))
    result = plugtune.run(path, show_progress=False)
    assert result.after["loss"] < result.before["loss"] and result.after["exact_match"] > result.before["exact_match"]
    return result.adapter_dir


def test_the_manifest_records_the_exact_template_and_its_hash(chat_adapter, tokenizer):
    task = read_manifest(chat_adapter).task
    assert task["type"] == "chat" and task["template"] == "tokenizer"
    assert task["template_text"] == tokenizer.chat_template == CHATML_TEMPLATE
    assert task["template_sha256"] == ChatTemplate(CHATML_TEMPLATE).sha256
    tampered = {**task, "template_text": task["template_text"] + " "}
    with pytest.raises(PlugtuneError, match="template_sha256 does not match template_text"):
        build_task(tampered)


def test_inference_renders_every_turn_token_for_token_as_training_did(chat_adapter, tokenizer):
    host = AdapterHost.from_adapters(chat_adapter)
    task = host.adapters["chatty"].task
    training_ids = task.encode({"messages": CONVERSATION}, tokenizer, 256)["input_ids"]
    for k in (2, 4):  # before each answer: the prompt at inference is the prefix training saw
        prompt = host.chat_prompt(CONVERSATION[:k], "chatty")
        assert training_ids[: len(prompt)] == prompt
        assert tokenizer.convert_ids_to_tokens(training_ids[len(prompt)]) == CONVERSATION[k]["content"]
    # the tokenizer's template changed after training: the adapter keeps its own
    host.tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    try:
        prompt = host.chat_prompt(CONVERSATION[:4], "chatty")
        assert prompt == training_ids[: len(prompt)]
        assert host.chat_prompt(CONVERSATION[:4], None) != prompt
    finally:
        host.tokenizer.chat_template = CHATML_TEMPLATE
    # the trained adapter answers with a colour and ends its turn at <|im_end|> (not EOS)
    assert host.chat(CONVERSATION[:4], "chatty", max_new_tokens=4) in {"blue", "green", "yellow"}
    assert host.adapters["chatty"].end_of_turn == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_the_server_answers_a_three_turn_conversation_as_host_chat_does(chat_adapter, tokenizer):
    host = AdapterHost.from_adapters(chat_adapter)
    three_turns = CONVERSATION[:4]  # system, user, assistant, user
    expected = host.chat(three_turns, "chatty", max_new_tokens=6)
    assert host.chat_prompt(three_turns, "chatty") != host.chat_prompt(three_turns[-1:], "chatty")
    service = Service(host, base_name="tiny-chat")
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=120) as client:
        body = client.post("/v1/chat/completions", json={"model": "chatty", "messages": three_turns, "max_tokens": 6,
                                                         "temperature": 0}).json()
        assert body["choices"][0]["message"]["content"] == expected
        assert body["usage"]["prompt_tokens"] == len(host.chat_prompt(three_turns, "chatty"))
        assert body["choices"][0]["finish_reason"] == "stop"  # at <|im_end|>, not EOS
        bad = client.post("/v1/chat/completions", json={"model": "chatty", "messages": [{"role": "robot", "content": "x"}]})
        assert bad.status_code in (400, 422) and "role" in bad.text
    assert expected in {"blue", "green", "yellow"}


# -- on the real model --------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_smollm2_chat_adapter_answers_three_turns_on_the_server_as_host_chat_does(tmp_path):
    """The shipped chat recipe, briefly trained: the server renders the whole conversation
    with the adapter's recorded template, exactly as AdapterHost.chat does, and the answer
    differs from the one a last-message-only rendering gives."""
    recipe = load_recipe(ROOT / "recipes" / "support-chat-smollm2-lora.yaml", [
        # two steps of two chats: what is asserted is the rendering, not what training taught
        f"output.dir={tmp_path / 'chat'}", "training.max_steps=2", "training.batch_size=2", "training.max_eval_examples=4",
        "training.eval_before=false", "evaluators=[loss]"])
    adapter = plugtune.run(recipe, show_progress=False).adapter_dir
    host = AdapterHost.from_adapters(adapter)
    name = host.active
    three_turns = [
        {"role": "system", "content": "You are the support assistant of a small online shop. Answer briefly."},
        {"role": "user", "content": "Hello, my parcel never arrived."},
        {"role": "assistant", "content": "I am sorry to hear that. Could you share the order number, please?"},
        {"role": "user", "content": "ORD-31337."},
    ]
    expected = host.chat(three_turns, name, max_new_tokens=24)
    last_only = host.generate([host.chat_prompt(three_turns[-1:], name)], name, max_new_tokens=24, raw=True)[0]
    with running(create_app(Service(host, base_name="smollm2"))) as url, httpx.Client(base_url=url, timeout=300) as client:
        body = client.post("/v1/chat/completions", json={"model": name, "messages": three_turns, "max_tokens": 24,
                                                         "temperature": 0}).json()
    assert body["choices"][0]["message"]["content"] == expected
    assert body["usage"]["prompt_tokens"] == len(host.chat_prompt(three_turns, name))
    assert expected and last_only != expected
    manifest = read_manifest(adapter).task
    assert manifest["template_text"] == host.tokenizer.chat_template


# -- hostile rows and templates -----------------------------------------------------------------


@pytest.mark.parametrize("row, message", [
    ({"messages": {"role": "user", "content": "hi"}}, r"'messages' must be a non-empty list of messages, got dict"),
    ({"messages": []}, r"'messages' must be a non-empty list of messages, got list"),
    ({"messages": "not json ["}, r"'messages' is text that is not a JSON list of messages"),
    ({"messages": [{"role": "user", "content": 7}]}, r"messages\[0\]\.content must be text, got int"),
    ({"messages": [{"content": "hi"}]}, r"messages\[0\] is not a message with a 'role' and 'content'"),
    ({"messages": ["hi"]}, r"messages\[0\] is not a message with a 'role' and 'content'"),
    ({"conversations": [{"from": "human"}]}, r"conversations\[0\] is not a ShareGPT turn with 'from' and 'value'"),
    ({"instruction": "hi", "output": None}, r"output is missing"),
])
def test_malformed_conversations_are_one_line_naming_the_row(row, message):
    with pytest.raises(DataError, match=r"^test row 1: " + message):
        normalize_splits({"test": [row]}, chat_task())


def test_a_template_path_that_is_not_a_regular_file_is_refused_at_validation(tmp_path, tiny_chat_llama, tiny_chats):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "c", "base_model": str(tiny_chat_llama), "task": {"type": "chat", "template": "/dev/zero"},
        "data": {"loader": "table", "options": {"path": str(tiny_chats / "chats.jsonl")}}, "method": "lora"}))
    with pytest.raises(RecipeError, match=r"task.template: /dev/zero is a character device, not a regular file"):
        load_recipe(path)


def test_a_template_that_fails_while_rendering_is_one_line(tiny_chat_llama, tokenizer):
    task = chat_task(tokenizer, template_text="{{ raise_exception('no system messages here') }}")
    with pytest.raises(DataError, match=r"^the chat template refused this conversation \(.*no system messages here"):
        task.encode_chat([{"role": "user", "content": "hi"}], tokenizer)
