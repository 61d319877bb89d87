"""The ``reward`` task: a reward model on a one-output classifier head, trained with the
Bradley–Terry loss on preference pairs, and scored by hosts, ``plugtune classify`` and the
server's ``/v1/classify``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from plugtune.testing import FILLER, WORDS_NEG, WORDS_POS, recipe_dict


def write_pairs(folder: Path, rows: int = 160, seed: int = 0, *, chat: bool = False) -> Path:
    """``pairs.jsonl``: a review prompt, a chosen answer of positive words and a rejected one
    of negative words (chat: the prompt as one user message)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("chat_pairs.jsonl" if chat else "pairs.jsonl")
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(rows):
            prompt = "review : " + " ".join(rng.sample(FILLER, 3))
            good = " ".join(rng.sample(FILLER, 2) + rng.sample(WORDS_POS, 2))
            bad = " ".join(rng.sample(FILLER, 2) + rng.sample(WORDS_NEG, 2))
            if chat:
                row = {"prompt": [{"role": "user", "content": prompt}], "chosen": good, "rejected": bad}
            else:
                row = {"prompt": prompt + " answer :", "chosen": " " + good, "rejected": " " + bad}
            fh.write(json.dumps(row) + "\n")
    return path


def reward_recipe(tmp_path: Path, base: Path, data: Path, *, targets: list[str], name: str = "rm", **task: object) -> Path:
    raw = recipe_dict(base, data.parent, classification=True, name=name,
                      task={"type": "reward", **task},
                      data={"loader": "table", "options": {"path": str(data), "test_size": 0.25}},
                      evaluators=["preference", "loss"],
                      output={"dir": str(tmp_path / "adapters" / name)})
    raw["method"]["options"]["target_modules"] = targets
    raw["training"].update(max_steps=30, learning_rate=2e-2, batch_size=8)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def bert_rm(tmp_path_factory, tiny_bert):
    """A reward adapter trained on the tiny BERT, with the run's result."""
    import plugtune

    tmp = tmp_path_factory.mktemp("rm-bert")
    data = write_pairs(tmp / "data")
    result = plugtune.run(str(reward_recipe(tmp, tiny_bert, data, targets=["query", "value"])), [])
    return tmp / "adapters" / "rm", result, data


def test_a_reward_model_on_bert_learns_the_preference(bert_rm) -> None:
    _, result, _ = bert_rm
    assert result.after["preference/accuracy"] >= 0.9 > result.before["preference/accuracy"] + 0.15
    assert result.after["preference/margin"] > result.before["preference/margin"]
    assert result.after["loss"] < result.before["loss"]


def test_the_adapter_records_a_one_output_head_and_saves_it(bert_rm) -> None:
    from safetensors.torch import load_file

    from plugtune.artifacts.adapters import read_manifest

    folder, _, _ = bert_rm
    manifest = read_manifest(folder)
    assert manifest.task["type"] == "reward"
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    head = {k: v.shape for k, v in tensors.items() if "classifier" in k}
    assert head and any(shape[0] == 1 for shape in head.values()), head  # the score head: one output, saved whole


