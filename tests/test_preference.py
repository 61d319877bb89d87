"""The ``preference`` task: pairs (text or chat prompts) and unpaired KTO rows, the
objectives' formulas, the reference from the base with the adapter off (equal to a
precomputed one and to a kept copy), validation of objectives and reference modes, the
``preference`` evaluator, and a DPO adapter served through the chat path it was trained on."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

import plugtune
from plugtune.artifacts.adapters import read_manifest
from plugtune.data.tasks import build_task
from plugtune.kernel.errors import DataError, RecipeError
from plugtune.serving.host import AdapterHost
from plugtune.testing import check_evaluator, check_task
from plugtune.training.recipe import load_recipe

ANSWERS = {"sky": "blue", "grass": "green", "sea": "blue", "sun": "yellow"}
COLOURS = sorted(set(ANSWERS.values()))


def write_pairs(path: Path, rows: int = 200, seed: int = 0, chat: bool = False) -> Path:
    """Questions about colours; the right colour is chosen, a wrong one rejected."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(rows):
            thing = rng.choice(sorted(ANSWERS))
            wrong = rng.choice([c for c in COLOURS if c != ANSWERS[thing]])
            question = f"what is the colour of the {thing} ?"
            if chat:
                row = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": question}],
                       "chosen": ANSWERS[thing], "rejected": wrong}
            else:
                row = {"prompt": f"{question} answer :", "chosen": f" {ANSWERS[thing]}", "rejected": f" {wrong}"}
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


def recipe(tmp: Path, base: Path, data: Path, *, task: dict | None = None, method: dict | None = None,
           tag: str = "pref", **training) -> Path:
    raw = {"name": tag, "base_model": str(base), "task": {"type": "preference", **(task or {})},
           "data": {"loader": "table", "options": {"path": str(data), "test_size": 0.25}},
           "method": method or {"name": "lora", "options": {"r": 4, "alpha": 8, "target_modules": "all-linear"}},
           "evaluators": ["preference", "loss"],
           "training": {"max_steps": 12, "batch_size": 8, "learning_rate": 2e-2, "seed": 0, "max_length": 48,
                        "device": "cpu", **training},
           "output": {"dir": str(tmp / "adapters" / tag)}}
    path = tmp / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def train_log(adapter: Path) -> list[dict]:
    return [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("event") == "train"]


# -- the contract -------------------------------------------------------------------------------


def test_the_preference_task_meets_the_task_contract(tmp_path, tiny_llama, pairs):
    task = check_task("preference", {"objective": {"name": "dpo", "beta": 0.1}}, tmp_path=tmp_path, data=pairs,
                      base_model=tiny_llama, training={"max_steps": 12},
                      bad_options=[{"objective": "dpoo"}, {"objective": {"name": "dpo", "gamma": 1.0}},
                                   {"reference": "sometimes"}, {"objective": "orpo", "reference": "copy"},
                                   {"objective": {"name": "simpo", "beta": -1}}])
    assert task.objective.name == "dpo"


def _values_batch(chosen_reward, rejected_reward, chosen_logp, rejected_logp):
    from plugtune.sdk import EvalBatch

    n = len(chosen_reward)
    return EvalBatch([1] * n, [1] * n, 0.0, n, values={
        "chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
        "chosen_logp": chosen_logp, "rejected_logp": rejected_logp})


