"""Compute savers keep the loss: length-grouped batches, logits at label positions only, the
tokenized-split cache; the hardware defaults' choice logic; data-parallel training."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import plugtune
import pytest
import torch
import yaml
from plugtune.artifacts.adapters import MANIFEST_FILE, WEIGHTS_FILE
from plugtune.data.batching import epoch_batches, shard
from plugtune.data.encoding import encode_split
from plugtune.data.datacheck import PreparedSplit
from plugtune.data.labels import LabelPositions, per_example_loss
from plugtune.training.loss import full_logits_token_losses, label_token_losses, supports_label_positions
from plugtune.artifacts.models import load_base
from plugtune.kernel.components import PrepareContext, call_prepare
from plugtune.training.runtime import (
    FORCE_GQA,
    choose_attention,
    choose_precision,
    choose_threads,
    grouped_query_sdpa,
)
from plugtune.data.tasks import collate
from plugtune.data.tokenized_cache import cached_encode
from safetensors.torch import load_file

# -- batch order -------------------------------------------------------------------------


def test_length_grouped_order_is_a_function_of_seed_and_epoch_and_covers_every_row():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    first = epoch_batches(1000, 8, seed=3, epoch=1, lengths=lengths)
    assert first == epoch_batches(1000, 8, seed=3, epoch=1, lengths=lengths)
    assert first != epoch_batches(1000, 8, seed=3, epoch=2, lengths=lengths)
    assert sorted(i for b in first for i in b) == list(range(1000))
    assert len(first) == len(epoch_batches(1000, 8, seed=3, epoch=1))  # same number of steps as ungrouped

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain = epoch_batches(1000, 8, seed=3, epoch=1)
    assert padding(first) < padding(plain) / 10


def test_shards_of_a_global_batch_partition_it():
    batch = [5, 9, 2, 7, 1]
    parts = [shard(batch, r, 2) for r in range(2)]
    assert parts == [[5, 2, 1], [9, 7]]


# -- label-position loss -----------------------------------------------------------------


def _rows(tiny_llama: Path, tiny_data: Path, make_recipe, method: dict | None = None):
    recipe = plugtune.load_recipe(make_recipe(**({"method": method} if method else {})))
    from plugtune.data.tasks import Task

    task: Task = recipe.task
    base = load_base(str(tiny_llama), task)
    examples = recipe.loader.build().load(0)["train"][:12]
    # rows of different lengths (the tiny SFT data has one length), so padding really varies
    examples = [{**e, "question": e["question"] + " very" * (i % 5)} for i, e in enumerate(examples)]
    rows, _ = encode_split(examples, task, base.tokenizer, 48, "train")
    torch.manual_seed(0)
    model = call_prepare(recipe.method.build(), base.model, task, PrepareContext(new_parameters=base.new_parameters))
    with torch.no_grad():  # LoRA's B starts at zero: give every method non-trivial weights
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    return model, rows, base.tokenizer.pad_token_id


def _plain_per_example(model, batch) -> torch.Tensor:
    token_losses = full_logits_token_losses(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                            batch["labels"])  # (B, T-1)
    counts = (batch["labels"][:, 1:] != -100).sum(-1)
    return token_losses.sum(-1) / counts


@pytest.mark.parametrize("method", [None, {"name": "prefix", "options": {"num_virtual_tokens": 4}}, {"name": "full"}],
                         ids=["lora", "prefix", "full"])
def test_label_position_loss_equals_the_plain_loss_per_example(tiny_llama, tiny_data, make_recipe, method):
    model, rows, pad = _rows(tiny_llama, tiny_data, make_recipe, method)
    assert supports_label_positions(model)
    batch = collate(rows[:8], pad, classification=False)
    with torch.no_grad():
        plain = _plain_per_example(model, batch)
        token_losses, positions = label_token_losses(model, batch)
        label_only = per_example_loss(token_losses, positions)
        # the batch mean is the model's own loss
        assert torch.allclose(token_losses.mean(), model(**batch).loss, atol=1e-5)
    assert plain.shape == (8,) and torch.allclose(label_only, plain, atol=1e-5), (label_only - plain).abs().max()
    assert token_losses.numel() == int((batch["labels"][:, 1:] != -100).sum())  # logits at label positions only


def test_grouped_batches_give_each_example_the_same_loss(tiny_llama, tiny_data, make_recipe):
    """An example's loss does not depend on which rows share its batch (right padding,
    attention mask): regrouping by length changes padding, never the loss."""
    model, rows, pad = _rows(tiny_llama, tiny_data, make_recipe)
    lengths = [len(r["input_ids"]) for r in rows]
    by_length = sorted(range(len(rows)), key=lambda i: -lengths[i])
    with torch.no_grad():
        together = _plain_per_example(model, collate(rows, pad, False))
        grouped = torch.zeros(len(rows))
        for part in (by_length[:4], by_length[4:8], by_length[8:]):
            batch = collate([rows[i] for i in part], pad, False)
            token_losses, positions = label_token_losses(model, batch)
            grouped[part] = per_example_loss(token_losses, positions)
    assert max(lengths) > min(lengths)
    assert torch.allclose(grouped, together, atol=1e-5), (grouped - together).abs().max()


def test_label_smoothing_keeps_full_logits():
    from plugtune.plugins.regularizers.training import L2SP, LabelSmoothing

    head_model = torch.nn.Module()
    head_model.get_output_embeddings = lambda: torch.nn.Linear(2, 2)  # type: ignore[method-assign]
    assert supports_label_positions(head_model, [L2SP.__new__(L2SP)])
    assert not supports_label_positions(head_model, [LabelSmoothing.__new__(LabelSmoothing)])

    class Unknown:
        def loss_term(self, *args):  # a third-party term that may read logits
            return None

    assert not supports_label_positions(head_model, [Unknown()])


def test_training_with_label_position_logits_matches_the_plain_path(make_recipe, tmp_path, monkeypatch):
    import plugtune.training.train

    calls = {True: 0, False: 0}
    real = plugtune.training.train.label_token_losses

    def counting(*args, **kwargs):
        calls[current] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(plugtune.training.train, "label_token_losses", counting)
    adapters = {}
    for label_only in (True, False):
        current = label_only
        training = {"max_steps": 6, "batch_size": 8, "learning_rate": 2e-2, "seed": 0, "max_length": 48, "device": "cpu",
                    "logits_on_labels_only": label_only, "eval_before": False}
        recipe = plugtune.load_recipe(make_recipe(name=f"labels-{label_only}".lower(), training=training,
                                                  method={"name": "lora", "options": {"r": 4, "alpha": 8, "dropout": 0.0}}))
        result = plugtune.run(recipe, show_progress=False)
        adapters[label_only] = load_file(Path(result.adapter_dir) / WEIGHTS_FILE)
    assert calls[True] >= 6 and calls[False] == 0  # the option took effect: no silent fallback
    for name, tensor in adapters[True].items():
        assert torch.allclose(tensor, adapters[False][name], atol=1e-5), name


def test_label_positions_index_the_predicting_position():
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])
    positions = LabelPositions.of(labels)
    assert positions.rows.tolist() == [0, 0, 1] and positions.columns.tolist() == [1, 2, 0]
    assert positions.targets.tolist() == [7, 8, 5]


# -- tokenized cache ---------------------------------------------------------------------


def test_tokenized_split_cache_hits_on_a_rerun_and_misses_when_any_key_changes(tiny_llama, make_recipe, monkeypatch, tmp_path):
    monkeypatch.setenv("PLUGTUNE_HOME", str(tmp_path / "home"))
    recipe = plugtune.load_recipe(make_recipe())
    task = recipe.task
    tokenizer = load_base(str(tiny_llama), task).tokenizer
    rows = recipe.loader.build().load(0)["train"][:20]
    calls = []

    def encode_with(rows=rows, task=task, tokenizer=tokenizer, max_length=48, split="train"):
        def encode():
            calls.append(1)
            return PreparedSplit(*encode_split(rows, task, tokenizer, max_length, split))
        return cached_encode(rows, task, tokenizer, max_length, split, encode)

    first, hit = encode_with()
    assert not hit and len(calls) == 1
    second, hit = encode_with()
    assert hit and len(calls) == 1 and second == first
    import copy

    other_task = copy.deepcopy(task)
    other_task.prompt = "q : {question} a :"
    other_tokenizer = copy.deepcopy(tokenizer)
    other_tokenizer.add_tokens(["zebra"])
    changed_rows = [dict(r) for r in rows]
    changed_rows[3]["answer"] = "red"
    for change in ({"rows": changed_rows}, {"task": other_task}, {"tokenizer": other_tokenizer}, {"max_length": 40}, {"split": "test"}):
        before = len(calls)
        _, hit = encode_with(**change)
        assert not hit and len(calls) == before + 1, change
    assert len(list((tmp_path / "home" / "tokenized").glob("*.safetensors"))) == 6


def test_a_second_run_of_a_recipe_reads_its_tokenized_splits_from_the_cache(make_recipe, monkeypatch, tmp_path):
    from io import StringIO

    from rich.console import Console

    monkeypatch.setenv("PLUGTUNE_HOME", str(tmp_path / "home"))
    path = make_recipe(training={"max_steps": 1, "batch_size": 4, "device": "cpu", "eval_before": False})
    outputs = []
    for _ in range(2):
        buffer = StringIO()
        plugtune.run(plugtune.load_recipe(path), console=Console(file=buffer), show_progress=False, overwrite=True)
        outputs.append(buffer.getvalue())
    assert "tokenized rows from the cache" not in outputs[0]
    assert "train: tokenized rows from the cache" in outputs[1] and "test: tokenized rows from the cache" in outputs[1]


def _count_calls(monkeypatch, owner, name: str, counter: list) -> None:
    """Replace ``owner.name`` by a wrapper that appends to ``counter`` on each call."""
    real = getattr(owner, name)

    def counting(*args, **kwargs):
        counter.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)


def _sft_with_long_rows(folder: Path, tiny_data: Path) -> Path:
    """The tiny SFT data with every fifth question too long for max_length 48."""
    rows = [json.loads(line) for line in (tiny_data / "sft.jsonl").read_text().splitlines()]
    rows = [{**r, "question": r["question"] + " very" * 60} if i % 5 == 0 else r for i, r in enumerate(rows)]
    path = folder / "sft-long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_overlong_drop_tokenizes_each_row_once_and_a_cache_hit_tokenizes_nothing(make_recipe, tiny_data, monkeypatch, tmp_path):
    """``training.overlong: drop`` encodes every row once (its full length decides, and a row
    that fits keeps that encoding); a rerun reads the outcome from the cache: no tokenizer
    call, the same dropped counts printed, the same rows (the same adapter, byte for byte),
    all as a run without the cache. The tokenizer is fingerprinted once per run."""
    from io import StringIO

    import plugtune.data.tokenized_cache
    from plugtune.plugins.tasks.causal_lm import CausalLm
    import plugtune.training.train
    from rich.console import Console
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    monkeypatch.setenv("PLUGTUNE_HOME", str(tmp_path / "home"))
    encodes, tokenizer_calls, fingerprints = [], [], []
    _count_calls(monkeypatch, CausalLm, "encode", encodes)
    _count_calls(monkeypatch, PreTrainedTokenizerBase, "__call__", tokenizer_calls)
    _count_calls(monkeypatch, plugtune.data.tokenized_cache, "tokenizer_fingerprint", fingerprints)  # where the key is made
    monkeypatch.setattr(plugtune.training.train, "tokenizer_fingerprint", plugtune.data.tokenized_cache.tokenizer_fingerprint, raising=False)
    data = {"loader": "table", "options": {"path": str(_sft_with_long_rows(tmp_path, tiny_data)), "test_size": 0.25}}
    training = {"max_steps": 2, "batch_size": 8, "device": "cpu", "eval_before": False, "overlong": "drop", "max_length": 48}
    runs = []
    for cache in (True, True, False):
        encodes.clear(), tokenizer_calls.clear(), fingerprints.clear()
        buffer = StringIO()
        recipe = plugtune.load_recipe(make_recipe(data=data, training={**training, "cache_tokenized": cache}))
        result = plugtune.run(recipe, console=Console(file=buffer, width=200), show_progress=False, overwrite=True)
        manifest = json.loads((Path(result.adapter_dir) / MANIFEST_FILE).read_text())["training"]
        runs.append({"encodes": len(encodes), "tokenizer_calls": len(tokenizer_calls), "fingerprints": len(fingerprints),
                     "out": buffer.getvalue(), "rows": (manifest["train_rows"], manifest["test_rows"]),
                     "adapter": (Path(result.adapter_dir) / WEIGHTS_FILE).read_bytes()})
    first, hit, uncached = runs
    assert first["encodes"] == uncached["encodes"] == 256  # every row of both splits, once
    assert first["fingerprints"] == 1 and uncached["fingerprints"] == 0
    assert hit["encodes"] == hit["tokenizer_calls"] == 0 and hit["fingerprints"] == 1
    assert "train: tokenized rows from the cache" in hit["out"] and "test: tokenized rows from the cache" in hit["out"]
    dropped = [[line for line in run["out"].splitlines() if line.startswith("dropped ")] for run in runs]
    assert dropped[0] == dropped[1] == dropped[2] == [
        "dropped 38 train row(s) longer than 48 tokens (training.overlong: drop)",
        "dropped 14 test row(s) longer than 48 tokens (training.overlong: drop)"]
    assert first["rows"] == hit["rows"] == uncached["rows"] == (192 - 38, 64 - 14)
    assert first["adapter"] == hit["adapter"] == uncached["adapter"]


@pytest.mark.parametrize("classification", [False, True], ids=["causal-lm", "classification"])
def test_overlong_drop_keeps_exactly_the_rows_and_encodings_of_a_separate_length_check(tiny_llama, tiny_bert, tiny_data,
                                                                                      classification):
    """What the one-pass ``prepare_split`` replaces: measure every row at full length, leave
    out the long ones, encode the rest at max_length. Same rows, same ids, same counts; a
    classifier's truncation (which keeps [SEP]) never applies to a row that fits."""
    from plugtune.data.datacheck import UNLIMITED, prepare_split
    from plugtune.data.tasks import build_task

    if classification:
        task = build_task(dict(type="sequence-classification", text="{text}", labels=["negative", "positive"]))
        tokenizer = load_base(str(tiny_bert), task).tokenizer
        rows = [{"text": " ".join(["the film was great"] * (i % 7) * 4) + f" film {i}", "label": ["negative", "positive"][i % 2]}
                for i in range(30)]
    else:
        task = build_task(dict(type="causal-lm", prompt="question : {question} answer :", response=" {answer}"))
        tokenizer = load_base(str(tiny_llama), task).tokenizer
        rows = [json.loads(line) for line in (tiny_data / "sft.jsonl").read_text().splitlines()][:30]
        rows = [{**r, "question": r["question"] + " very" * (i % 7) * 4} for i, r in enumerate(rows)]
    max_length = 30
    fits = [r for r in rows if len(task.encode(r, tokenizer, UNLIMITED)["input_ids"]) <= max_length]
    assert 0 < len(fits) < len(rows)
    expected_rows, expected_cut = encode_split(fits, task, tokenizer, max_length, "train")
    prepared = prepare_split(rows, task, tokenizer, max_length, "drop", "train")
    assert (prepared.rows, prepared.cut, prepared.dropped, prepared.error) == (expected_rows, expected_cut, len(rows) - len(fits), None)
    refused = prepare_split(rows, task, tokenizer, max_length, "refuse", "train")
    assert refused.rows == [] and refused.error.startswith(f"train split: {len(rows) - len(fits)} row(s) are longer than 30 tokens")
    assert prepare_split(fits, task, tokenizer, max_length, "refuse", "train").rows == expected_rows


