"""The regularizers of ``plugins/regularizers/training.py`` and ``augmentation.py``: each
test shows the regularizer's *effect* (a smaller LoRA delta, lower confidence, clipped
gradients, noise only in training mode, the best weights kept, training batches changed at
the rate asked for and evaluation batches never), on the tiny models, in a few steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import plugtune
from plugtune import hookimpl
from plugtune.artifacts.adapters import WEIGHTS_FILE
from plugtune.kernel.components import NoOptions
from plugtune.kernel.errors import TrainingError
from plugtune.plugins.regularizers.augmentation import SpanMask, SpanMaskOptions, WordDropout, WordDropoutOptions
from plugtune.plugins.regularizers.training import (
    EarlyStopping, EarlyStoppingOptions, L2SP, L2SPOptions, LabelSmoothing, LabelSmoothingOptions, NEFTune, NEFTuneOptions,
)
from plugtune.kernel.registry import build_plugin_system, set_plugin_system
from plugtune.data.tasks import build_task, collate
from plugtune.training.train import RunResult


def _records(adapter_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(adapter_dir) / "metrics.jsonl").read_text().splitlines()]


def _train(adapter_dir: Path) -> list[dict]:
    return [r for r in _records(adapter_dir) if r["event"] == "train"]


def _run(recipe: Path, *plugins: tuple[str, object]) -> RunResult:
    """Train with extra in-process plugins (probes) installed for the run."""
    set_plugin_system(build_plugin_system(extra_plugins=list(plugins)))
    try:
        return plugtune.run(recipe, show_progress=False, overwrite=True)
    finally:
        set_plugin_system(None)


class ModelProbe:
    """Keeps the prepared model the run trains, and optionally records every forward pass's
    inputs together with the model's mode (training or evaluation)."""

    def __init__(self, record_inputs: bool = False) -> None:
        self.model = None
        self.tokenizer = None
        self.forwards: list[tuple[bool, torch.Tensor]] = []
        self.record_inputs = record_inputs

    @hookimpl
    def on_train_start(self, run):
        self.model, self.tokenizer = run.model, run.tokenizer
        if self.record_inputs:
            def pre_hook(module, args, kwargs):
                self.forwards.append((module.training, kwargs["input_ids"].detach().cpu().clone()))
            run.model.register_forward_pre_hook(pre_hook, with_kwargs=True)


def _lora_delta_norm(adapter_dir: Path) -> float:
    """Frobenius norm of the LoRA update B @ A summed over the adapted modules."""
    state = load_file(str(Path(adapter_dir) / WEIGHTS_FILE))
    total = 0.0
    for key, a in state.items():
        if "lora_A" in key:
            b = state[key.replace("lora_A", "lora_B")]
            total += float((b.float() @ a.float()).norm()) ** 2
    return math.sqrt(total)


# -- dropout -------------------------------------------------------------------------------


