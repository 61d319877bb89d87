"""The adapter artifact and the adapter host, on tiny models: peft compatibility, strict
loading, switching between resident adapters."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import plugtune
from plugtune.artifacts.adapters import MANIFEST_FILE, WEIGHTS_FILE, read_adapter
from plugtune.kernel.errors import AdapterError
from plugtune.serving.host import AdapterHost
from plugtune.testing import build_tiny_llama

TEXTS = ["question : what is the colour of the sky ? answer : blue", "the film was great"]


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, tiny_llama, tiny_data):
    """Two LoRA adapters trained on the tiny Llama with different seeds and ranks."""
    import yaml

    from plugtune.testing import recipe_dict

    root = tmp_path_factory.mktemp("adapters")
    dirs = []
    for name, seed, r in (("alpha", 0, 4), ("beta", 1, 2)):
        recipe = recipe_dict(tiny_llama, tiny_data, name=name)
        recipe["training"]["seed"] = seed
        recipe["method"]["options"]["r"] = r
        recipe["output"] = {"dir": str(root / name)}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        result = plugtune.run(path, show_progress=False)
        dirs.append(result.adapter_dir)
    return dirs


def test_artifact_layout_and_manifest(two_adapters, tiny_llama):
    alpha = two_adapters[0]
    assert sorted(p.name for p in alpha.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "plugtune.json"]
    manifest = json.loads((alpha / MANIFEST_FILE).read_text())
    assert manifest["method"]["name"] == "lora"
    assert manifest["method"]["distribution"] == "plugtune"
    assert manifest["method"]["options"]["r"] == 4
    assert manifest["base_model"]["id"] == str(tiny_llama)
    assert manifest["base_model"]["fingerprint"].startswith("sha256:")
    assert manifest["task"]["type"] == "causal-lm"
    assert manifest["recipe"]["name"] == "alpha"
    assert set(manifest["metrics"]) == {"before", "after"}
    assert manifest["files"][WEIGHTS_FILE]["bytes"] == (alpha / WEIGHTS_FILE).stat().st_size
    # only LoRA tensors are stored, and training moved lora_B away from its zero init
    state = read_adapter(alpha).state
    assert state and all("lora_" in k for k in state)
    assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)
    lines = (alpha / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines if json.loads(l)["event"] == "train"] == list(range(1, 9))


def test_plain_peft_loads_the_adapter_with_identical_logits(two_adapters, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    alpha = two_adapters[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, alpha).eval()
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = peft_model(**enc).logits

    host = AdapterHost.from_adapters(alpha)
    got = host.logits(TEXTS, adapter="alpha")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # and the adapter really changes the output
    assert (host.logits(TEXTS, adapter=None) - got).abs().max() > 1e-3


def test_switching_between_resident_adapters_is_exact(two_adapters, tiny_llama):
    host = AdapterHost.from_adapters(*two_adapters)
    assert set(host.adapters) == {"alpha", "beta"}
    assert host.active == "alpha"  # the first adapter given is active
    first = host.logits(TEXTS)
    base = host.logits(TEXTS, adapter=None)
    a = host.logits(TEXTS, adapter="alpha")
    b = host.logits(TEXTS, adapter="beta")
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(first, a, atol=0, rtol=0)
    for name, expected in (("beta", b), (None, base), ("alpha", a), ("beta", b), (None, base)):
        torch.testing.assert_close(host.logits(TEXTS, adapter=name), expected, atol=1e-6, rtol=0)

    # a fresh base with only beta gives beta's logits: adapters do not leak into each other
    solo = AdapterHost.from_adapters(two_adapters[1])
    torch.testing.assert_close(solo.logits(TEXTS, adapter="beta"), b, atol=1e-5, rtol=0)

    # unloading gives the bare base back
    host.unload("alpha")
    host.unload("beta")
    assert host.adapters == {}
    torch.testing.assert_close(host.logits(TEXTS), base, atol=1e-6, rtol=0)


def test_generate_with_one_adapter_per_row_matches_each_alone(two_adapters):
    host = AdapterHost.from_adapters(*two_adapters)
    prompts = ["what is the colour of the sky ?", "what is the colour of the grass ?", "what is the colour of the sun ?"]
    mixed = host.generate(prompts, ["alpha", "beta", None], max_new_tokens=4)
    alone = [host.generate([p], name, max_new_tokens=4)[0] for p, name in zip(prompts, ["alpha", "beta", None])]
    assert mixed == alone
    assert host.format_prompt("hi", "alpha") == "question : hi answer :"


def test_refuses_adapter_for_another_base(two_adapters, tmp_path):
    other = build_tiny_llama(tmp_path / "other-llama", seed=123)
    host = AdapterHost.from_base(str(other), plugtune.data.tasks.build_task(dict(type="causal-lm", prompt="{q}", response="{a}")))
    with pytest.raises(AdapterError, match=r"was trained on base .* but the resident base is"):
        host.load(two_adapters[0])


def test_refuses_truncated_weights(two_adapters, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(two_adapters[0], broken)
    data = (broken / WEIGHTS_FILE).read_bytes()
    (broken / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated or replaced"):
        read_adapter(broken)
    # without the manifest's size, the header's byte ranges give the truncation away
    with pytest.raises(AdapterError, match=r"the tensors need \d+ bytes of data but the file holds \d+ \(truncated\)"):
        read_adapter(broken, verify_hashes=False)


def test_refuses_adapter_whose_method_plugin_is_missing(two_adapters, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(two_adapters[0], moved)
    manifest = json.loads((moved / MANIFEST_FILE).read_text())
    manifest["method"].update(name="dora-x", distribution="plugtune-dora", version="9.9")
    (moved / MANIFEST_FILE).write_text(json.dumps(manifest))
    host = AdapterHost.from_adapters(two_adapters[1])
    with pytest.raises(AdapterError, match=r"tuning method 'dora-x' from distribution plugtune-dora 9.9, which is not installed"):
        host.load(moved)


def test_refuses_pickle_only_adapter(two_adapters, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(two_adapters[0], pickled)
    (pickled / WEIGHTS_FILE).unlink()
    torch.save({}, pickled / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle files are not loaded"):
        read_adapter(pickled)


def test_classification_adapter_classifies(make_recipe):
    result = plugtune.run(make_recipe(classification=True), show_progress=False)
    host = AdapterHost.from_adapters(result.adapter_dir)
    out = host.classify(["the film was great wonderful", "the plot was awful dull"])
    assert [set(o["scores"]) for o in out] == [{"negative", "positive"}] * 2
    assert all(abs(sum(o["scores"].values()) - 1) < 1e-5 for o in out)
    assert host.adapters["tiny"].task.labels == ["negative", "positive"]
