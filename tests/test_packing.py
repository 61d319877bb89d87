"""Packing (core/data/packing.py): several examples per row, each with its own positions and
attention. Every example's loss equals its unpacked loss (plain and label-position paths), no
example sees another's tokens, a packed run trains the same adapter as an unpacked one, the
layout covers every example once within the width, and the cases that cannot pack are refused."""

from __future__ import annotations

import json
import random
from pathlib import Path

import plugtune
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from plugtune.artifacts.adapters import WEIGHTS_FILE
from plugtune.artifacts.models import load_base
from plugtune.data.encoding import encode_split
from plugtune.data.labels import IGNORE_INDEX, per_example_loss
from plugtune.data.packing import first_fit_decreasing, least_padding_layout, pack_rows, packed_width, per_example_packed
from plugtune.data.tasks import collate
from plugtune.kernel.components import PrepareContext, call_prepare
from plugtune.kernel.errors import RecipeError
from plugtune.training.loss import full_logits_token_losses, label_token_losses
from safetensors.torch import load_file


def _varied_data(folder: Path, rows: int = 64, seed: int = 0) -> Path:
    """SFT rows of widely different lengths (the tiny data has one length): 4 to 20 filler words."""
    rng = random.Random(seed)
    answers = {"sky": "blue", "grass": "green", "sea": "blue", "sun": "yellow"}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "varied.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(rows):
            thing = rng.choice(sorted(answers))
            filler = " very" * rng.randint(0, 10)
            fh.write(json.dumps({"question": f"what is the{filler} colour of the {thing} ?", "answer": answers[thing]}) + "\n")
    return folder / "varied.jsonl"


def _model_and_rows(tiny_llama: Path, make_recipe, tmp_path: Path, attention: str = "sdpa"):
    data = {"loader": "table", "options": {"path": str(_varied_data(tmp_path)), "test_size": 0.25}}
    recipe = plugtune.load_recipe(make_recipe(data=data))
    base = load_base(str(tiny_llama), recipe.task, attn_implementation=attention)
    examples = recipe.loader.build().load(0)["train"][:12]
    rows, _ = encode_split(examples, recipe.task, base.tokenizer, 48, "train")
    torch.manual_seed(0)
    model = call_prepare(recipe.method.build(), base.model, recipe.task, PrepareContext(new_parameters=base.new_parameters))
    with torch.no_grad():  # LoRA's B starts at zero: non-trivial weights
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()  # eval mode makes a cache unless the packed batch says use_cache: False
    return model, rows, base.tokenizer.pad_token_id


def _unpacked_per_example(model, rows, pad) -> torch.Tensor:
    batch = collate(rows, pad, False)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_losses = full_logits_token_losses(logits, batch["labels"])
    return token_losses.sum(-1) / (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)


def _label_examples(packed) -> torch.Tensor:
    """The example of each label token of a packed batch, in LabelPositions' (row-major) order."""
    shifted = packed.batch["labels"][:, 1:]
    return packed.example_of[:, 1:][shifted != IGNORE_INDEX]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_each_example_loses_what_it_loses_unpacked_on_both_loss_paths(tiny_llama, make_recipe, tmp_path, attention):
    model, rows, pad = _model_and_rows(tiny_llama, make_recipe, tmp_path, attention)
    packed = pack_rows(rows, pad, packed_width(rows, 96))
    assert packed.batch["input_ids"].size(0) < len(rows) // 2  # really packed: several examples per row
    examples = _label_examples(packed)
    with torch.no_grad():
        unpacked = _unpacked_per_example(model, rows, pad)
        # the plain path: the model's own forward over every position, its loss the batch mean
        outputs = model(**packed.batch)
        plain_tokens = full_logits_token_losses(outputs.logits, packed.batch["labels"])
        plain_tokens = plain_tokens[packed.batch["labels"][:, 1:] != IGNORE_INDEX]
        plain = per_example_packed(plain_tokens, examples, len(rows))
        assert torch.allclose(outputs.loss, plain_tokens.mean(), atol=1e-5)
        # the label-position path (logits at label positions only)
        token_losses, positions = label_token_losses(model, packed.batch)
        label_only = per_example_packed(token_losses, examples, len(rows))
        grouped = per_example_loss(*label_token_losses(model, collate(rows, pad, False)))
    assert token_losses.numel() == examples.numel() == int(sum((torch.tensor(r["labels"][1:]) != IGNORE_INDEX).sum() for r in rows))
    assert torch.allclose(plain, unpacked, atol=1e-5), (plain - unpacked).abs().max()
    assert torch.allclose(label_only, unpacked, atol=1e-5), (label_only - unpacked).abs().max()
    assert torch.allclose(grouped, unpacked, atol=1e-5)
    # the step's loss, the mean over its label tokens, is the unpacked step's
    unpacked_mean = model(**collate(rows, pad, False)).loss
    assert torch.allclose(token_losses.mean(), unpacked_mean, atol=1e-5)