def test_dropout_sets_attention_hidden_and_lora_probabilities(make_recipe):
    probe = ModelProbe()
    recipe = make_recipe(classification=True, regularizers=[
        {"name": "dropout", "options": {"attention": 0.25, "hidden": 0.35, "adapter": 0.15}}])
    result = _run(recipe, ("probe", probe))
    modules = dict(probe.model.named_modules())
    attention = [m for n, m in modules.items() if n.endswith("attention.self.dropout")]
    hidden = [m for n, m in modules.items() if isinstance(m, torch.nn.Dropout) and "lora_dropout" not in n
              and not n.endswith("attention.self.dropout")]
    lora = [m for n, m in modules.items() if n.endswith("lora_dropout.default")]
    assert len(attention) == 2 and all(m.p == 0.25 for m in attention)  # tiny BERT has 0.0 in its config
    # embeddings, attention output and layer output of both layers, and the classifier head
    assert len(hidden) == 6 and all(m.p == 0.35 for m in hidden)
    assert lora and all(isinstance(m, torch.nn.Dropout) and m.p == 0.15 for m in lora)  # replaced peft's Identity
    last = _train(result.adapter_dir)[-1]
    assert (last["dropout/attention"], last["dropout/hidden"], last["dropout/adapter"]) == (0.25, 0.35, 0.15)
    assert (last["dropout/attention_modules"], last["dropout/hidden_modules"]) == (2, 6)

    # The effect: the trained model is now stochastic in training mode and exact in eval mode.
    ids = torch.tensor([[4, 10, 11, 12, 13, 5]])
    model = probe.model.train()
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_dropout_on_llama_sets_the_functional_attention_dropout(make_recipe):
    probe = ModelProbe()
    recipe = make_recipe(regularizers=[{"name": "dropout", "options": {"attention": 0.3, "hidden": 0.2}}])
    result = _run(recipe, ("probe", probe))
    model = probe.model
    assert model.config.attention_dropout == 0.3
    attn = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    assert len(attn) == 2 and all(m.attention_dropout == 0.3 for m in attn)
    last = _train(result.adapter_dir)[-1]
    assert last["dropout/attention_modules"] == 2
    assert last["dropout/hidden_modules"] == 0  # Llama has no hidden-state dropout: reported, not faked
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15]])
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


# -- label smoothing ---------------------------------------------------------------------


class _Outputs:
    def __init__(self, logits, loss):
        self.logits, self.loss = logits, loss


@pytest.mark.parametrize("kind", ["classification", "causal-lm"])
def test_label_smoothing_total_equals_smoothed_cross_entropy(kind):
    torch.manual_seed(0)
    eps = 0.2
    reg = LabelSmoothing(LabelSmoothingOptions(epsilon=eps))
    if kind == "classification":
        logits, labels = torch.randn(6, 3), torch.tensor([0, 2, 1, 1, 0, 2])
        ce = torch.nn.functional.cross_entropy(logits, labels)
        expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=eps)
    else:
        logits = torch.randn(2, 7, 11)
        labels = torch.randint(0, 11, (2, 7))
        labels[:, :3] = -100  # the prompt
        labels[1, 6] = -100  # padding
        flat, targets = logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1)
        ce = torch.nn.functional.cross_entropy(flat, targets, ignore_index=-100)
        expected = torch.nn.functional.cross_entropy(flat, targets, ignore_index=-100, label_smoothing=eps)
    term = reg.loss_term(None, {"labels": labels}, _Outputs(logits, ce), 0)
    assert torch.allclose(ce + term, expected, atol=1e-6)


class MeanConfidence:
    """Test evaluator: mean probability of the predicted class."""

    Options = NoOptions

    def __init__(self, options, task):
        self.reset()

    def reset(self):
        self.scores = []

    def update(self, batch):
        self.scores += batch.scores

    def compute(self):
        return {"confidence": sum(self.scores) / len(self.scores)}


class ConfidencePlugin:
    @hookimpl
    def register_evaluators(self, register):
        register("confidence", MeanConfidence)


def test_label_smoothing_lowers_the_trained_models_confidence(make_recipe):
    def confidence(epsilon):
        recipe = make_recipe(classification=True, evaluators=["accuracy", "confidence"],
                             regularizers=[{"name": "label_smoothing", "options": {"epsilon": epsilon}}],
                             training={"max_steps": 96, "batch_size": 8, "learning_rate": 2e-2, "device": "cpu",
                                       "eval_before": False})
        result = _run(recipe, ("confidence", ConfidencePlugin()))
        return result.after, _train(result.adapter_dir)

    plain, _ = confidence(0.0)
    smoothed, log = confidence(0.4)
    assert plain["confidence"] > 0.75  # without smoothing the tiny classifier becomes confident
    assert smoothed["confidence"] < plain["confidence"] - 0.1
    assert smoothed["accuracy"] >= plain["accuracy"] - 0.1  # and still classifies
    assert all(r["label_smoothing/loss"] > 0 for r in log[48:])  # uniform CE > CE once it learns


