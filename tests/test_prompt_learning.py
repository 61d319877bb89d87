"""prompt_tuning and p_tuning (plugins/methods/prompt_learning.py): they train on the tiny
Llama (causal LM) and the tiny BERT (classification), save in peft's format with the logits
plain peft gives, are hosted beside LoRA and prefix adapters on one base (each adapter exact,
the base torch.equal after unload), and decode from their virtual tokens' KV cache exactly as
peft's own ``generate``. The conformance kit runs on both in tests/test_conformance.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import plugtune
from plugtune import hookimpl
from plugtune.artifacts.adapters import CONFIG_FILE, read_manifest
from plugtune.data.tasks import build_task
from plugtune.kernel.components import PrepareContext
from plugtune.kernel.registry import build_plugin_system, set_plugin_system
from plugtune.serving.host import AdapterHost
from plugtune.testing import assert_base_unchanged, base_snapshot, real_token_logits, recipe_dict

TEXTS = ["question : what is the colour of the sky ? answer : blue", "the film was great and fun",
         "question : what is the colour of the sun ? answer :"]
CLS_TEXTS = ["the film was great wonderful fun", "the plot was awful dull tedious", "a very charming cast"]

CAUSAL = {
    "prompt_tuning": ("prompt_tuning", {"num_virtual_tokens": 4}),
    "prompt_tuning-text": ("prompt_tuning", {"num_virtual_tokens": 6, "init": "text", "init_text": "question answer"}),
    "prompt_tuning-vocab": ("prompt_tuning", {"num_virtual_tokens": 4, "init": "sample_vocab"}),
    "p_tuning": ("p_tuning", {"num_virtual_tokens": 4, "encoder_hidden": 16}),
    "p_tuning-lstm": ("p_tuning", {"num_virtual_tokens": 4, "encoder": "lstm", "encoder_hidden": 16}),
    "prefix": ("prefix", {"num_virtual_tokens": 4}),
    "lora": ("lora", {"r": 4, "alpha": 8, "target_modules": "all-linear"}),
}
LEARNING_RATES = {"lora": 2e-2, "prefix": 5e-2}  # soft prompts learn at the high rates prompt tuning is known for
CLASSIFIERS = {
    "prompt_tuning": ("prompt_tuning", {"num_virtual_tokens": 4}),
    "p_tuning": ("p_tuning", {"num_virtual_tokens": 4, "encoder_hidden": 16}),
}


class Keeper:
    """The trained model of each run, kept at its end (a lifecycle hook)."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}

    @hookimpl
    def on_train_end(self, run, adapter_dir, metrics):
        run.model.eval()
        self.models[Path(adapter_dir).name] = run.model


def _train(root: Path, base: Path, data: Path, key: str, method: str, options: dict, *, classification: bool,
           seed: int = 0) -> Any:
    keeper = Keeper()
    raw = recipe_dict(base, data, classification=classification, name=key, evaluators=["loss"],
                      method={"name": method, "options": options}, output={"dir": str(root / key)})
    raw["training"].update(learning_rate=LEARNING_RATES.get(method, 2e-1), seed=seed)
    path = root / f"{key}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    set_plugin_system(build_plugin_system(extra_plugins=[("keeper", keeper)]))
    try:
        result = plugtune.run(path, show_progress=False)
    finally:
        set_plugin_system(None)
    return result, keeper.models[key]


@pytest.fixture(scope="module")
def causal(tmp_path_factory, tiny_llama, tiny_data) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("prompt-causal")
    runs = {key: _train(root, tiny_llama, tiny_data, key, m, o, classification=False) for key, (m, o) in CAUSAL.items()}
    runs["prompt_tuning-b"] = _train(root, tiny_llama, tiny_data, "prompt_tuning-b", "prompt_tuning",
                                     {"num_virtual_tokens": 3}, classification=False, seed=1)
    return runs


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory, tiny_bert, tiny_data) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("prompt-cls")
    return {key: _train(root, tiny_bert, tiny_data, key, m, o, classification=True) for key, (m, o) in CLASSIFIERS.items()}


