"""A pytest plugin for plugtune and for plugin authors: tiny offline models and data.

Use it with ``pytest_plugins = ["plugtune.testing"]`` in a ``conftest.py``. Fixtures:

``tiny_llama``
    a folder with a randomly initialised 2-layer Llama (hidden 32) and a word-level
    tokenizer: a real Hugging Face model folder, usable as ``base_model`` in a recipe.
``tiny_bert``
    the same for a 2-layer BERT encoder (sequence classification).
``tiny_data``
    a folder with ``sentiment.csv`` (text,label) and ``sft.jsonl`` (question,answer).
``make_recipe``
    ``make_recipe(**sections) -> Path``: writes a recipe YAML for the tiny models into
    ``tmp_path`` and returns its path; sections override the defaults.
``plugin_system``
    a fresh registry (entry points reloaded) installed for the test and reset after.

Everything is built from configs with fixed seeds, in well under a second, offline.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

WORDS_POS = "great wonderful superb lovely brilliant moving fun charming delightful fresh".split()
WORDS_NEG = "awful boring dull tedious clumsy bland messy weak flat tiresome".split()
FILLER = "the film movie plot acting was is and a very really quite story cast ending".split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]"]


def _tokenizer(words: list[str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(words)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return tk, PreTrainedTokenizerFast


def _vocabulary() -> list[str]:
    extra = "question answer what is the capital colour of sky grass sea sun blue green red yellow : ? . , positive negative review label".split()
    return WORDS_POS + WORDS_NEG + FILLER + extra + [str(i) for i in range(10)]


def save_tiny_model(path: Path, model_class: Any, config: Any, tokenizer: Any, seed: int = 0) -> Path:
    """Initialise ``model_class(config)`` from ``seed`` and write it with its tokenizer to
    ``path``: a real Hugging Face model folder."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_llama(path: Path, seed: int = 0, words: list[str] | None = None, max_positions: int = 128) -> Path:
    """Write a tiny random Llama and its tokenizer to ``path``; ``words`` replaces the
    default word-level vocabulary (for data whose words the default lacks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tk, cls = _tokenizer(words if words is not None else _vocabulary())
    tokenizer = cls(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return save_tiny_model(path, LlamaForCausalLM, config, tokenizer, seed)


def build_tiny_bert(path: Path, seed: int = 0) -> Path:
    """Write a tiny random BERT encoder and its tokenizer to ``path``."""
    from tokenizers import processors
    from transformers import BertConfig, BertModel

    tk, cls = _tokenizer(_vocabulary())
    vocab = tk.get_vocab()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer = cls(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", cls_token="[CLS]", sep_token="[SEP]")
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return save_tiny_model(path, BertModel, config, tokenizer, seed)


def write_tiny_data(folder: Path, rows: int = 256, seed: int = 0) -> Path:
    """``sentiment.csv``: text made of sentiment words and filler, label positive/negative;
    ``sft.jsonl``: question/answer pairs with a learnable mapping."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "sentiment.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(rows):
            positive = i % 2 == 0
            words = rng.sample(FILLER, 4) + rng.sample(WORDS_POS if positive else WORDS_NEG, 2)
            rng.shuffle(words)
            writer.writerow([" ".join(words), "positive" if positive else "negative"])
    answers = {"sky": "blue", "grass": "green", "sea": "blue", "sun": "yellow"}
    with open(folder / "sft.jsonl", "w", encoding="utf-8") as fh:
        for i in range(rows):
            thing = rng.choice(sorted(answers))
            fh.write(json.dumps({"question": f"what is the colour of the {thing} ?", "answer": answers[thing]}) + "\n")
    return folder


def recipe_dict(base_model: str | Path, data_dir: Path, *, classification: bool = False, **sections: Any) -> dict[str, Any]:
    """A small, fast recipe for the tiny models; ``sections`` replace top-level keys."""
    if classification:
        task = {"type": "sequence-classification", "text": "{text}", "label": "label"}
        data = {"loader": "table", "options": {"path": str(data_dir / "sentiment.csv"), "test_size": 0.25}}
        evaluators = ["accuracy", "f1", "loss"]
    else:
        task = {"type": "causal-lm", "prompt": "question : {question} answer :", "response": " {answer}"}
        data = {"loader": "table", "options": {"path": str(data_dir / "sft.jsonl"), "test_size": 0.25}}
        evaluators = ["accuracy", "loss", "perplexity"]
    recipe = {
        "name": "tiny",
        "base_model": str(base_model),
        "task": task,
        "data": data,
        "method": {"name": "lora", "options": {"r": 4, "alpha": 8, "target_modules": "all-linear" if not classification else ["query", "value"]}},
        "evaluators": evaluators,
        "training": {"max_steps": 8, "batch_size": 8, "learning_rate": 2e-2, "seed": 0, "max_length": 48, "device": "cpu"},
    }
    if classification:
        recipe["training"].update(max_steps=24, learning_rate=1e-2)
    recipe.update(sections)
    return recipe


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture
def make_recipe(tmp_path: Path, tiny_llama: Path, tiny_bert: Path, tiny_data: Path) -> Any:
    def make(classification: bool = False, **sections: Any) -> Path:
        base = sections.pop("base_model", tiny_bert if classification else tiny_llama)
        data = recipe_dict(base, tiny_data, classification=classification, **sections)
        data.setdefault("output", {"dir": str(tmp_path / "adapters" / data["name"])})
        path = tmp_path / f"{data['name']}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return make


@pytest.fixture
def plugin_system() -> Iterator[Any]:
    from plugtune.kernel.registry import build_plugin_system, set_plugin_system

    system = build_plugin_system()
    set_plugin_system(system)
    try:
        yield system
    finally:
        set_plugin_system(None)