# -- gradient clipping -------------------------------------------------------------------


class GradProbe:
    """Test regularizer listed after grad_clip: the gradient norm the optimizer then sees."""

    Options = NoOptions

    def __init__(self, options):
        pass

    def after_backward(self, model, step):
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        return {"norm": float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))}


class GradProbePlugin:
    @hookimpl
    def register_regularizers(self, register):
        register("grad_probe", GradProbe)


def test_grad_clip_bounds_the_gradient_norm_and_logs_the_norm_before(make_recipe):
    max_norm = 0.05
    recipe = make_recipe(regularizers=[{"name": "grad_clip", "options": {"max_norm": max_norm}}, "grad_probe"])
    result = _run(recipe, ("grad_probe", GradProbePlugin()))
    log = _train(result.adapter_dir)
    assert len(log) == 8
    assert all(r["grad_clip/grad_norm"] > max_norm for r in log)  # it had something to clip
    assert all(r["grad_clip/clipped"] == 1 for r in log)
    assert all(r["grad_probe/norm"] <= max_norm * (1 + 1e-4) for r in log)  # and clipped it
    assert all(r["grad_probe/norm"] > 0.5 * max_norm for r in log)  # to max_norm, not to zero


# -- L2-SP -------------------------------------------------------------------------------


def test_l2sp_anchors_lora_b_at_zero_and_the_rest_at_init(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    with torch.no_grad():  # as if B had been initialised non-zero: L2-SP still anchors it at zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    reg = L2SP(L2SPOptions(strength=2.0))
    reg.setup(model, None, None)
    by_name = {n: p for n, p in model.named_parameters()}
    anchors = {id(p): a for p, a in reg.anchored}
    assert all(anchors[id(p)] is None for n, p in by_name.items() if "lora_B" in n)
    assert all(torch.equal(anchors[id(p)], p) for n, p in by_name.items() if "lora_A" in n)
    b_squared = sum(float(p.pow(2).sum()) for n, p in by_name.items() if "lora_B" in n)
    assert float(reg.loss_term(model, None, None, 0)) == pytest.approx(0.5 * 2.0 * b_squared, rel=1e-5)


def test_l2sp_keeps_the_lora_delta_smaller(make_recipe):
    def delta(strength):
        recipe = make_recipe(regularizers=[{"name": "l2sp", "options": {"strength": strength}}])
        result = _run(recipe)
        return _lora_delta_norm(result.adapter_dir), _train(result.adapter_dir)[-1]["l2sp/distance"]

    free_delta, free_distance = delta(0.0)
    held_delta, held_distance = delta(20.0)
    assert free_delta > 0
    assert held_delta < 0.7 * free_delta
    assert held_distance < free_distance


# -- NEFTune -----------------------------------------------------------------------------


def test_neftune_adds_bounded_noise_in_training_mode_only(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=4, target_modules=["q_proj"]))
    embeddings = model.get_input_embeddings()
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16]])  # L = 8, d = 32
    clean = embeddings(ids).detach()
    reg = NEFTune(NEFTuneOptions(alpha=5.0))
    reg.setup(model, None, None)  # on the peft wrapper
    model.train()
    noisy = embeddings(ids).detach()
    bound = 5.0 / math.sqrt(8 * 32)
    assert not torch.equal(noisy, clean)
    assert (noisy - clean).abs().max() <= bound + 1e-6
    assert (noisy - clean).abs().max() > 0.5 * bound  # uniform over the whole range
    assert reg.report(model) == {"noise_scale": pytest.approx(bound)}
    # and the model's logits differ in training mode only
    model.eval()
    assert torch.equal(embeddings(ids), clean)
    first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second)
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, first)


# -- early stopping ----------------------------------------------------------------------