@torch.no_grad()
def _model_logits(model, tokenizer, texts) -> torch.Tensor:
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return real_token_logits(model(**enc).logits, enc["input_ids"])


def _peft(base_path: Path, adapter_dir: Path, classification: bool = False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if classification:
        base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


@pytest.mark.parametrize("key", [k for k in CAUSAL if k not in ("prefix", "lora")])
def test_trains_saves_in_peft_format_and_plain_peft_gives_the_trained_logits(causal, tiny_llama, key):
    result, trained = causal[key]
    assert result.after["loss"] < result.before["loss"] - 0.05, (result.before, result.after)
    config = json.loads((result.adapter_dir / CONFIG_FILE).read_text())
    assert config["peft_type"] == ("P_TUNING" if key.startswith("p_tuning") else "PROMPT_TUNING")
    assert config["inference_mode"] is True
    n = CAUSAL[key][1]["num_virtual_tokens"]
    host = AdapterHost.from_adapters(result.adapter_dir)
    want = _model_logits(trained, host.tokenizer, TEXTS)
    assert want.shape[:2] == host.tokenizer(TEXTS, return_tensors="pt", padding=True)["input_ids"].shape
    torch.testing.assert_close(host.logits(TEXTS), want, atol=1e-5, rtol=0)
    plain = _model_logits(_peft(tiny_llama, result.adapter_dir), host.tokenizer, TEXTS)
    torch.testing.assert_close(plain, want, atol=1e-5, rtol=0)
    # p-tuning saves the encoder's output: the adapter holds n embeddings and nothing of the encoder
    assert set(host.adapters[key].runner.prompt_encoder[key].state_dict()) == {"embedding.weight"}
    assert host.list()[0]["resident_bytes"] == n * 32 * 4  # n virtual tokens of hidden 32, fp32


def test_text_init_is_peft_s_text_init_with_the_base_tokenizer(tiny_llama):
    """init: text starts from the embeddings peft's own TEXT init gives (loading the same
    tokenizer by path), without peft loading any tokenizer."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plugtune.plugins.methods.prompt_learning import PromptTuningMethod

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    task = build_task({"type": "causal-lm", "prompt": "{q}", "response": " {a}"})
    options = PromptTuningMethod.Options(num_virtual_tokens=7, init="text", init_text="what is the colour")
    ours = PromptTuningMethod(options).prepare(AutoModelForCausalLM.from_pretrained(tiny_llama), task,
                                               PrepareContext(tokenizer=tokenizer))
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT",
        prompt_tuning_init_text="what is the colour", tokenizer_name_or_path=str(tiny_llama)))
    assert torch.equal(ours.prompt_encoder["default"].embedding.weight, theirs.prompt_encoder["default"].embedding.weight)


@pytest.mark.parametrize("key", list(CLASSIFIERS))
def test_a_bert_classifier_trains_and_plain_peft_gives_its_logits(classifiers, tiny_bert, key):
    result, trained = classifiers[key]
    assert result.after["loss"] < result.before["loss"], (result.before, result.after)
    host = AdapterHost.from_adapters(result.adapter_dir)
    want = _model_logits(trained, host.tokenizer, CLS_TEXTS)  # (B, C)
    torch.testing.assert_close(host.logits(CLS_TEXTS), want, atol=1e-5, rtol=0)
    plain = _model_logits(_peft(tiny_bert, result.adapter_dir, classification=True), host.tokenizer, CLS_TEXTS)
    torch.testing.assert_close(plain, want, atol=1e-5, rtol=0)
    probs = want.softmax(-1)
    for got, p in zip(host.classify(CLS_TEXTS), probs):
        assert got["scores"] == pytest.approx(dict(zip(host.task.labels, p.tolist())), abs=1e-6)
    snapshot = base_snapshot(host)  # (after load: peft's head copy is in the tree while an adapter is resident)
    host.unload(key)
    assert not any("modules_to_save" in n for n, _ in host.base.model.named_modules()), "peft's head copy stayed"
    assert len(base_snapshot(host)[1]) < len(snapshot[1])


def test_many_soft_prompts_beside_lora_and_prefix_on_one_base(causal, tiny_llama):
    """Every adapter exact on a shared base (1e-5 to the trained model), in any mix of rows
    per call; switching and unloading leave the others as they were and the base torch.equal."""
    names = ["prompt_tuning", "prompt_tuning-b", "p_tuning", "p_tuning-lstm", "prefix", "lora", "prompt_tuning-text"]
    task = build_task(read_manifest(causal["lora"][0].adapter_dir).task)
    host = AdapterHost.from_base(str(tiny_llama), task, device="cpu")
    fresh = base_snapshot(host)
    bare = host.logits(TEXTS, None)
    for name in names:
        host.load(causal[name][0].adapter_dir, name)
    assert torch.equal(host.logits(TEXTS, None), bare)
    alone = {}
    for name in names:
        alone[name] = host.logits(TEXTS, name)
        torch.testing.assert_close(alone[name], _model_logits(causal[name][1], host.tokenizer, TEXTS), atol=1e-5, rtol=0)
    rows = ["p_tuning", None, "lora", "prompt_tuning", "prefix", "prompt_tuning-b", "p_tuning-lstm"]
    texts = [TEXTS[i % len(TEXTS)] for i in range(len(rows))]
    mixed = host.logits(texts, rows)
    for i, (text, name) in enumerate(zip(texts, rows)):
        one = host.logits([text], name)[0]
        torch.testing.assert_close(mixed[i, : one.size(0)], one, atol=1e-5, rtol=0)
    resident = {r["name"]: r["resident_bytes"] for r in host.list()}
    assert resident["prompt_tuning"] == 4 * 32 * 4 and resident["prompt_tuning-b"] == 3 * 32 * 4
    for i, name in enumerate(names):
        host.unload(name)
        for other in names[i + 1:]:
            assert torch.equal(host.logits(TEXTS, other), alone[other]), f"unloading {name} changed {other}"
    assert_base_unchanged(host, fresh, "after every soft prompt, prefix and LoRA adapter left")
    assert torch.equal(host.logits(TEXTS, None), bare)


def _ids(tokenizer, text) -> list[int]:
    return tokenizer(text)["input_ids"]


@pytest.mark.parametrize("key", ["prompt_tuning", "p_tuning", "prompt_tuning-text"])
def test_host_generation_is_peft_s_greedy_generate(causal, tiny_llama, key):
    """The host decodes from the KV cache of the virtual tokens run once through the base;
    peft's generate runs [virtual tokens + prompt] in one prefill: the same tokens."""
    result, _ = causal[key]
    host = AdapterHost.from_adapters(causal["lora"][0].adapter_dir, result.adapter_dir)
    model = _peft(tiny_llama, result.adapter_dir)
    prompts = ["question : what is the colour of the sky ? answer :", "question : what is the colour of the grass ? answer :",
               "the film"]
    want = []
    for prompt in prompts:  # one at a time: peft drops position ids, so a left-padded batch shifts padded rows
        ids = torch.tensor([_ids(host.tokenizer, prompt)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, pad_token_id=host.tokenizer.pad_token_id)
        want.append(out[0, ids.size(1):].tolist())
    # together, beside LoRA and bare-base rows: each row's tokens as peft gives them alone
    rows = [key, "lora", key, None, key]
    texts = [prompts[0], prompts[1], prompts[1], prompts[2], prompts[2]]
    stream = host.stream(texts, rows, raw=True, max_new_tokens=6, ignore_eos=True)
    for _ in stream:
        pass
    assert [stream.generated[i] for i in (0, 2, 4)] == want
    lora_alone = host.stream([prompts[1]], "lora", raw=True, max_new_tokens=6, ignore_eos=True)
    for _ in lora_alone:
        pass
    assert stream.generated[1] == lora_alone.generated[0]


def _validate(tmp_path: Path, base: Path, data: Path, method: str, options: dict, classification: bool = False) -> str:
    raw = recipe_dict(base, data, classification=classification, method={"name": method, "options": options})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(plugtune.RecipeError) as err:
        plugtune.load_recipe(path)
    message = str(err.value)
    assert "\n" not in message
    return message.split(": ", 1)[1]


@pytest.mark.parametrize("method, options, expected", [
    ("prompt_tuning", {"init": "text"}, "method.options: init: text needs init_text (the words the virtual tokens start from)"),
    ("prompt_tuning", {"init_text": "hi"}, "method.options: init_text is used only with init: text (init is random); "
                                           "drop it or set init: text"),
    ("prompt_tuning", {"init": "words"}, "method.options.init: Input should be 'random', 'text' or 'sample_vocab' (got 'words')"),
    ("prompt_tuning", {"num_virtual_tokens": 0}, "method.options.num_virtual_tokens: Input should be greater than 0 (got 0)"),
    ("prompt_tuning", {"num_virtual_tokens": 128}, "method.options.num_virtual_tokens: 128 virtual tokens leave no room "
                                                   "in this model's 128 positions; use fewer"),
    ("p_tuning", {"encoder": "gru"}, "method.options.encoder: Input should be 'mlp' or 'lstm' (got 'gru')"),
    ("p_tuning", {"encoder_layers": 3}, "method.options: encoder_layers applies to encoder: lstm only (peft's mlp "
                                        "encoder always has 2 hidden layers); drop it or set encoder: lstm"),
    ("p_tuning", {"encoder_dropout": 0.1}, "method.options: encoder_dropout applies to encoder: lstm only (peft's mlp "
                                           "encoder has no dropout); drop it or set encoder: lstm"),
    ("p_tuning", {"encoder": "lstm", "encoder_layers": 1, "encoder_dropout": 0.1},
     "method.options: encoder_dropout acts between LSTM layers, and encoder_layers is 1; use 2 or more, or no dropout"),
    ("p_tuning", {"encoder_hidden": 0}, "method.options.encoder_hidden: Input should be greater than 0 (got 0)"),
])
def test_bad_options_are_one_line_errors_at_validation(tmp_path, tiny_llama, tiny_data, method, options, expected):
    assert _validate(tmp_path, tiny_llama, tiny_data, method, options) == expected


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_a_decoder_classifier_is_refused_with_the_reason(tmp_path, tiny_llama, tiny_data, method):
    message = _validate(tmp_path, tiny_llama, tiny_data, method, {}, classification=True)
    assert message.startswith(f"method.name: {method} cannot train a classifier on this decoder (llama): its "
                              "classification head reads the last non-pad token id")


def test_a_chat_task_trains_and_the_host_chats_as_plain_peft_generates(tmp_path, tiny_chat_llama, tiny_chats):
    """The chat task: the loss on assistant turns falls; ``host.chat`` renders the adapter's
    template and decodes the tokens peft's greedy generate gives for that prompt."""
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump({
        "name": "soft-chat", "base_model": str(tiny_chat_llama), "task": {"type": "chat"},
        "data": {"loader": "table", "options": {"path": str(tiny_chats / "chats.jsonl"), "test_size": 0.25}},
        "method": {"name": "prompt_tuning", "options": {"num_virtual_tokens": 4}}, "evaluators": ["loss"],
        "training": {"max_steps": 12, "batch_size": 8, "learning_rate": 2e-1, "max_length": 64, "device": "cpu"},
        "output": {"dir": str(tmp_path / "soft-chat")}}))
    result = plugtune.run(path, show_progress=False)
    assert result.after["loss"] < result.before["loss"], (result.before, result.after)
    host = AdapterHost.from_adapters(result.adapter_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the colour of the sky ?"}]
    prompt = host.chat_prompt(messages, "soft-chat")
    stream = host.stream([prompt], "soft-chat", max_new_tokens=5, ignore_eos=True)
    for _ in stream:
        pass
    ids = torch.tensor([prompt])
    model = _peft(tiny_chat_llama, result.adapter_dir)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                         do_sample=False, pad_token_id=host.tokenizer.pad_token_id)
    assert stream.generated[0] == out[0, ids.size(1):].tolist()
