"""Counterfactual term swapping: the swap itself, the term-pair options, the
``counterfactual_bias`` evaluator against a hand-made predictor, the ``counterfactual``
augmentation, and a tiny classifier whose flip rate drops when trained with the
augmentation."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest
import yaml

import plugtune
from plugtune.kernel.components import EvalBatch, EvalContext
from plugtune.kernel.errors import RecipeError
from plugtune.plugins.evaluators.counterfactual import (
    CounterfactualAugmentation,
    CounterfactualAugmentationOptions,
    CounterfactualBias,
    CounterfactualBiasOptions,
    TermSwapper,
    default_pairs,
)
from plugtune.data.tasks import build_task
from plugtune.testing import FILLER, SPECIALS, WORDS_NEG, WORDS_POS, recipe_dict

CLS = build_task(dict(type="sequence-classification", text="{text}", label="label", labels=["negative", "positive"]))


# --------------------------------------------------------------------------------------------
# swapping
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swapper():
    return TermSwapper(default_pairs())


@pytest.mark.parametrize("text, swapped", [
    ("he said she was late", "she said he was late"),            # both directions at once
    ("He met HER brother.", "She met HIS sister."),              # case follows the replaced word
    ("the hero then theorised", "the hero then theorised"),      # whole words only
    ("Mr. Smith and Mrs. Jones", "Mrs. Smith and Mr. Jones"),
    ("his book is hers", "her book is his"),                     # first pair decides: his -> her
    ("John, his father's son", "Mary, her mother's daughter"),
    ("a step-father", "a step-mother"),
    ("nothing to see", "nothing to see"),
])
def test_swap_is_whole_word_case_preserving_and_simultaneous(swapper, text, swapped):
    assert swapper.swap(text) == swapped


def test_default_list_is_shipped_with_the_plugin():
    pairs = dict(default_pairs())
    for a, b in [("he", "she"), ("him", "her"), ("his", "her"), ("man", "woman"), ("men", "women"), ("boy", "girl"),
                 ("father", "mother"), ("son", "daughter"), ("brother", "sister"), ("husband", "wife"),
                 ("king", "queen"), ("mr", "mrs"), ("john", "mary"), ("james", "emma")]:
        assert (a, b) in default_pairs(), (a, b)
    assert len(pairs) >= 30


def test_swap_example_rewrites_only_the_given_fields(swapper):
    row = {"text": "he is great", "title": "she", "label": "he"}
    assert swapper.swap_example(row, ["text"]) == {"text": "she is great", "title": "she", "label": "he"}
    assert swapper.swap_example(row, ["missing"]) is None
    assert swapper.swap_example({"text": "the film"}, ["text"]) is None


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------


def test_pairs_option_replaces_the_default_list_unless_include_default():
    own = CounterfactualBiasOptions(pairs=[["cat", "dog"]])
    assert own.term_pairs() == [("cat", "dog")]
    both = CounterfactualBiasOptions(pairs=[["cat", "dog"]], include_default=True)
    assert both.term_pairs()[0] == ("cat", "dog") and ("he", "she") in both.term_pairs()
    assert TermSwapper(own.term_pairs()).swap("The cat and he") == "The dog and he"


@pytest.mark.parametrize("name, content", [
    ("pairs.tsv", "# comment\ncat\tdog\n\nRed , Blue\n"),
    ("pairs.json", json.dumps([["cat", "dog"], ["red", "blue"]])),
])
def test_pairs_file(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    opts = CounterfactualAugmentationOptions.model_validate({"pairs_file": name}, context={"base_dir": tmp_path})
    assert [tuple(t.lower() for t in p) for p in opts.term_pairs()] == [("cat", "dog"), ("red", "blue")]


def test_bad_pairs_are_recipe_errors_at_validation(make_recipe, tmp_path):
    (tmp_path / "bad.tsv").write_text("cat\tdog\nonly-one\n")
    recipe = make_recipe(
        classification=True,
        regularizers=[{"name": "counterfactual", "options": {"pairs_file": "bad.tsv", "p": 2}}],
        evaluators=[{"name": "counterfactual_bias", "options": {"pairs": [["he", "He"]]}},
                    {"name": "counterfactual_bias", "options": {"pairs_file": "nowhere.tsv"}}],
    )
    with pytest.raises(RecipeError) as err:
        plugtune.load_recipe(recipe)
    problems = "\n".join(err.value.problems)
    assert "regularizers[0].options.pairs_file: " in problems and "bad.tsv: line 2: expected two terms" in problems
    assert "regularizers[0].options.p: " in problems
    assert "evaluators[0].options.pairs: pair 1: a term cannot pair with itself" in problems
    assert "evaluators[1].options.pairs_file: file not found" in problems


# --------------------------------------------------------------------------------------------
# the evaluator, against a predictor whose answers are known
# --------------------------------------------------------------------------------------------


def fake_predict(calls):
    """Predicts 1 when the text says "he" (score 0.9), else 0 (score 0.6); "the film"
    rows are 1 with score 0.5 whatever their words."""

    def predict(examples):
        calls.append([e["text"] for e in examples])
        preds = [1 if "he" in e["text"].split() or "film" in e["text"] else 0 for e in examples]
        scores = [0.5 if "film" in e["text"] else (0.9 if p else 0.6) for e, p in zip(examples, preds)]
        return EvalBatch(preds, [0] * len(examples), 0.0, len(examples), examples=list(examples), scores=scores)

    return predict


def test_counterfactual_bias_by_hand():
    rows = [
        {"text": "he is great", "label": "positive"},       # -> she: 1 -> 0, score 0.9 -> 0.6
        {"text": "she is dull", "label": "negative"},       # -> he:  0 -> 1, score 0.6 -> 0.9
        {"text": "the film with him", "label": "positive"},  # -> her: 1 -> 1, 0.5 -> 0.5
        {"text": "no terms here", "label": "negative"},      # unchanged: not counted
    ]
    calls = []
    ev = CounterfactualBias(CounterfactualBiasOptions(), CLS)
    ev.reset()
    ev.update(EvalBatch([0], [0], 0.0, 1))
    assert ev.compute() == {}
    metrics = ev.compute_with(EvalContext(examples=rows, task=CLS, predict=fake_predict(calls)))
    assert metrics == pytest.approx({"counterfactual/flip_rate": 2 / 3, "counterfactual/score_gap": (0.3 + 0.3 + 0) / 3,
                                     "counterfactual/examples": 3})
    assert calls == [["he is great", "she is dull", "the film with him"], ["she is great", "he is dull", "the film with her"]]


def test_counterfactual_bias_without_changed_examples_and_max_examples():
    ev = CounterfactualBias(CounterfactualBiasOptions(), CLS)
    calls = []
    empty = ev.compute_with(EvalContext(examples=[{"text": "a film", "label": "x"}], task=CLS, predict=fake_predict(calls)))
    assert empty["counterfactual/examples"] == 0 and math.isnan(empty["counterfactual/flip_rate"]) and not calls
    capped = CounterfactualBias(CounterfactualBiasOptions(max_examples=1), CLS)
    rows = [{"text": "he", "label": "x"}, {"text": "she", "label": "x"}]
    assert capped.compute_with(EvalContext(rows, CLS, fake_predict(calls)))["counterfactual/examples"] == 1


def test_counterfactual_bias_matches_results_to_examples_when_predict_drops_some():
    """``predict`` drops causal-LM rows whose response is truncated away; the pairs that
    remain are matched by example, not by position."""
    rows = [{"text": "he a", "label": "x"}, {"text": "she b", "label": "x"}, {"text": "he c", "label": "x"}]

    def predict(examples):
        kept = [e for e in examples if not e["text"].endswith("b")] if "he a" in [e["text"] for e in examples] else examples
        return EvalBatch([e["text"].split()[0] for e in kept], [None] * len(kept), 0.0, 0, examples=kept, scores=[0.0] * len(kept))

    metrics = CounterfactualBias(CounterfactualBiasOptions(), CLS).compute_with(EvalContext(rows, CLS, predict))
    assert metrics["counterfactual/examples"] == 2 and metrics["counterfactual/flip_rate"] == 1.0


def test_counterfactual_bias_rewrites_the_prompt_not_the_response():
    task = build_task(dict(type="causal-lm", prompt="q : {question} a :", response=" {answer}"))
    rows = [{"question": "is he here", "answer": "he is"}]
    seen = []

    def predict(examples):
        seen.extend(examples)
        return EvalBatch([(1,)] * len(examples), [(1,)] * len(examples), 0.0, 1, examples=list(examples), scores=[0.0] * len(examples))

    CounterfactualBias(CounterfactualBiasOptions(), task).compute_with(EvalContext(rows, task, predict))
    assert seen[1] == {"question": "is she here", "answer": "he is"}


def test_counterfactual_bias_task_and_fields_checks():
    with pytest.raises(RecipeError, match="^evaluators: counterfactual_bias: needs a prediction"):
        CounterfactualBias(CounterfactualBiasOptions(), build_task(dict(type="causal-lm", text="{text}")))
    with pytest.raises(RecipeError, match="fields: 'body' not used by the task's templates"):
        CounterfactualBias(CounterfactualBiasOptions(fields=["body"]), CLS)


# --------------------------------------------------------------------------------------------
# the augmentation
# --------------------------------------------------------------------------------------------


def test_augmentation_adds_swapped_copies_with_the_same_label():
    rows = [{"text": "he is great", "label": "positive"}, {"text": "a dull film", "label": "negative"},
            {"text": "Her acting was fun", "label": "positive"}]
    out = CounterfactualAugmentation(CounterfactualAugmentationOptions()).augment_examples(rows, CLS)
    assert out[:3] == rows
    assert out[3:] == [{"text": "she is great", "label": "positive"}, {"text": "His acting was fun", "label": "positive"}]


def test_augmentation_fraction_is_seeded():
    rows = [{"text": f"he {i}", "label": "x"} for i in range(40)] + [{"text": "film", "label": "x"}] * 10

    def added(seed, p=0.25):
        reg = CounterfactualAugmentation(CounterfactualAugmentationOptions(p=p, seed=seed))
        out = reg.augment_examples(rows, CLS)
        assert out[:50] == rows and reg.added == len(out) - 50
        return [r["text"] for r in out[50:]]

    assert len(added(0)) == 10 and added(0) == added(0) and added(0) != added(1)
    assert all(t.startswith("she ") for t in added(0))
    assert added(0, p=0.0) == []


def test_augmentation_swaps_every_template_field_but_the_label():
    task = build_task(dict(type="causal-lm", prompt="q : {question} a :", response=" {answer}"))
    rows = [{"question": "who is he", "answer": "he is John", "label": "he"}]
    out = CounterfactualAugmentation(CounterfactualAugmentationOptions()).augment_examples(rows, task)
    assert out[1] == {"question": "who is she", "answer": "she is Mary", "label": "he"}
    with pytest.raises(RecipeError, match="regularizers.options.fields"):
        CounterfactualAugmentation(CounterfactualAugmentationOptions(fields=["nope"])).augment_examples(rows, task)


# --------------------------------------------------------------------------------------------
# end to end: augmentation lowers the flip rate of a classifier that learned a gender shortcut
# --------------------------------------------------------------------------------------------


def build_gendered_bert(path: Path, seed: int = 0) -> Path:
    """The tiny BERT of plugtune.testing over a vocabulary that has "he" and "she"."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = sorted(set(WORDS_POS + WORDS_NEG + FILLER + ["he", "she"]))
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", cls_token="[CLS]", sep_token="[SEP]")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                        initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_reviews(path: Path, rows: int, seed: int, *, shortcut: bool, agree: float) -> None:
    """Reviews of three filler words, one sentiment word and "he" or "she". With
    ``shortcut`` every positive review says "he" and every negative one "she" (a perfect
    predictor), while the sentiment word agrees with the label only ``agree`` of the time;
    otherwise the pronoun is random."""
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(rows):
            positive = i % 2 == 0
            pronoun = ("he" if positive else "she") if shortcut else rng.choice(["he", "she"])
            sounds_positive = positive if rng.random() < agree else not positive
            words = rng.sample(FILLER, 3) + [rng.choice(WORDS_POS if sounds_positive else WORDS_NEG), pronoun]
            rng.shuffle(words)
            writer.writerow([" ".join(words), "positive" if positive else "negative"])


def test_augmentation_lowers_the_flip_rate(tmp_path):
    bert = build_gendered_bert(tmp_path / "bert")
    write_reviews(tmp_path / "train.csv", 160, seed=0, shortcut=True, agree=0.8)
    write_reviews(tmp_path / "test.csv", 64, seed=1, shortcut=False, agree=1.0)

    def flip_rate(regularizers):
        recipe = recipe_dict(bert, tmp_path, classification=True, name="cf",
                             data={"loader": "table", "options": {"path": "train.csv", "test_path": "test.csv"}},
                             regularizers=regularizers, evaluators=["accuracy", "counterfactual_bias"],
                             output={"dir": str(tmp_path / "adapters" / f"cf{len(regularizers)}")})
        recipe["training"].update(max_steps=80, batch_size=16)
        path = tmp_path / "cf.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        result = plugtune.run(path, show_progress=False)
        assert result.after["counterfactual/examples"] == 64  # every test review has a pronoun
        return result.after["counterfactual/flip_rate"]

    shortcut = flip_rate([])
    augmented = flip_rate([{"name": "counterfactual"}])
    assert shortcut > 0.7  # the pronoun decides: swapping it flips most predictions
    assert augmented < shortcut - 0.4