def test_the_preference_evaluator_meets_the_evaluator_contract():
    task = build_task({"type": "preference"}, strict=True)
    nan = float("nan")
    batches = [_values_batch([0.2, 0.0, -0.1], [0.1, 0.0, 0.3], [-2.0, -3.0, -1.0], [-4.0, -3.0, -0.5]),
               _values_batch([0.5, nan], [0.0, -0.2], [-1.0, nan], [-2.0, -6.0])]  # an unpaired undesirable row
    metrics = check_evaluator("preference", task=task, batches=batches)
    assert metrics["preference/accuracy"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # a tie counts a half
    assert metrics["preference/margin"] == pytest.approx((0.1 + 0.0 - 0.4 + 0.5) / 4)
    assert metrics["preference/chosen_logp"] == pytest.approx((-2 - 3 - 1 - 1) / 4)
    assert metrics["preference/rejected_logp"] == pytest.approx((-4 - 3 - 0.5 - 2 - 6) / 5)
    assert metrics["preference/logp_accuracy"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_the_preference_evaluator_is_refused_for_a_task_that_ranks_nothing(make_recipe):
    raw = yaml.safe_load(make_recipe().read_text())
    raw["evaluators"] = ["preference"]
    with pytest.raises(RecipeError) as caught:
        load_recipe(raw=raw, base_dir=Path("."))
    assert caught.value.problems == ["evaluators[0].name: preference metrics need a task that ranks answers "
                                     "(preference, reward), not causal-lm"]


# -- objectives -----------------------------------------------------------------------------------


def _scores(task, chosen, rejected, ref_chosen, ref_rejected, counts=(2, 4)):
    """The per-answer terms of one pair, as ``_scores`` builds them from the model."""
    logps = torch.tensor([chosen, rejected])
    out = {"logps": logps, "counts": torch.tensor(counts, dtype=torch.float32), "desirable": torch.tensor([True, False])}
    ratios = logps - torch.tensor([ref_chosen, ref_rejected])
    out["ratios"], out["rewards"] = ratios, task.objective.beta * ratios
    return out, {"pairs": torch.tensor([True]), "desirable": torch.tensor([1, 0])}


@pytest.mark.parametrize("objective, expected", [
    ({"name": "dpo", "beta": 0.1}, -math.log(1 / (1 + math.exp(-0.1 * 2.0)))),  # Δ = (−1+2) − (−3+2) = 2
    ({"name": "dpo", "beta": 0.1, "label_smoothing": 0.2},
     -0.8 * math.log(1 / (1 + math.exp(-0.2))) - 0.2 * math.log(1 / (1 + math.exp(0.2)))),
    ({"name": "hinge", "beta": 0.1}, 1 - 0.1 * 2.0),
    ({"name": "ipo", "beta": 0.5}, (1.0 / 2 - (-1.0) / 4 - 1 / (2 * 0.5)) ** 2),  # ratios per answer token
    ({"name": "simpo", "beta": 2.0, "gamma": 0.5}, -math.log(1 / (1 + math.exp(-(2.0 * (-1 / 2 + 3 / 4) - 0.5))))),
])
def test_each_objective_is_its_published_formula(objective, expected):
    task = build_task({"type": "preference", "objective": objective}, strict=True)
    scores, batch = _scores(task, -1.0, -3.0, -2.0, -2.0)
    assert float(task._per_sequence_loss(scores, batch)[0]) == pytest.approx(expected, rel=1e-6)


def test_orpo_is_the_chosen_cross_entropy_plus_the_odds_ratio_term():
    task = build_task({"type": "preference", "objective": {"name": "orpo", "beta": 0.25}}, strict=True)
    scores, batch = _scores(task, -1.0, -3.0, 0.0, 0.0)
    mean_c, mean_r = -1.0 / 2, -3.0 / 4
    log_odds = (mean_c - math.log1p(-math.exp(mean_c))) - (mean_r - math.log1p(-math.exp(mean_r)))
    expected = 0.5 - 0.25 * math.log(1 / (1 + math.exp(-log_odds)))
    assert float(task._per_sequence_loss(scores, batch)[0]) == pytest.approx(expected, rel=1e-6)
    assert task.reference == "none"  # no reference model at all


def test_kto_moves_each_answer_against_the_kl_estimate():
    task = build_task({"type": "preference", "objective": {"name": "kto", "beta": 0.5, "undesirable_weight": 2.0}},
                      strict=True)
    scores, batch = _scores(task, -1.0, -3.0, -2.0, -2.0)
    scores["kl"] = torch.tensor(0.25)
    losses = task._per_sequence_loss(scores, batch)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.5 * (1.0 - 0.25)), 2.0 * (1 - sigmoid(0.5 * (0.25 + 1.0)))])


