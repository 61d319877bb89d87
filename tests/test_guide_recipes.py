"""The guide's recipes run end to end on tiny offline stand-ins for their base models.

* ``recipes/seed-gpt2-classification.yaml`` — the very recipe file, with ``base_model``
  pointed at a tiny GPT-2 (same architecture and the same missing pad token) whose word-level
  vocabulary is built from ``guide_texts.csv``.
* continued pre-training with the ``text`` loader, then a fine-tune whose ``base_model`` is
  the first stage's adapter folder: on ``tiny_llama`` with a small text file, and the shipped
  pair ``pretrain-domain-smollm2.yaml`` / ``finetune-on-pretrained-smollm2.yaml`` themselves
  on a tiny Llama whose vocabulary covers their data.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import plugtune
from plugtune.artifacts.adapters import read_manifest
from plugtune.training.recipe import load_recipe
from plugtune.testing import _tokenizer, build_tiny_llama, save_tiny_model

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
GUIDE_DATA = RECIPES / "data" / "guide_texts.csv"


def _train_losses(adapter_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (adapter_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --------------------------------------------------------------------------------------------
# The guide's example: GPT-2, full fine-tuning, sequence classification
# --------------------------------------------------------------------------------------------


def build_tiny_gpt2(path: Path, texts: list[str], seed: int = 0) -> Path:
    """A 2-layer GPT-2 (n_embd 32) with a word-level tokenizer over ``texts``' words. Like
    the real GPT-2 tokenizer, it has end-of-text but no padding token."""
    from tokenizers import pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel

    split = pre_tokenizers.Whitespace()
    words = {word for text in texts for word, _ in split.pre_tokenize_str(text)}
    tk, cls = _tokenizer(sorted(words))
    tokenizer = cls(tokenizer_object=tk, unk_token="<unk>", bos_token="</s>", eos_token="</s>")
    assert tokenizer.pad_token is None
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    assert config.pad_token_id is None
    return save_tiny_model(path, GPT2LMHeadModel, config, tokenizer, seed)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with open(GUIDE_DATA, encoding="utf-8", newline="") as fh:
        texts = [row["text"] for row in csv.DictReader(fh)]
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), texts)


def test_seed_recipe_says_what_the_guide_says() -> None:
    recipe = load_recipe(RECIPES / "seed-gpt2-classification.yaml")
    assert recipe.spec.base_model == "openai-community/gpt2"
    assert recipe.task.type == "sequence-classification"
    assert (recipe.task.text, recipe.task.label) == ("{text}", "label")
    assert recipe.loader.name == "table"
    assert recipe.loader.options.path == GUIDE_DATA and recipe.loader.options.test_size == 0.2
    assert recipe.method.name == "full" and recipe.method.options.train == "all"
    assert recipe.training.learning_rate == pytest.approx(5e-5)
    assert recipe.training.batch_size == 4
    assert [e.name for e in recipe.evaluators] == ["accuracy", "f1", "loss"]
    assert recipe.regularizers == []  # plain cross-entropy, no extra loss terms


def test_seed_recipe_runs_on_a_tiny_gpt2(tiny_gpt2: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_gpt2).pad_token is None  # as with the real GPT-2
    recipe = load_recipe(
        RECIPES / "seed-gpt2-classification.yaml",
        [f"base_model={tiny_gpt2}", "training.max_steps=40", "training.batch_size=16", "training.learning_rate=1e-3",
         f"output.dir={tmp_path / 'seed'}", "training.device=cpu"],
    )
    result = plugtune.run(recipe, show_progress=False)

    manifest = read_manifest(result.adapter_dir)
    assert (manifest.training["train_rows"], manifest.training["test_rows"]) == (160, 40)  # 80/20
    assert manifest.task["labels"] == ["0", "1"]
    assert manifest.method.name == "full"
    assert manifest.base_model.architecture == "GPT2ForSequenceClassification"
    assert result.steps == 40

    # The recipe's rate and batch (5e-5, 4) suit the real GPT-2 and barely move a random
    # 2-layer model in 40 steps, so the test raises both (4 epochs): the training loss must
    # then fall. 160 rows are too few for a model that knows no English to move the held-out
    # loss, so that is only reported.
    losses = _train_losses(result.adapter_dir)
    assert _mean(losses[-10:]) < _mean(losses[:10]) - 0.05
    assert {"accuracy", "f1", "loss"} <= set(result.after) and {"accuracy", "f1", "loss"} <= set(result.before)


# --------------------------------------------------------------------------------------------
# Two stages: continued pre-training, then a fine-tune on its adapter
# --------------------------------------------------------------------------------------------


def test_two_stage_recipes_are_a_pair() -> None:
    stage1 = load_recipe(RECIPES / "pretrain-domain-smollm2.yaml")
    stage2 = load_recipe(RECIPES / "finetune-on-pretrained-smollm2.yaml")
    assert stage1.loader.name == "text" and stage1.task.response is None and stage1.task.text == "{text}"
    assert [e.name for e in stage1.evaluators] == ["loss", "perplexity"]
    assert stage2.spec.base_model == str(stage1.output_dir) == "adapters/pretrain-domain-smollm2"
    # the same task and split as qa-smollm2-lora, so the two adapters compare the bases
    qa = load_recipe(RECIPES / "qa-smollm2-lora.yaml")
    assert stage2.task == qa.task and stage2.spec.data == qa.spec.data


def _domain_corpus(path: Path) -> Path:
    sentences = [
        "the film was great and the cast was wonderful .",
        "the plot is dull and the ending is weak .",
        "the story was very moving and really fun .",
        "the acting is quite bland and the movie is tedious .",
    ]
    paragraphs = [" ".join(sentences[(i + j) % 4] for j in range(2)) for i in range(40)]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def test_finetune_on_a_pretrained_adapter(make_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As with the shipped pair: stage 1 writes adapters/<name> under the current directory and
    # stage 2 names that relative folder as its base_model.
    monkeypatch.chdir(tmp_path)
    corpus = _domain_corpus(tmp_path / "corpus.txt")
    stage1 = make_recipe(
        name="tiny-pretrain",
        task={"type": "causal-lm", "text": "{text}"},
        data={"loader": "text", "options": {"path": str(corpus), "test_size": 0.2}},
        evaluators=["loss", "perplexity"],
        output={"dir": "adapters/tiny-pretrain"},
    )
    first = plugtune.run(stage1, show_progress=False)
    assert first.after["perplexity"] < first.before["perplexity"]

    stage2 = make_recipe(name="tiny-finetune", base_model="adapters/tiny-pretrain", output={"dir": "adapters/tiny-finetune"})
    second = plugtune.run(stage2, show_progress=False)
    assert second.after["loss"] < second.before["loss"]
    base = read_manifest(second.adapter_dir).base_model
    stage1_base = read_manifest(first.adapter_dir).base_model
    assert base.id == "adapters/tiny-pretrain"
    assert base.parent["adapter"] == "tiny-pretrain" and base.parent["method"] == "lora"
    assert base.parent["base"]["fingerprint"] == stage1_base.fingerprint
    assert base.fingerprint != stage1_base.fingerprint  # stage 1's LoRA is merged in


def build_tiny_llama_for(path: Path, texts: list[str], seed: int = 0) -> Path:
    """``plugtune.testing.build_tiny_llama`` with a word-level vocabulary over ``texts``."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    words = sorted({word for text in texts for word, _ in split.pre_tokenize_str(text)})
    return build_tiny_llama(path, seed=seed, words=words, max_positions=256)


