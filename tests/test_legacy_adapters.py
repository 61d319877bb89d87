"""Adapters saved before the plugin contract was made explicit still load and give the same
logits: the manifest, the task dict and each method's tensors and config are read by
today's tasks, handlers and host exactly as they were written then (see
tests/fixtures/legacy_adapters/README.md for how they were made)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from plugtune.artifacts.adapters import read_manifest
from plugtune.data.tasks import build_task
from plugtune.serving.host import AdapterHost

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_adapters"
EXPECTED = json.loads((FIXTURES / "expected_logits.json").read_text())


@pytest.mark.parametrize("name", ["lora", "full", "prefix", "lora-cls"])
def test_an_adapter_saved_before_issue_12_gives_the_logits_it_gave_then(name: str, tiny_llama: Path, tiny_bert: Path) -> None:
    folder = FIXTURES / name
    manifest = read_manifest(folder)
    classification = name.endswith("-cls")
    host = AdapterHost.from_base(str(tiny_bert if classification else tiny_llama), build_task(manifest.task), device="cpu")
    assert host.base.info.fingerprint == manifest.base_model.fingerprint  # the same tiny base, rebuilt
    host.load(folder)
    texts = EXPECTED["cls_texts"] if classification else EXPECTED["texts"]
    got = host.logits(texts, name)
    want = torch.tensor(EXPECTED["logits"][name])
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5), f"{name}: max |diff| {float((got - want).abs().max()):.2e}"
    assert not torch.allclose(host.logits(texts, None), want, atol=1e-3)  # the adapter really changes the output