# -- hardware defaults -------------------------------------------------------------------


def test_hardware_defaults_and_overrides():
    assert choose_threads(None, physical=16) == 16
    assert choose_threads(None, physical=16, local_processes=4) == 4
    assert choose_threads(None, physical=2, local_processes=4) == 1
    assert choose_threads(3, physical=16) == 3
    assert choose_precision("auto", on_cuda=False) == "no"
    assert choose_precision("auto", on_cuda=True, bf16_supported=True) == "bf16"
    assert choose_precision("auto", on_cuda=True, bf16_supported=False) == "fp16"
    assert choose_precision("bf16", on_cuda=False) == "bf16"
    assert choose_attention("auto", on_cuda=True) == "sdpa"
    assert choose_attention("auto", on_cuda=False) is None
    assert choose_attention("eager", on_cuda=True) == "eager"


def test_plugtune_cores_shares_a_machine_between_jobs(monkeypatch):
    from plugtune.kernel.errors import PlugtuneError

    monkeypatch.setenv("PLUGTUNE_CORES", "3")
    assert choose_threads(None) == 3 and choose_threads(None, local_processes=2) == 1 and choose_threads(5) == 5
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv("PLUGTUNE_CORES", bad)
        with pytest.raises(PlugtuneError, match="PLUGTUNE_CORES"):
            choose_threads(None)