def test_changing_one_example_changes_no_other_examples_logits(tiny_llama, make_recipe, tmp_path):
    model, rows, pad = _model_and_rows(tiny_llama, make_recipe, tmp_path)
    packed = pack_rows(rows, pad, packed_width(rows, 96))
    row0 = packed.example_of[0]
    first, second = int(row0[0]), int(row0[row0 != row0[0]][0])  # the first two examples of row 0
    changed = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in packed.batch.items()}
    mine = packed.example_of == first
    changed["input_ids"][mine] = (changed["input_ids"][mine] + 3) % 40 + 5  # other tokens, same layout
    with torch.no_grad():
        before = model(**{k: v for k, v in packed.batch.items() if k != "labels"}).logits
        after = model(**{k: v for k, v in changed.items() if k != "labels"}).logits
    others = (packed.example_of != first) & (packed.example_of >= 0)
    assert not torch.allclose(before[mine], after[mine], atol=1e-3)  # the change reached the changed example
    assert torch.allclose(before[others], after[others], atol=1e-6), (before[others] - after[others]).abs().max()
    assert bool((packed.example_of == second).any())
    # and the example after it in the row reads exactly what it reads alone, at positions from 0
    alone = model(input_ids=torch.tensor([rows[second]["input_ids"]])).logits[0]
    assert torch.allclose(before[packed.example_of == second], alone, atol=1e-5)


@settings(deadline=None, max_examples=60)  # the first example imports transformers
@given(st.lists(st.integers(1, 40), min_size=1, max_size=24), st.integers(0, 30))
def test_the_layout_covers_every_example_once_within_the_width(lengths, extra):
    width = max(lengths) + extra
    rows = [{"input_ids": [10 + i] * n, "labels": [IGNORE_INDEX] + [10 + i] * (n - 1)} for i, n in enumerate(lengths)]
    packed = pack_rows(rows, 0, width)
    ids, labels, positions = packed.batch["input_ids"], packed.batch["labels"], packed.batch["position_ids"]
    of = packed.example_of
    assert "attention_mask" not in packed.batch and packed.batch["use_cache"] is False
    assert ids.size(1) <= width and packed.real_tokens == sum(lengths)
    for i, n in enumerate(lengths):  # each example once, whole, in one row, positions 0..n-1
        r, c = (of == i).nonzero(as_tuple=True)
        assert r.numel() == n and r.unique().numel() == 1 and bool((c.diff() == 1).all())
        assert ids[r, c].tolist() == rows[i]["input_ids"] and positions[r, c].tolist() == list(range(n))
        assert labels[r[0], c[0]] == IGNORE_INDEX  # nothing learns to predict an example's first token
        assert labels[r, c][1:].tolist() == rows[i]["labels"][1:]
    pad = of < 0
    assert bool((labels[pad] == IGNORE_INDEX).all()) and bool((ids[pad] == 0).all())
    # never more positions than one example per row, or than first fit at the full width
    positions_ = ids.numel()
    assert positions_ <= len(lengths) * max(lengths)
    bins = first_fit_decreasing(lengths, width)
    assert positions_ <= len(bins) * max(sum(lengths[i] for i in b) for b in bins)
    assert sorted(i for b in first_fit_decreasing(lengths, width) for i in b) == list(range(len(lengths)))