def test_the_host_scores_a_text_as_the_trained_model_does(bert_rm, tiny_bert) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from plugtune import AdapterHost

    folder, _, data = bert_rm
    rows = [json.loads(line) for line in data.read_text().splitlines()[:4]]
    texts = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
    host = AdapterHost.from_adapters(folder, device="cpu")
    scores = host.score(texts)
    assert [r["score"] for r in host.classify(texts[:2])] == pytest.approx(scores[:2], abs=1e-5)
    assert all(c > r for c, r in zip(scores[:4], scores[4:]))
    # plain peft on the base: the same numbers
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=1)
    model = PeftModel.from_pretrained(model, str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    with torch.no_grad():
        expected = [float(model(**tokenizer(t, return_tensors="pt")).logits[0, 0]) for t in texts]
    assert scores == pytest.approx(expected, abs=1e-5)
    # a batch mixing the adapter and the bare base gives each row its own
    mixed = host.score(texts[:2], ["rm", None])
    assert mixed[0] == pytest.approx(scores[0], abs=1e-5) and mixed[1] != pytest.approx(scores[1], abs=1e-3)


def test_the_run_s_scores_are_the_host_s(bert_rm) -> None:
    """What evaluation scored for the held-out pairs is what the host scores for those texts."""
    import torch

    from plugtune import AdapterHost
    from plugtune.data.tasks import build_task
    from plugtune.artifacts.adapters import read_manifest

    folder, _, data = bert_rm
    host = AdapterHost.from_adapters(folder, device="cpu")
    task = build_task(read_manifest(folder).task)
    rows = [task.normalize(json.loads(line)) for line in data.read_text().splitlines()[:3]]
    batch = task.collate([task.encode(r, host.tokenizer, 48) for r in rows], host.tokenizer.pad_token_id)
    with torch.no_grad():
        result = task.evaluate_batch(host.model, batch)
    scores = host.score([r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows])
    assert result.values["chosen_reward"] == pytest.approx(scores[:3], abs=1e-5)
    assert result.values["rejected_reward"] == pytest.approx(scores[3:], abs=1e-5)


def test_a_reward_model_on_llama_learns_the_preference_and_scores_the_same(tmp_path, tiny_llama) -> None:
    import plugtune
    from plugtune import AdapterHost

    data = write_pairs(tmp_path / "data")
    result = plugtune.run(str(reward_recipe(tmp_path, tiny_llama, data, targets=["q_proj", "v_proj"])), [])
    assert result.after["preference/accuracy"] >= 0.9 > result.before["preference/accuracy"] + 0.15
    host = AdapterHost.from_adapters(tmp_path / "adapters" / "rm", device="cpu")
    row = json.loads(data.read_text().splitlines()[0])
    good, bad = row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]
    together = host.score([good, bad, good + " the film"])  # rows of different lengths, padded
    assert together[0] > together[1]
    assert host.score([good])[0] == pytest.approx(together[0], abs=1e-5)
    with pytest.raises(plugtune.AdapterError, match="do not generate; use score"):
        host.generate(["review :"])


def test_chat_pairs_score_as_the_conversation_rendered(tmp_path, tiny_chat_llama) -> None:
    """A pair whose prompt is messages trains on the chat template's rendering; the host
    scores a conversation through the same template."""
    import torch

    from plugtune import AdapterHost
    from plugtune.data.tasks import build_task
    from plugtune.kernel.errors import DataError

    host = AdapterHost.from_base(str(tiny_chat_llama), build_task({"type": "reward"}), device="cpu")
    task = host.task
    task.bind_tokenizer(host.tokenizer)
    prompt = [{"role": "user", "content": "review : the film"}]
    row = task.normalize({"prompt": prompt, "chosen": "great fun", "rejected": "dull"})
    encoded = task.encode(row, host.tokenizer, 64)
    conversation = [*prompt, {"role": "assistant", "content": "great fun"}]
    assert task.encode_scored(conversation, host.tokenizer, 64) == encoded["input_ids"]
    assert "<|im_end|>" in host.tokenizer.decode(encoded["input_ids"])
    batch = task.collate([encoded], host.tokenizer.pad_token_id)
    with torch.no_grad():
        chosen = task.evaluate_batch(host.model, batch).values["chosen_reward"][0]
    assert host.score([conversation], None)[0] == pytest.approx(chosen, abs=1e-5)
    with pytest.raises(DataError, match="end with an assistant message"):
        host.score([prompt], None)


def test_the_loss_is_trl_s_bradley_terry_with_margin_and_centring() -> None:
    """``-log σ(r_c - r_r - margin) + c·mean((r_c + r_r)²)``, TRL's RewardTrainer.compute_loss."""
    import torch

    from plugtune.data.tasks import build_task

    class Scores(torch.nn.Module):  # a model whose "logits" are the first token id, as a score
        def forward(self, input_ids, attention_mask):
            from types import SimpleNamespace

            return SimpleNamespace(logits=input_ids[:, :1].float() / 10)

    task = build_task({"type": "reward", "center_rewards_coefficient": 0.01})
    rows = [{"input_ids": [7, 1], "rejected_input_ids": [2], "labels": [0], "margin": [500000]},
            {"input_ids": [3], "rejected_input_ids": [5, 1, 1], "labels": [0], "margin": [0]}]
    batch = task.collate(rows, 0)
    assert batch["input_ids"].shape == (4, 3) and batch["margin"].tolist() == [0.5, 0.0]
    chosen, rejected, margin = torch.tensor([0.7, 0.3]), torch.tensor([0.2, 0.5]), torch.tensor([0.5, 0.0])
    expected = (-torch.nn.functional.logsigmoid(chosen - rejected - margin).mean()
                + 0.01 * torch.mean((chosen + rejected) ** 2))
    result = task.training_loss(Scores(), batch)
    assert float(result.loss) == pytest.approx(float(expected), rel=1e-6)
    assert result.terms["rewards/accuracy"] == 0.5
    assert result.terms["rewards/margin"] == pytest.approx(float((chosen - rejected).mean()))
    evaluated = task.evaluate_batch(Scores(), batch)
    assert evaluated.predictions == [1, 0] and evaluated.values["chosen_reward"] == pytest.approx([0.7, 0.3])