# -- training and the reference ---------------------------------------------------------------------


def test_dpo_starts_at_log_2_and_learns_the_preferred_answers(tmp_path, tiny_llama, pairs):
    result = plugtune.run(recipe(tmp_path, tiny_llama, pairs, max_steps=30), show_progress=False)
    first = train_log(Path(result.adapter_dir))[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the LoRA starts as the base: Δ = 0
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert result.before["preference/accuracy"] == 0.5 and result.before["preference/margin"] == 0.0  # base vs itself
    assert result.after["preference/accuracy"] >= 0.85
    assert result.after["preference/margin"] > 0
    assert result.after["preference/chosen_logp"] > result.before["preference/chosen_logp"]


def _adapter_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_adapter_off_precomputed_and_a_copy_give_the_same_adapter(tmp_path, tiny_llama, pairs):
    states, afters = {}, {}
    for mode in ("adapter_off", "precomputed", "copy"):
        result = plugtune.run(recipe(tmp_path, tiny_llama, pairs, task={"reference": mode}, tag=mode), show_progress=False)
        states[mode], afters[mode] = _adapter_state(Path(result.adapter_dir)), result.after
    for mode in ("precomputed", "copy"):
        assert states[mode].keys() == states["adapter_off"].keys()
        for key, value in states["adapter_off"].items():
            torch.testing.assert_close(states[mode][key], value, rtol=0, atol=1e-6)
        assert afters[mode] == pytest.approx(afters["adapter_off"], abs=1e-5)


def test_full_fine_tuning_precomputes_the_reference_and_refuses_adapter_off(tmp_path, tiny_llama, pairs):
    full = {"name": "full", "options": {}}
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe(tmp_path, tiny_llama, pairs, task={"reference": "adapter_off"}, method=full, tag="off"))
    assert any(p.startswith("task.reference: adapter_off needs a method that can switch its adapter off") for p in caught.value.problems)
    result = plugtune.run(recipe(tmp_path, tiny_llama, pairs, method=full, tag="full", learning_rate=1e-3, max_steps=20),
                          show_progress=False)
    assert train_log(Path(result.adapter_dir))[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.after["preference/accuracy"] > result.before["preference/accuracy"]


def test_precomputed_is_refused_with_a_regularizer_that_rewrites_batches(tmp_path, tiny_llama, pairs):
    path = recipe(tmp_path, tiny_llama, pairs, task={"reference": "precomputed"})
    raw = yaml.safe_load(path.read_text())
    raw["regularizers"] = [{"name": "word_dropout", "options": {"p": 0.1}}]
    with pytest.raises(RecipeError) as caught:
        load_recipe(raw=raw, base_dir=tmp_path)
    assert any(p.startswith("task.reference: precomputed scores are of the rows as loaded, and word_dropout")
               for p in caught.value.problems)


def test_sft_weight_mixes_in_the_chosen_cross_entropy(tmp_path, tiny_llama, pairs):
    result = plugtune.run(recipe(tmp_path, tiny_llama, pairs, task={"objective": {"name": "dpo", "sft_weight": 1.0}},
                                 max_steps=2), show_progress=False)
    first = train_log(Path(result.adapter_dir))[0]
    assert first["loss"] == pytest.approx(math.log(2) + first["sft/loss"], abs=1e-5)


@pytest.mark.parametrize("objective", ["ipo", "hinge", "orpo", "simpo", "kto"])
def test_every_objective_trains_toward_the_chosen_answers(tmp_path, tiny_llama, pairs, objective):
    result = plugtune.run(recipe(tmp_path, tiny_llama, pairs, task={"objective": objective}, max_steps=30),
                          show_progress=False)
    assert result.after["loss"] < result.before["loss"]
    if objective == "orpo":  # mostly the chosen answers' cross-entropy at this beta
        assert result.after["preference/chosen_logp"] > result.before["preference/chosen_logp"]
    else:
        assert result.after["preference/logp_accuracy"] > result.before["preference/logp_accuracy"]


# -- rows ----------------------------------------------------------------------------------------------


def test_kto_takes_unpaired_rows_and_pairs_together(tmp_path, tiny_llama):
    rng = random.Random(1)
    path = tmp_path / "unpaired.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(120):
            thing = rng.choice(sorted(ANSWERS))
            good = i % 2 == 0
            answer = ANSWERS[thing] if good else rng.choice([c for c in COLOURS if c != ANSWERS[thing]])
            fh.write(json.dumps({"prompt": f"what is the colour of the {thing} ? answer :", "completion": f" {answer}",
                                 "label": good}) + "\n")
    result = plugtune.run(recipe(tmp_path, tiny_llama, path, task={"objective": "kto"}, max_steps=20), show_progress=False)
    assert result.after["loss"] < result.before["loss"]
    with pytest.raises(RecipeError) as caught:  # a paired objective on unpaired rows: at validation
        load_recipe(recipe(tmp_path, tiny_llama, path, tag="dpo"))
    assert any("objective: dpo needs pairs" in p for p in caught.value.problems)


def test_whole_conversations_without_a_prompt_column_split_at_the_shared_messages():
    task = build_task({"type": "preference"}, strict=True)
    shared = [{"role": "user", "content": "hi"}]
    row = task.normalize({"chosen": [*shared, {"role": "assistant", "content": "hello"}],
                          "rejected": [*shared, {"role": "assistant", "content": "go away"}]})
    assert row == {"prompt": shared, "chosen": "hello", "rejected": "go away"}


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "   ", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' must be text or one assistant message"),
    ({"prompt": 7, "chosen": "a", "rejected": "b"}, "'prompt' must be text or a list of chat messages"),
    ({"prompt": "q", "answer": "a"}, "neither a pair"),
    ({"prompt": "q", "completion": "a", "label": "maybe"}, "use true/false"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}, "must share every message"),
])
def test_malformed_rows_are_one_line(row, message):
    task = build_task({"type": "preference", "objective": "kto"}, strict=True)
    with pytest.raises(DataError) as caught:
        task.normalize(row)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_malformed_row_in_a_run_names_its_split_and_row(tmp_path, tiny_llama):
    path = tmp_path / "bad.jsonl"
    rows = [{"prompt": "q", "chosen": " a", "rejected": " b"}] * 6 + [{"prompt": "q", "chosen": "", "rejected": " b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = yaml.safe_load(recipe(tmp_path, tiny_llama, path).read_text())
    raw["data"]["options"]["test_size"] = 0.1
    with pytest.raises(DataError, match=r"^(train|test) row \d+: 'chosen' is empty"):
        plugtune.run(load_recipe(raw=raw, base_dir=tmp_path), show_progress=False)


def test_long_pairs_keep_the_end_of_the_prompt_and_the_start_of_each_answer(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    task = build_task({"type": "preference"}, strict=True)
    long_prompt = " ".join(["the"] * 30) + " sky ?"
    row = task.encode({"prompt": long_prompt, "chosen": " blue " + "very " * 20, "rejected": " green"}, tokenizer, 16)
    assert len(row["input_ids"]) <= 16 and len(row["rejected_input_ids"]) <= 16
    prompt = row["input_ids"][: row["prompt_length"][0]]
    assert tokenizer.decode(prompt).endswith("sky ?")
    assert any(label != -100 for label in row["rejected_labels"])


# -- chat prompts, hosting ---------------------------------------------------------------------------------


def test_chat_prompts_train_the_answer_turn_and_serve_as_trained(tmp_path, tiny_chat_llama):
    data = write_pairs(tmp_path / "chat_pairs.jsonl", chat=True)
    result = plugtune.run(recipe(tmp_path, tiny_chat_llama, data, task={"template": "tokenizer"}, max_steps=4),
                          show_progress=False)
    manifest = read_manifest(result.adapter_dir)
    assert manifest.task["template_text"] and manifest.task["template_sha256"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama)
    task = build_task(manifest.task, strict=True)
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the colour of the sky ?"}]
    row = task.encode({"prompt": prompt, "chosen": "blue", "rejected": "green"}, tokenizer, 64)
    n = row["prompt_length"][0]
    chat = build_task({"type": "chat", "template_text": manifest.task["template_text"]}, strict=True)
    assert row["input_ids"][:n] == chat.encode_chat(prompt, tokenizer)  # the prompt a host renders, token for token
    answer = tokenizer.decode([t for t in row["labels"] if t != -100])
    assert answer.replace(" ", "") == "blue<|im_end|>"
    host = AdapterHost.from_base(str(tiny_chat_llama), task)
    host.load(result.adapter_dir, "dpo")
    assert host.chat_prompt(prompt, "dpo") == row["input_ids"][:n]  # the host's rendering is training's prompt
    assert isinstance(host.chat(prompt, adapter="dpo", max_new_tokens=3), str)


def test_plugtune_eval_scores_a_dpo_adapter_as_training_did(tmp_path, tiny_llama, pairs):
    from plugtune.cli import main

    result = plugtune.run(recipe(tmp_path, tiny_llama, pairs, tag="evaluated"), show_progress=False)
    out = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(result.adapter_dir), "--json", str(out)]) == 0
    columns = json.loads(out.read_text())
    assert columns["base"]["preference/accuracy"] == 0.5
    after = next(v for k, v in columns.items() if k != "base")
    assert after["preference/accuracy"] == pytest.approx(result.after["preference/accuracy"])
    assert after["preference/margin"] == pytest.approx(result.after["preference/margin"], abs=1e-5)
    # trained on text prompts: a chat request's last user message is the prompt, as in training
    manifest = read_manifest(result.adapter_dir)
    assert manifest.task["prompts"] == "text"
    host = AdapterHost.from_base(str(tiny_llama), build_task(manifest.task))
    host.load(result.adapter_dir, "dpo")
    prompt = "what is the colour of the sky ? answer :"
    assert host.chat_prompt([{"role": "user", "content": prompt}], "dpo") == host.tokenizer(prompt)["input_ids"]


def test_preview_shows_both_answers_of_a_pair(tmp_path, tiny_llama, pairs, capsys):
    from plugtune.cli import main

    assert main(["preview", str(recipe(tmp_path, tiny_llama, pairs)), "--rows", "1"]) == 0
    out = "".join(capsys.readouterr())
    shown = [line for line in out.splitlines() if "answer :" in line]
    assert len(shown) == 2 and shown[0].split("answer :")[0] == shown[1].split("answer :")[0]  # one prompt, two answers
    assert "rejected · " in out


def _preflight(name: str) -> str | None:
    from plugtune.kernel.registry import get_plugin_system

    cls = get_plugin_system().get("method", name).obj
    return cls(cls.Options()).preflight() if hasattr(cls, "preflight") else None


@pytest.mark.parametrize("method", [
    {"name": "prefix", "options": {"num_virtual_tokens": 4}},
    {"name": "dora", "options": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
    {"name": "int8", "options": {"r": 4, "alpha": 8, "target_modules": "all-linear"}},
    {"name": "qlora", "options": {"r": 4, "alpha": 8, "target_modules": "all-linear"}},
], ids=lambda m: m["name"])
def test_dpo_runs_on_other_methods_with_the_reference_from_the_same_base(tmp_path, tiny_llama, pairs, method, capfd):
    reason = _preflight(method["name"])
    if reason:
        pytest.skip(reason)
    result = plugtune.run(recipe(tmp_path, tiny_llama, pairs, method=method, max_steps=3), show_progress=False)
    assert "reference: adapter_off" in capfd.readouterr().err
    log = train_log(Path(result.adapter_dir))
    assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log)
    if method["name"] != "prefix":  # a fresh adapter is the base: the first loss is log 2 (8-bit kernels: to 1e-4)
        assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert result.before["preference/accuracy"] == 0.5