def _positions(lengths, bins):
    return len(bins) * max(sum(lengths[i] for i in b) for b in bins)


def test_the_layout_pads_less_than_filling_rows_to_the_width_or_one_example_per_row():
    # first fit at the full width 128 gives rows of 120 and 40: 2 x 120 positions; 160 is the least
    assert _positions([40] * 4, first_fit_decreasing([40] * 4, 128)) == 240
    assert _positions([40] * 4, least_padding_layout([40] * 4, 128)) == 160
    # one long example and three short ones: two rows of 60 instead of four
    assert sorted(map(sorted, least_padding_layout([60, 20, 20, 20], 128))) == [[0], [1, 2, 3]]
    assert least_padding_layout([30, 30], 128) == [[0], [1]]  # 2 x 30 or 1 x 60: a tie, the narrower rows


def test_a_row_wider_than_the_width_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([3, 9], 8)


def _training(**extra):
    return {"max_steps": 6, "batch_size": 8, "learning_rate": 2e-2, "seed": 0, "max_length": 48, "device": "cpu",
            "eval_before": False, "precision": "fp32", **extra}


@pytest.mark.parametrize("label_only", [True, False], ids=["label-positions", "plain"])
def test_a_packed_run_trains_the_same_adapter_as_an_unpacked_one(make_recipe, tmp_path, monkeypatch, label_only):
    """Same batches (epoch_batches), same loss over the same label tokens: the gradients differ
    only by fp32 rounding in another summation order (fp32, dropout 0: dropout masks are drawn
    over the batch's shape). Measured: 2.4e-7 at most after 6 AdamW steps at 2e-2; 1e-5 leaves
    room for other BLAS builds, while a packer that let examples attend to each other moves the
    weights by ~1e-2 (each Adam update is about the learning rate)."""
    import plugtune.training.train as train

    packs = []
    real = train.pack_rows

    def counting(*args, **kwargs):
        packed = real(*args, **kwargs)
        packs.append(packed.batch["input_ids"].size(0))
        return packed

    monkeypatch.setattr(train, "pack_rows", counting)
    data = {"loader": "table", "options": {"path": str(_varied_data(tmp_path, 96)), "test_size": 0.25}}
    adapters, logs = {}, {}
    for packing in (False, True):
        recipe = plugtune.load_recipe(make_recipe(name=f"pack-{packing}-{label_only}".lower(), data=data,
                                                  training=_training(packing=packing, logits_on_labels_only=label_only),
                                                  method={"name": "lora", "options": {"r": 4, "alpha": 8, "dropout": 0.0}}))
        result = plugtune.run(recipe, show_progress=False)
        adapters[packing] = load_file(Path(result.adapter_dir) / WEIGHTS_FILE)
        logs[packing] = [json.loads(line) for line in (Path(result.adapter_dir) / "metrics.jsonl").read_text().splitlines()]
    # every step went through the packer, and most batches really share rows (a batch whose
    # rows no pairing saves positions on keeps one example per row)
    assert len(packs) == 6 and sum(rows < 8 for rows in packs) >= 3, packs
    train_logs = {k: [r for r in v if r["event"] == "train"] for k, v in logs.items()}
    for unpacked, packed in zip(train_logs[False], train_logs[True]):
        assert packed["tokens"] == unpacked["tokens"]  # real tokens, not positions: counted from the rows
        assert packed["computed_tokens"] <= unpacked["computed_tokens"]  # never more positions than padding
        assert abs(packed["loss"] - unpacked["loss"]) < 1e-5
    assert sum(p["computed_tokens"] for p in train_logs[True]) < sum(u["computed_tokens"] for u in train_logs[False])
    for name, tensor in adapters[True].items():
        assert torch.allclose(tensor, adapters[False][name], atol=1e-5), (name, (tensor - adapters[False][name]).abs().max())
    moved = max(float(t.abs().max()) for n, t in adapters[True].items() if "lora_B" in n)
    assert moved > 1e-2  # it trained: lora_B started at zero