def test_rows_are_the_preference_task_s_pairs() -> None:
    from plugtune.data.tasks import build_task
    from plugtune.kernel.errors import DataError

    task = build_task({"type": "reward"})
    assert task.normalize({"prompt": "p", "chosen": " a", "rejected": " b"}) == \
        {"prompt": "p", "chosen": " a", "rejected": " b", "margin": 0.0}
    shared = [{"role": "user", "content": "hi"}]
    whole = task.normalize({"chosen": [*shared, {"role": "assistant", "content": "yes"}],
                            "rejected": [*shared, {"role": "assistant", "content": "no"}], "margin": "1.5"})
    assert whole == {"prompt": shared, "chosen": "yes", "rejected": "no", "margin": 1.5}
    with pytest.raises(DataError, match="no 'rejected' answer"):
        task.normalize({"prompt": "p", "chosen": " a", "rejected": None})
    with pytest.raises(DataError, match="a margin is a number"):
        task.normalize({"prompt": "p", "chosen": " a", "rejected": " b", "margin": "lots"})
    assert build_task(task.to_dict()) == task


def test_bad_input_is_one_line(tmp_path, tiny_bert, capsys) -> None:
    from plugtune.cli import main

    data = tmp_path / "data" / "pairs.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(json.dumps({"prompt": "review :", "chosen": " great", "rejected": " dull" if i else None})
                              for i in range(8)) + "\n")
    recipe = reward_recipe(tmp_path, tiny_bert, data, targets=["query", "value"])
    assert main(["run", str(recipe), "--quiet"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no 'rejected' answer" in err[0] and "Traceback" not in err[0], err
    unpaired = tmp_path / "data" / "kto.jsonl"
    unpaired.write_text(json.dumps({"prompt": "review :", "completion": " great", "label": True}) + "\n")
    assert main(["validate", str(reward_recipe(tmp_path, tiny_bert, unpaired, targets=["query"], name="kto"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task.chosen: a reward model trains on pairs" in err[0], err


def test_classify_prints_scores_and_generate_refuses(bert_rm, capsys) -> None:
    from plugtune.cli import main

    folder, _, _ = bert_rm
    assert main(["classify", "--adapter", str(folder), "review : the film answer : great fun"]) == 0
    out = capsys.readouterr().out
    assert "score " in out and "<-" in out
    assert main(["generate", "--adapter", str(folder), "review :"]) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "do not generate" in err[0], err


def test_the_server_returns_a_score_per_input(bert_rm) -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from plugtune import AdapterHost
    from plugtune.serving.server import Service, create_app, running

    folder, _, _ = bert_rm
    host = AdapterHost.from_adapters(folder, device="cpu")
    texts = ["review : the film answer : great fun", "review : the film answer : dull weak"]
    expected = host.score(texts)
    with running(create_app(Service(host, adapters_root=folder.parent))) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        reply = client.post("/v1/classify", json={"model": "rm", "input": texts})
        assert reply.status_code == 200, reply.text
        data = reply.json()["data"]
        assert [d["index"] for d in data] == [0, 1] and "label" not in data[0]
        assert [d["score"] for d in data] == pytest.approx(expected, abs=1e-5)
        one = client.post("/v1/classify", json={"model": "rm", "input": texts[0]}).json()["data"]
        assert one[0]["score"] == pytest.approx(expected[0], abs=1e-5)
        refused = client.post("/v1/completions", json={"model": "rm", "prompt": "review :"})
        assert refused.status_code == 400 and "classify" in refused.text


def test_the_reward_task_meets_the_task_contract(tmp_path, tiny_bert) -> None:
    from plugtune.testing import check_task

    data = write_pairs(tmp_path / "data")
    task = check_task("reward", {}, tmp_path=tmp_path, data=data, base_model=tiny_bert,
                      method={"name": "lora", "options": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]}},
                      training={"max_steps": 24, "learning_rate": 1e-2},
                      bad_options=[{"center_rewards_coefficient": -1}, {"margin": ""}])
    assert task.labels == ["score"]
