"""`base_model: <adapter folder>`: the adapter is merged into its own base, which becomes the
base of the next recipe (continued pre-training, then a task on top)."""

from __future__ import annotations

import json

import pytest
import torch

import plugtune
from plugtune.kernel.errors import ModelError
from plugtune.serving.host import AdapterHost
from plugtune.artifacts.models import load_base
from plugtune.data.tasks import build_task

TEXTS = ["question : what is the colour of the sea ? answer : blue"]


@pytest.mark.parametrize("method", [{"name": "lora", "options": {"r": 4, "target_modules": "all-linear"}},
                                    {"name": "full", "options": {"top_layers": 1}},
                                    {"name": "dora", "options": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
                                    {"name": "oft", "options": {"r": 0, "block_size": 4, "target_modules": ["q_proj"]}}])
def test_fine_tune_on_top_of_an_earlier_adapter(method, make_recipe, tmp_path, tiny_llama):
    stage1 = plugtune.run(make_recipe(name="stage1", method=method), show_progress=False)
    merged = load_base(str(stage1.adapter_dir), build_task(dict(type="causal-lm", prompt="{q}", response="{a}")))
    plain = load_base(str(tiny_llama), build_task(dict(type="causal-lm", prompt="{q}", response="{a}")))
    assert merged.info.fingerprint != plain.info.fingerprint
    assert merged.info.parent["adapter"] == "stage1" and merged.info.parent["base"]["fingerprint"] == plain.info.fingerprint
    assert not any("lora_" in n for n, _ in merged.model.named_parameters())  # merged, not wrapped

    # the merged base gives what the stage-1 adapter gave on its own base
    host1 = AdapterHost.from_adapters(stage1.adapter_dir)
    enc = merged.tokenizer(TEXTS, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged.model.eval()(**enc).logits, host1.logits(TEXTS), atol=1e-5, rtol=0)

    stage2 = plugtune.run(make_recipe(name="stage2", base_model=str(stage1.adapter_dir)), show_progress=False)
    manifest = json.loads((stage2.adapter_dir / "plugtune.json").read_text())
    assert manifest["base_model"]["id"] == str(stage1.adapter_dir)
    assert manifest["base_model"]["parent"]["method"] == method["name"]
    host2 = AdapterHost.from_adapters(stage2.adapter_dir)  # rebuilds the merged base, then attaches
    assert host2.base.info.fingerprint == merged.info.fingerprint
    with pytest.raises(plugtune.AdapterError, match="was trained on base"):
        host2.load(stage1.adapter_dir, name="other")  # stage 1 belongs to the plain base


def test_a_prefix_adapter_cannot_become_a_base(make_recipe):
    stage1 = plugtune.run(make_recipe(name="p1", method={"name": "prefix", "options": {"num_virtual_tokens": 2}}), show_progress=False)
    with pytest.raises(ModelError, match="prefix adapters cannot be merged into a base"):
        load_base(str(stage1.adapter_dir), build_task(dict(type="causal-lm", prompt="{q}", response="{a}")))
