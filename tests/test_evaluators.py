"""The evaluators: classification metrics (macro precision/recall/F1, per-class, confusion
matrix) and generation metrics (exact_match, rouge, bleu), each against values computed by
hand; and one run of a tiny causal LM evaluated by generation."""

from __future__ import annotations

import json
import math

import pytest

import plugtune
from plugtune.kernel.components import EvalBatch
from plugtune.kernel.errors import RecipeError
from plugtune.plugins.evaluators.classification import (
    Accuracy,
    ConfusionMatrix,
    ConfusionOptions,
    MacroF1,
    MacroPrecision,
    MacroRecall,
    PerClassOptions,
)
from plugtune.plugins.evaluators.text import Bleu, BleuOptions, ExactMatch, ExactMatchOptions, Rouge, RougeOptions, normalize_answer
from plugtune.data.tasks import build_task

CLS = build_task(dict(type="sequence-classification", text="{text}", labels=["negative", "positive"]))
LM = build_task(dict(type="causal-lm", prompt="question : {question} answer :", response=" {answer}"))


def batch(predictions, references, **extra):
    return EvalBatch(list(predictions), list(references), 0.0, len(references), **extra)


def run(evaluator, *batches):
    evaluator.reset()
    for b in batches:
        evaluator.update(b)
    return evaluator.compute()


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------

# predictions [0, 1, 1, 0] vs references [0, 1, 0, 0]:
#   class 0: TP 2, FP 0, FN 1 -> P 1,   R 2/3, F1 0.8
#   class 1: TP 1, FP 1, FN 0 -> P 1/2, R 1,   F1 2/3
HAND = [batch([0, 1], [0, 1]), batch([1, 0], [0, 0])]  # two batches: the counts accumulate


def test_macro_precision_recall_f1_by_hand():
    assert run(MacroPrecision(PerClassOptions(), CLS), *HAND) == {"precision": pytest.approx((1 + 0.5) / 2)}
    assert run(MacroRecall(PerClassOptions(), CLS), *HAND) == {"recall": pytest.approx((2 / 3 + 1) / 2)}
    assert run(MacroF1(PerClassOptions(), CLS), *HAND) == {"f1": pytest.approx((0.8 + 2 / 3) / 2)}
    assert run(Accuracy(None, CLS), *HAND) == {"accuracy": 0.75}


def test_reset_forgets_the_previous_split():
    f1 = MacroF1(PerClassOptions(), CLS)
    run(f1, batch([1, 1, 1], [0, 0, 0]))
    assert run(f1, batch([0, 1], [0, 1])) == {"f1": 1.0}


def test_per_class_uses_the_task_labels():
    opts = PerClassOptions(per_class=True)
    assert run(MacroF1(opts, CLS), *HAND) == pytest.approx({"f1": 11 / 15, "f1/negative": 0.8, "f1/positive": 2 / 3})
    assert run(MacroPrecision(opts, CLS), *HAND) == pytest.approx(
        {"precision": 0.75, "precision/negative": 1.0, "precision/positive": 0.5})
    assert run(MacroRecall(opts, CLS), *HAND) == pytest.approx(
        {"recall": 5 / 6, "recall/negative": 2 / 3, "recall/positive": 1.0})


def test_per_class_label_absent_from_the_split_is_nan_and_not_averaged():
    task = build_task(dict(type="sequence-classification", text="{text}", labels=["a", "b", "c"]))
    metrics = run(MacroF1(PerClassOptions(per_class=True), task), batch([0, 1, 1], [0, 1, 0]))
    # a: TP 1, FP 0, FN 1 -> 2/3; b: TP 1, FP 1 -> 2/3; c never seen
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["f1/a"] == pytest.approx(2 / 3) and metrics["f1/b"] == pytest.approx(2 / 3)
    assert math.isnan(metrics["f1/c"])


def test_confusion_matrix_counts_and_normalized_rows():
    assert run(ConfusionMatrix(ConfusionOptions(), CLS), *HAND) == {
        "confusion/negative/negative": 2, "confusion/negative/positive": 1,
        "confusion/positive/negative": 0, "confusion/positive/positive": 1,
    }
    rows = run(ConfusionMatrix(ConfusionOptions(normalize=True), CLS), *HAND)
    assert rows == pytest.approx({
        "confusion/negative/negative": 2 / 3, "confusion/negative/positive": 1 / 3,
        "confusion/positive/negative": 0.0, "confusion/positive/positive": 1.0,
    })