def test_grouped_query_sdpa_gives_the_same_loss_and_gradients_and_saves_less(tiny_llama, monkeypatch):
    """The tiny Llama has 4 query heads and 2 key/value heads: with the switch on, SDPA gets
    the 2 heads as they are, so the repeated keys and values are not saved for backward."""
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv(FORCE_GQA, raising=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="sdpa")
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = torch.randint(3, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a padded row: the mask goes to the kernel with the grouped heads

    def step(gqa: bool) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        model.zero_grad()
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with grouped_query_sdpa(gqa), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], sum(saved.values())

    plain_loss, plain_grads, plain_saved = step(False)
    gqa_loss, gqa_grads, gqa_saved = step(True)
    assert os.environ.get(FORCE_GQA) is None  # restored
    torch.testing.assert_close(gqa_loss, plain_loss, rtol=0, atol=1e-6)
    for a, b in zip(gqa_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    layers, batch, width, head_dim = model.config.num_hidden_layers, 3, 12, model.config.head_dim
    repeated = 2 * (model.config.num_attention_heads - model.config.num_key_value_heads) * head_dim * batch * width * 4
    assert plain_saved - gqa_saved >= layers * repeated  # the repeated keys and values of every layer


def test_cpu_runs_use_grouped_query_sdpa_and_leave_the_environment_as_it_was(make_recipe, monkeypatch):
    seen: list[str | None] = []
    monkeypatch.delenv(FORCE_GQA, raising=False)
    import plugtune.training.train

    original = plugtune.training.train.epoch_batches
    monkeypatch.setattr("plugtune.training.train.epoch_batches", lambda *a, **k: seen.append(os.environ.get(FORCE_GQA)) or original(*a, **k))
    training = {"max_steps": 1, "device": "cpu", "eval_before": False}
    plugtune.run(plugtune.load_recipe(make_recipe(training=training)), show_progress=False)
    assert seen == ["1"] and FORCE_GQA not in os.environ
    for attention in ("sdpa", "eager"):  # asked for by name: transformers' own path, unchanged
        plugtune.run(plugtune.load_recipe(make_recipe(training={**training, "attention": attention})), show_progress=False, overwrite=True)
    assert seen == ["1", None, None]
    monkeypatch.setenv(FORCE_GQA, "0")  # the user's own setting wins
    plugtune.run(plugtune.load_recipe(make_recipe(training=training)), show_progress=False, overwrite=True)
    assert seen == ["1", None, None, "0"] and os.environ[FORCE_GQA] == "0"


_FREED_MEMORY_PROBE = """
import sys, torch
from plugtune.training.runtime import set_mmap_threshold
def rss_mb():
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) / 1024
applied = set_mmap_threshold(int(sys.argv[1]) or None)
torch.empty(4 << 20).fill_(1)  # a freed 16 MiB block: glibc's dynamic threshold rises to it
start = rss_mb()
big, small = [], []
for _ in range(100):  # 200 MiB of 2 MiB activations, small tensors allocated between them
    big.append(torch.ones(512 * 1024))
    small.append(torch.ones(16 * 1024))  # 64 KiB: too big for glibc's tcache, so it comes from the heap's top
peak = rss_mb()
del big
print(applied, peak - start, rss_mb() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_mmap_threshold_gives_freed_activations_back_to_the_os():
    """What ``training.malloc_mmap_threshold`` buys: with glibc's dynamic threshold, 2 MiB
    tensors freed under live small ones stay in the process; with a fixed 1 MiB threshold
    they are unmapped when freed."""

    def probe(threshold: int) -> tuple[str, float, float]:
        done = subprocess.run([sys.executable, "-c", _FREED_MEMORY_PROBE, str(threshold)], capture_output=True, text=True, check=True)
        applied, grown, kept = done.stdout.split()
        return applied, float(grown), float(kept)

    # glibc's heap usually keeps the freed blocks; not always (when brk cannot grow in place,
    # the heap continues in separate mappings that can be given back): one of three must keep them
    defaults = [probe(0) for _ in range(3)]
    assert all(applied == "False" and grown > 190 for applied, grown, _ in defaults)
    assert any(kept > 150 for _, _, kept in defaults), defaults  # the heap kept the freed blocks
    applied, grown, kept = probe(1 << 20)
    assert applied == "True" and grown > 190 and kept < 20  # unmapped on free


_REUSED_MEMORY_PROBE = """
import resource, sys, torch
from plugtune.training.runtime import keep_freed_heap
applied = keep_freed_heap() if sys.argv[1] == "keep" else False
def step():  # activations of 1-4 MiB with small tensors between them, all freed at the end
    big, small = [], []
    for i in range(48):
        big.append(torch.ones(256 * 1024 * (1 + i % 4)))
        small.append(torch.ones(16 * 1024))
    del big, small
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_the_kept_heap_lets_each_step_reuse_the_pages_the_last_one_freed():
    """What ``malloc_mmap_threshold: auto`` buys: under glibc's defaults every step of freed
    and reallocated activations faults its pages in afresh (unmapped or trimmed when freed);
    with the heap kept, the steps after the first fault almost none."""

    def faults(mode: str) -> tuple[str, int]:
        done = subprocess.run([sys.executable, "-c", _REUSED_MEMORY_PROBE, mode], capture_output=True, text=True, check=True)
        applied, count = done.stdout.split()
        return applied, int(count)

    applied, default_faults = faults("default")
    assert applied == "False" and default_faults > 10_000  # 5 steps of 120 MiB: most pages faulted again
    applied, kept_faults = faults("keep")
    assert applied == "True" and kept_faults < default_faults / 10, (default_faults, kept_faults)


def test_a_run_applies_the_recipe_host_memory_setting(make_recipe, monkeypatch):
    applied: list[tuple] = []
    monkeypatch.setattr("plugtune.training.train.configure_host_allocator",
                        lambda setting, on_cuda: applied.append((setting, on_cuda)) or f"did {setting}")
    training = {"max_steps": 1, "device": "cpu", "eval_before": False}
    result = plugtune.run(plugtune.load_recipe(make_recipe(training=training)), show_progress=False)
    plugtune.run(plugtune.load_recipe(make_recipe(training={**training, "malloc_mmap_threshold": 1 << 20})), show_progress=False, overwrite=True)
    assert applied == [("auto", False), (1 << 20, False)]  # the kept heap unless asked otherwise
    manifest = json.loads((Path(result.adapter_dir) / MANIFEST_FILE).read_text())
    assert manifest["training"]["host_memory"] == f"did {1 << 20}"  # the last run's, recorded


@pytest.mark.parametrize("value", [-1, (32 << 20) + 1, "fast", True, 1.5])
def test_a_bad_host_memory_setting_is_one_line_at_validation(make_recipe, value):
    with pytest.raises(plugtune.RecipeError) as caught:
        plugtune.load_recipe(make_recipe(training={"max_steps": 1, "malloc_mmap_threshold": value}))
    message = str(caught.value)
    assert "training.malloc_mmap_threshold" in message and "must be auto, null, or a byte count" in message
    assert message.count("malloc_mmap_threshold") == 1  # one problem, not one per branch of the union


def test_recipe_threads_setting_is_applied(make_recipe):
    before = torch.get_num_threads()
    try:
        plugtune.run(plugtune.load_recipe(make_recipe(training={"max_steps": 1, "device": "cpu", "threads": 1, "eval_before": False})),
                     show_progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# -- data parallel -----------------------------------------------------------------------


# Two gloo processes under ddp against one process: tests/test_fsdp.py (its full fine-tuning runs).


def test_nproc_must_be_a_process_count(make_recipe, capsys):
    from plugtune.cli import main

    assert main(["run", str(make_recipe()), "--nproc", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --nproc: 0 is not a process count; use 1 or more"


@pytest.mark.parametrize("method", [None, {"name": "prefix", "options": {"num_virtual_tokens": 4}}], ids=["lora", "prefix"])
def test_evaluation_with_label_position_logits_gives_the_same_batches_and_metrics(tiny_llama, tiny_data, make_recipe, method):
    from plugtune.training.evaluation import evaluate
    from plugtune.training.loss import eval_batch_at_labels, output_head

    model, rows, pad = _rows(tiny_llama, tiny_data, make_recipe, method)
    recipe = plugtune.load_recipe(make_recipe())
    batch = collate(rows, pad, False)
    with torch.no_grad():
        plain = recipe.task.eval_batch(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)
    at_labels = eval_batch_at_labels(model, output_head(model), batch)
    assert at_labels.predictions == plain.predictions and at_labels.references == plain.references
    assert at_labels.n_targets == plain.n_targets and at_labels.loss_sum == pytest.approx(plain.loss_sum, abs=1e-4)
    assert at_labels.scores == pytest.approx(plain.scores, abs=1e-5)
    assert at_labels.losses == pytest.approx(plain.losses, abs=1e-5)
    metrics = [evaluate(model, rows, recipe.task, [b.build(recipe.task) for b in recipe.evaluators], batch_size=5, pad_id=pad,
                        device=torch.device("cpu"), logits_on_labels_only=flag) for flag in (False, True)]
    assert metrics[0].keys() == metrics[1].keys() and metrics[1] == pytest.approx(metrics[0], rel=1e-6, abs=1e-5)  # perplexity ~69