def test_early_stopping_keeps_the_best_weights_and_stops(make_recipe, tiny_data, tmp_path):
    # 32 training rows at a high, constant learning rate: the test loss falls, then rises as
    # the adapter memorises them (measured: best at step 24, worse at 28, 32, 36).
    recipe = make_recipe(
        classification=True,
        data={"loader": "table", "options": {"path": str(tiny_data / "sentiment.csv"), "test_size": 0.25, "max_train_rows": 32}},
        regularizers=[{"name": "early_stopping", "options": {"metric": "loss", "patience": 3}}],
        training={"max_steps": 60, "batch_size": 8, "learning_rate": 2e-2, "scheduler": "constant", "eval_every": 4,
                  "eval_train_examples": 32, "device": "cpu"},
    )
    result = _run(recipe)
    records = _records(result.adapter_dir)
    evals = [r for r in records if r["event"] == "eval" and r["split"] == "test" and r["when"] != "before"]
    best = min(evals, key=lambda r: r["loss"])
    manifest = json.loads((result.adapter_dir / "plugtune.json").read_text())

    assert result.steps < 60  # stopped early
    assert manifest["training"]["steps"] == result.steps
    assert best["step"] < result.steps
    assert manifest["training"]["best_step"] == best["step"]
    # three evaluations after the best one were worse: that is why it stopped
    assert [r["step"] for r in evals if r["when"] == "during"][-3:] == [best["step"] + 4 * k for k in (1, 2, 3)]
    metrics = {k: v for k, v in best.items() if k not in {"event", "split", "step", "when"}}
    assert manifest["metrics"]["after"] == metrics  # the saved metrics are the best evaluation's
    assert [r for r in records if r["event"] == "best"][0]["step"] == best["step"]
    # restore_best: the final evaluation already ran on the best weights
    final = [r for r in evals if r["when"] == "after"][0]
    assert final["loss"] == pytest.approx(best["loss"], abs=1e-6)

    # End to end: the saved adapter, loaded afresh, scores the best evaluation's metrics.
    from plugtune.cli import main

    report = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(result.adapter_dir), "--json", str(report)]) == 0
    reloaded = json.loads(report.read_text())[result.adapter_dir.name]
    assert reloaded["loss"] == pytest.approx(best["loss"], abs=1e-5)
    assert reloaded["accuracy"] == best["accuracy"]


def test_best_weights_are_saved_when_training_runs_to_the_end(make_recipe, tiny_data, tmp_path):
    # Patience never runs out, so the model keeps training past its best evaluation: the
    # saved adapter must still be the best evaluation's weights, not the last ones (the
    # core must copy them when marked best: on the CPU a state dict aliases the live weights).
    recipe = make_recipe(
        classification=True,
        data={"loader": "table", "options": {"path": str(tiny_data / "sentiment.csv"), "test_size": 0.25, "max_train_rows": 32}},
        regularizers=[{"name": "early_stopping", "options": {"metric": "loss", "patience": 100}}],
        training={"max_steps": 40, "batch_size": 8, "learning_rate": 2e-2, "scheduler": "constant", "eval_every": 4,
                  "device": "cpu", "eval_train_examples": 32},
    )
    result = _run(recipe)
    records = _records(result.adapter_dir)
    evals = [r for r in records if r["event"] == "eval" and r["split"] == "test" and r["when"] != "before"]
    best, last = min(evals, key=lambda r: r["loss"]), evals[-1]
    assert result.steps == 40 and best["step"] < 40 and last["loss"] > best["loss"] + 0.01
    assert result.after["loss"] == best["loss"]
    # the train-split score is the kept weights', taken when they were marked best
    train_at_best = [r for r in records if r["event"] == "eval" and r["split"] == "train" and r["step"] == best["step"]]
    assert train_at_best and result.train_metrics["loss"] == train_at_best[-1]["loss"]

    from plugtune.cli import main

    report = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(result.adapter_dir), "--json", str(report)]) == 0
    assert json.loads(report.read_text())[result.adapter_dir.name]["loss"] == pytest.approx(best["loss"], abs=1e-5)