def test_causal_lm_classes_are_named_by_their_label_words():
    task = build_task(dict(type="causal-lm", prompt="review : {text} label :", response=" {label}", label="label",
                label_words={"0": "negative", "1": "positive"}))
    neg, pos, junk = (11,), (12,), (13, 14)  # token ids of the responses
    examples = [{"text": "x", "label": 0}, {"text": "y", "label": 1}, {"text": "z", "label": 1}, {"text": "w", "label": 0}]
    b = batch([neg, pos, junk, pos], [neg, pos, pos, neg], examples=examples)
    f1 = run(MacroF1(PerClassOptions(per_class=True), task), b)
    # negative: TP 1, FN 1 -> 2/3; positive: TP 1, FP 1, FN 1 -> 1/2; the junk prediction is a
    # class of its own in the macro average (F1 0), but gets no per-class key
    assert f1 == pytest.approx({"f1": (2 / 3 + 1 / 2 + 0) / 3, "f1/negative": 2 / 3, "f1/positive": 1 / 2})
    confusion = run(ConfusionMatrix(ConfusionOptions(), task), b)
    assert confusion == {
        "confusion/negative/negative": 1, "confusion/negative/positive": 1, "confusion/negative/<other>": 0,
        "confusion/positive/negative": 0, "confusion/positive/positive": 1, "confusion/positive/<other>": 1,
    }


def test_empty_split_is_nan():
    for ev in (MacroPrecision(None, CLS), MacroRecall(None, CLS), MacroF1(None, CLS)):
        (value,) = run(ev).values()
        assert math.isnan(value)
    assert run(ConfusionMatrix(None, CLS)) == {f"confusion/{t}/{p}": 0 for t in ("negative", "positive") for p in ("negative", "positive")}


# --------------------------------------------------------------------------------------------
# generation metrics
# --------------------------------------------------------------------------------------------


def texts(generated, references):
    return batch([None] * len(references), [None] * len(references), generated=list(generated), reference_texts=list(references))


@pytest.mark.parametrize("a, b, same", [
    ("The Blue.", "blue", True),
    ("a cat", "cat", True),
    ("  Paris,   France ", "paris france", True),
    ("An apple!", "the apple", True),
    ("blue green", "blue", False),
])
def test_normalize_answer(a, b, same):
    assert (normalize_answer(a) == normalize_answer(b)) is same


def test_normalize_answer_drops_articles_only_as_whole_words():
    assert normalize_answer("Then THE theme, an anthem: a banana.") == "then theme anthem banana"


def test_exact_match():
    ev = ExactMatch(ExactMatchOptions(), LM)
    assert run(ev, texts(["The Blue.", "green"], ["blue", "yellow"]), texts(["A sea"], ["sea"])) == {"exact_match": 2 / 3}
    raw = ExactMatch(ExactMatchOptions(normalize=False), LM)
    assert run(raw, texts(["The Blue.", " sea "], ["blue", "sea"])) == {"exact_match": 0.5}


def test_exact_match_on_a_pattern_compares_only_the_field():
    ev = ExactMatch(ExactMatchOptions(pattern=r"ORD-\d+ to (\w+)"), LM)
    generated = ["Sorry. I have routed order ORD-11111 to Shipping.",   # group 1 equal: a hit, the number differs
                 "Thanks. I have routed order ORD-22222 to Billing.",   # another department: a miss
                 "I cannot help with that.",                            # no field generated: a miss
                 "routed ORD-44444 to returns, ORD-1 to Billing",       # the first match counts; normalised case
                 "anything"]                                            # the reference has no field: left out
    references = ["I have routed order ORD-99999 to Shipping.", "I have routed order ORD-22222 to Returns.",
                  "I have routed order ORD-33333 to Technical.", "I have routed order ORD-44444 to Returns.",
                  "no order here"]
    assert run(ev, texts(generated, references)) == {"exact_match": 2 / 4}
    # without a group the whole match is the field: the order number must agree as well
    whole = ExactMatch(ExactMatchOptions(pattern=r"ORD-\d+ to \w+"), LM)
    assert run(whole, texts(generated, references)) == {"exact_match": 1 / 4}
    # normalize: false compares the field as found (only surrounding whitespace stripped)
    raw = ExactMatch(ExactMatchOptions(pattern=r"to (\w+)", normalize=False), LM)
    assert run(raw, texts(["to returns", "to Returns"], ["to Returns", "to Returns"])) == {"exact_match": 0.5}
    # no reference carries the field: nothing to score
    assert math.isnan(run(ev, texts(["x"], ["y"]))["exact_match"])


def test_exact_match_pattern_is_compiled_at_validation(make_recipe):
    recipe = make_recipe(evaluators=["loss", {"name": "exact_match", "options": {"pattern": "ORD-(\\d+"}}])
    with pytest.raises(RecipeError) as err:
        plugtune.load_recipe(recipe)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{recipe}: evaluators[1].options.pattern: ")
    assert "not a valid regular expression (missing ), unterminated subpattern at position 4)" in lines[0]
    ok = plugtune.load_recipe(make_recipe(evaluators=[{"name": "exact_match", "options": {"pattern": "to (\\w+)"}}]))
    assert ok.evaluators[0].options.pattern == "to (\\w+)"