def test_packing_true_is_refused_where_it_cannot_work(make_recipe):
    cases = [
        (make_recipe(classification=True, name="cls", training=_training(packing=True)), "classifier head"),
        (make_recipe(name="prefix", method={"name": "prefix", "options": {"num_virtual_tokens": 4}},
                     training=_training(packing=True)), "method prefix"),
        (make_recipe(name="prompt", method={"name": "prompt_tuning", "options": {"num_virtual_tokens": 4}},
                     training=_training(packing=True)), "virtual tokens"),
        (make_recipe(name="neftune", regularizers=[{"name": "neftune", "options": {"alpha": 5.0}}],
                     training=_training(packing=True)), "regularizer neftune: its noise scale"),
    ]
    for path, reason in cases:
        with pytest.raises(RecipeError) as caught:
            plugtune.load_recipe(path)
        message = str(caught.value)
        line = next(p for p in caught.value.problems if p.startswith("training.packing"))
        assert reason in line and "set training.packing: false" in line and "\n" not in line, message
    # auto is never refused: it packs only where it can
    plugtune.load_recipe(make_recipe(classification=True, name="cls-auto", training=_training(packing="auto")))


def test_packing_true_is_refused_on_an_attention_that_keeps_no_examples_apart(make_recipe, tmp_path, monkeypatch):
    import plugtune.data.packing as packing

    monkeypatch.setattr(packing, "PACKED_ATTENTION", frozenset({"flash_attention_2"}))  # as if sdpa ignored position ids
    recipe = plugtune.load_recipe(make_recipe(name="attn", training=_training(packing=True, max_steps=1)))
    with pytest.raises(RecipeError, match=r"training\.packing: the model runs attention implementation 'sdpa'"):
        plugtune.run(recipe, show_progress=False)


def test_a_dpo_task_refuses_packing():
    from plugtune.data.packing import packing_problem

    class Pairs:
        type, head, is_classification = "dpo", "lm", False

        def training_loss(self, model, batch):  # computes its own loss over whole rows
            raise AssertionError

    assert "computes its own loss" in packing_problem(Pairs())


def test_auto_packs_on_a_cpu_where_it_can_and_not_where_it_cannot(make_recipe, monkeypatch):
    import plugtune.training.train as train

    calls = []
    real = train.pack_rows
    monkeypatch.setattr(train, "pack_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    plugtune.run(plugtune.load_recipe(make_recipe(name="auto-lora", training=_training(max_steps=2))), show_progress=False)
    assert len(calls) == 2  # the default (auto) packed a causal-LM run on the CPU
    calls.clear()
    prefix = {"name": "prefix", "options": {"num_virtual_tokens": 4}}
    plugtune.run(plugtune.load_recipe(make_recipe(name="auto-prefix", method=prefix, training=_training(max_steps=2))),
                 show_progress=False)
    assert calls == []  # auto leaves a method that cannot pack unpacked, without an error
    noisy = [{"name": "neftune", "options": {"alpha": 5.0}}]
    plugtune.run(plugtune.load_recipe(make_recipe(name="auto-neftune", regularizers=noisy, training=_training(max_steps=2))),
                 show_progress=False)
    assert calls == []  # nor a regularizer that cannot (NEFTune's noise follows the row's width)
    from plugtune.training.runtime import choose_packing

    assert choose_packing(on_cuda=False) and not choose_packing(on_cuda=True)