def test_early_stopping_decisions():
    from plugtune.kernel.components import EvalMetrics, MetricDirections
    from plugtune.plugins.evaluators.classification import Accuracy

    directions = MetricDirections.of([Accuracy])
    reg = EarlyStopping(EarlyStoppingOptions(metric="accuracy", patience=2, min_delta=0.01, restore_best=False))
    decisions = [reg.after_evaluate(EvalMetrics({"accuracy": a}, directions), step)
                 for step, a in enumerate([0.5, 0.6, 0.605, 0.7, 0.69, 0.65, 0.9])]
    assert reg.mode == "max"  # as Accuracy declares
    assert [(d.best, d.stop) if d else None for d in decisions] == [
        (True, False), (True, False), None, (True, False), None, (False, True), None]  # stopped: nothing after
    with pytest.raises(TrainingError, match="metric 'bleu' is not among"):
        EarlyStopping(EarlyStoppingOptions(metric="bleu")).after_evaluate({"loss": 1.0}, 1)
    with pytest.raises(TrainingError, match="no evaluator declares which way 'loss' improves"):
        EarlyStopping(EarlyStoppingOptions(metric="loss")).after_evaluate(EvalMetrics({"loss": 1.0}), 1)


# -- augmentation --------------------------------------------------------------------------


def _batch(tiny_tokenizer, classification: bool, rows: int = 64):
    """Encoded rows of the tiny data as the core collates them."""
    import random

    from plugtune.testing import FILLER, WORDS_NEG, WORDS_POS

    rng = random.Random(0)
    if classification:
        task = build_task(dict(type="sequence-classification", text="{text}", labels=["negative", "positive"]))
        examples = [{"text": " ".join(rng.sample(FILLER + WORDS_POS + WORDS_NEG, rng.randint(4, 12))), "label": "positive"}
                    for _ in range(rows)]
    else:
        task = build_task(dict(type="causal-lm", prompt="question : {question} answer :", response=" {answer}"))
        examples = [{"question": " ".join(rng.sample(FILLER, rng.randint(3, 10))), "answer": "blue green"} for _ in range(rows)]
    encoded = [task.encode(e, tiny_tokenizer, 64) for e in examples]
    return task, collate(encoded, tiny_tokenizer.pad_token_id, task.is_classification)


@pytest.fixture(scope="module")
def tokenizers(tiny_bert, tiny_llama):
    from transformers import AutoTokenizer

    return {"bert": AutoTokenizer.from_pretrained(tiny_bert), "llama": AutoTokenizer.from_pretrained(tiny_llama)}


@pytest.mark.parametrize("cls,options", [(WordDropout, WordDropoutOptions), (SpanMask, SpanMaskOptions)])
@pytest.mark.parametrize("classification", [True, False])
def test_augmentation_changes_eligible_tokens_at_rate_p(cls, options, classification, tokenizers):
    tokenizer = tokenizers["bert" if classification else "llama"]
    task, batch = _batch(tokenizer, classification)
    reg = cls(options(p=0.3, seed=1))
    reg.setup(None, task, tokenizer)
    out = reg.transform_batch(batch, 0)
    changed = out["input_ids"] != batch["input_ids"]
    unk = tokenizer.unk_token_id  # the tiny tokenizers have no mask token
    assert torch.all(out["input_ids"][changed] == unk)
    assert torch.equal(out["labels"], batch["labels"]) and torch.equal(out["attention_mask"], batch["attention_mask"])
    special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids + [tokenizer.pad_token_id]))
    eligible = batch["attention_mask"].bool() & ~special
    if not classification:
        eligible &= batch["labels"] == -100
        assert not changed[batch["labels"] != -100].any()  # the response is never touched
    assert not changed[~eligible].any()  # padding, [CLS]/[SEP]/<s>, ... never touched
    rate = float(changed.sum()) / float(eligible.sum())
    assert 0.22 < rate < 0.38, rate
    assert reg.report(None)["fraction"] == pytest.approx(rate)
    # deterministic from the seed
    again = cls(options(p=0.3, seed=1))
    again.setup(None, task, tokenizer)
    assert torch.equal(again.transform_batch(batch, 0)["input_ids"], out["input_ids"])
    if cls is SpanMask:  # contiguous spans: longer runs of masked tokens than word dropout's
        words = WordDropout(WordDropoutOptions(p=0.3, seed=1))
        words.setup(None, task, tokenizer)
        single = words.transform_batch(batch, 0)["input_ids"] != batch["input_ids"]
        assert _mean_run(changed) > _mean_run(single) + 0.2