def test_rouge_by_hand():
    ev = Rouge(RougeOptions(), LM)
    # "the cat sat" vs "the cat sat down": unigrams P 3/3, R 3/4; bigrams P 2/2, R 2/3; LCS 3
    metrics = run(ev, texts(["the cat sat"], ["the cat sat down"]))
    assert metrics == pytest.approx({"rouge1": 2 * 1 * 0.75 / 1.75, "rouge2": 2 * 1 * (2 / 3) / (5 / 3), "rougeL": 2 * 1 * 0.75 / 1.75})
    # averaged over examples: an exact match scores 1
    two = run(ev, texts(["the cat sat", "a dog"], ["the cat sat down", "a dog"]))
    assert two["rouge1"] == pytest.approx((6 / 7 + 1) / 2)


def test_rouge_stemming_and_tokenizer_options():
    pair = texts(["cats running"], ["cat runs"])
    assert run(Rouge(RougeOptions(stemmer=True), LM), pair)["rouge1"] == pytest.approx(1.0)
    assert run(Rouge(RougeOptions(stemmer=False), LM), pair)["rouge1"] == 0.0
    cyrillic = texts(["кошка сидит"], ["кошка сидит тихо"])
    assert run(Rouge(RougeOptions(), LM), cyrillic)["rouge1"] == 0.0  # rouge_score's default drops non-ASCII
    assert run(Rouge(RougeOptions(tokenizer="unicode"), LM), cyrillic)["rouge1"] == pytest.approx(0.8)


def test_corpus_bleu_by_hand():
    ev = Bleu(BleuOptions(), LM)
    # pooled over both sentences: 1-gram 7/8, 2-gram 4/6, 3-gram 2/4, 4-gram 1/3;
    # hypothesis length 8, reference length 9 -> brevity penalty exp(1 - 9/8)
    metrics = run(ev, texts(["the cat sat on the mat"], ["the cat sat on a mat"]), texts(["a dog"], ["a dog barked"]))
    expected = 100 * math.exp(1 - 9 / 8) * (7 / 8 * 4 / 6 * 2 / 4 * 1 / 3) ** 0.25
    assert metrics["bleu"] == pytest.approx(expected, abs=1e-6)
    assert run(ev, texts(["the cat sat on the mat"], ["the cat sat on the mat"]))["bleu"] == pytest.approx(100.0)


@pytest.mark.parametrize("cls", [ExactMatch, Rouge, Bleu])
def test_generation_metrics_refuse_tasks_without_generation(cls):
    with pytest.raises(RecipeError, match=r"^evaluators: \w+: needs generated text.*sequence-classification"):
        cls(cls.Options(), CLS)
    raw_text = build_task(dict(type="causal-lm", text="{text}"))
    with pytest.raises(RecipeError, match="prompt and response"):
        cls(cls.Options(), raw_text)
    assert cls.check_task(LM) is None and cls.check_task(CLS)


def test_new_evaluators_are_registered(plugin_system):
    for name in ("precision", "recall", "confusion_matrix", "exact_match", "rouge", "bleu", "counterfactual_bias"):
        assert plugin_system.find("evaluator", name) is not None, name
    assert plugin_system.find("regularizer", "counterfactual") is not None


def test_evaluator_options_are_validated_with_the_recipe(make_recipe):
    recipe = make_recipe(evaluators=[{"name": "rouge", "options": {"stemer": True}}, {"name": "bleu", "options": {"tokenize": "moses"}}])
    with pytest.raises(RecipeError) as err:
        plugtune.load_recipe(recipe)
    text = str(err.value)
    assert "evaluators[0].options.stemer: unknown key" in text
    assert "evaluators[1].options.tokenize" in text


def test_generation_metrics_end_to_end(make_recipe):
    """A tiny causal LM trained briefly and scored by generation: the metrics are in the
    result and the manifest, and greedy generation agrees with teacher-forced accuracy."""
    recipe = make_recipe(
        evaluators=["accuracy", "exact_match", "rouge", "bleu", {"name": "f1", "options": {"per_class": True}}, "confusion_matrix"],
        training={"max_steps": 8, "batch_size": 8, "learning_rate": 2e-2, "seed": 0, "max_length": 48,
                  "device": "cpu", "max_new_tokens": 4},
    )
    result = plugtune.run(recipe, show_progress=False)
    for metrics in (result.before, result.after):
        assert {"exact_match", "rouge1", "rouge2", "rougeL", "bleu"} <= set(metrics)
        assert 0.0 <= metrics["exact_match"] <= 1.0 and 0.0 <= metrics["rouge1"] <= 1.0
        assert 0.0 <= metrics["bleu"] <= 100.0
        # a response that is right token for token under teacher forcing is generated verbatim
        assert metrics["exact_match"] >= metrics["accuracy"] - 1e-9
    assert result.after["accuracy"] > 0  # it learned something, so the agreement above is not vacuous
    assert {"f1/blue", "f1/green", "f1/yellow"} <= set(result.after)
    assert "confusion/blue/blue" in result.after
    manifest = json.loads((result.adapter_dir / "plugtune.json").read_text())
    assert manifest["metrics"]["after"]["rougeL"] == pytest.approx(result.after["rougeL"])
    assert manifest["metrics"]["after"]["exact_match"] == pytest.approx(result.after["exact_match"])