def test_shipped_two_stage_pair_runs_on_a_tiny_llama(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two shipped recipe files themselves, only the base model swapped for a tiny Llama
    that knows the words of their data, and fewer steps. Stage 2 is run unchanged but for
    its steps and evaluators (loss only: no dependency on the generation evaluators)."""
    data = RECIPES / "data"
    texts = [data.joinpath("domain_corpus.txt").read_text(encoding="utf-8")]
    for line in data.joinpath("qa.jsonl").read_text(encoding="utf-8").splitlines():
        texts.extend(json.loads(line).values())
    texts.append("Answer with words copied from the context . Context : Question : Answer :")
    tiny = build_tiny_llama_for(tmp_path / "tiny-llama", texts)

    monkeypatch.chdir(tmp_path)  # the recipes' output folders and stage 2's base_model are relative to it
    # A random model with a 1,400-word vocabulary moves little at the recipes' rates in a few
    # steps; a higher rate makes the fall plain (perplexity 1461 -> 1324, QA loss 7.21 -> 7.11).
    fast = ["training.learning_rate=2.0e-2", "training.device=cpu"]
    stage1 = load_recipe(RECIPES / "pretrain-domain-smollm2.yaml", [f"base_model={tiny}", "training.max_steps=8", *fast])
    first = plugtune.run(stage1, show_progress=False)
    assert first.adapter_dir == Path("adapters/pretrain-domain-smollm2")
    assert first.after["perplexity"] < 0.95 * first.before["perplexity"]
    training = read_manifest(first.adapter_dir).training
    assert (training["train_rows"], training["test_rows"]) == (58, 6)  # 64 paragraphs (none over 480 characters), 10% held out

    stage2 = load_recipe(RECIPES / "finetune-on-pretrained-smollm2.yaml", ["training.max_steps=6", "evaluators=[loss]", *fast])
    second = plugtune.run(stage2, show_progress=False)
    manifest = read_manifest(second.adapter_dir)
    assert manifest.base_model.id == "adapters/pretrain-domain-smollm2"
    assert manifest.base_model.parent["adapter"] == "pretrain-domain-smollm2"
    assert manifest.base_model.parent["base"]["id"] == str(tiny)
    assert (manifest.training["train_rows"], manifest.training["test_rows"]) == (120, 30)
    assert second.after["loss"] < second.before["loss"] - 0.05