def _mean_run(changed: torch.Tensor) -> float:
    runs = [len(r) for row in changed.int().tolist() for r in "".join(map(str, row)).split("0") if r]
    return sum(runs) / len(runs)


def test_augmentation_changes_training_batches_and_never_evaluation(make_recipe):
    probe = ModelProbe(record_inputs=True)
    recipe = make_recipe(classification=True, regularizers=[
        {"name": "word_dropout", "options": {"p": 0.5}}, {"name": "span_mask", "options": {"p": 0.3}}],
        training={"max_steps": 6, "batch_size": 8, "eval_every": 3, "learning_rate": 1e-2, "device": "cpu"})
    result = _run(recipe, ("probe", probe))
    unk = probe.tokenizer.unk_token_id  # no word of the tiny data is unknown to its tokenizer
    train = [ids for training, ids in probe.forwards if training]
    evaluation = [ids for training, ids in probe.forwards if not training]
    assert len(train) == 6 and len(evaluation) >= 3  # evaluations at steps 3 and 6
    assert all((ids == unk).any() for ids in train)
    assert not any((ids == unk).any() for ids in evaluation)
    log = _train(result.adapter_dir)
    assert all(0.35 < r["word_dropout/fraction"] < 0.65 for r in log)
    assert all(0.1 < r["span_mask/fraction"] < 0.5 for r in log), [r["span_mask/fraction"] for r in log]


# -- all of them together --------------------------------------------------------------------


def test_every_regularizer_logs_every_step(make_recipe):
    regularizers = [
        {"name": "dropout", "options": {"attention": 0.1, "adapter": 0.1}},
        {"name": "label_smoothing", "options": {"epsilon": 0.1}},
        {"name": "grad_clip", "options": {"max_norm": 1.0}},
        {"name": "l2sp", "options": {"strength": 0.1}},
        {"name": "neftune", "options": {"alpha": 5}},
        {"name": "early_stopping", "options": {"patience": 10}},
        {"name": "word_dropout", "options": {"p": 0.1}},
        {"name": "span_mask", "options": {"p": 0.1}},
    ]
    result = _run(make_recipe(regularizers=regularizers,
                              training={"max_steps": 6, "batch_size": 8, "eval_every": 2, "device": "cpu"}))
    log = _train(result.adapter_dir)
    assert len(log) == 6
    every_step = {"dropout/attention", "dropout/adapter", "label_smoothing/loss", "grad_clip/grad_norm", "grad_clip/clipped",
                  "l2sp/loss", "l2sp/distance", "neftune/noise_scale", "word_dropout/fraction", "span_mask/fraction"}
    for record in log:
        assert every_step <= set(record), every_step - set(record)
    assert all(r["neftune/noise_scale"] > 0 for r in log)
    # early stopping reports once it has an evaluation to compare with (step 2 on)
    assert all({"early_stopping/best", "early_stopping/bad_evals"} <= set(r) for r in log[2:])
    assert result.after["loss"] < result.before["loss"]  # still learns with all of them on
