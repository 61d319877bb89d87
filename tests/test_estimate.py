"""``plugtune estimate`` and validate's estimate line (core/training/estimate.py), on the tiny
models: no weights read, the parts, how they move with the recipe, quantized bases, one real
run against its estimate, the warning, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from plugtune.cli import main
from plugtune.testing import recipe_dict
from plugtune.training.estimate import Estimate, estimate, parse_bytes, trace_step
from plugtune.training.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, raw: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def estimate_of(tmp_path: Path, base: Path, data: Path, *overrides: str, **sections) -> Estimate:
    raw = recipe_dict(base, data, **sections)
    raw["output"] = {"dir": str(tmp_path / "out")}
    return estimate(load_recipe(write(tmp_path, raw, f"r{len(list(tmp_path.glob('*.yaml')))}.yaml"), list(overrides)))


@pytest.fixture(scope="module")
def weightless_llama(tiny_llama: Path, tmp_path_factory) -> Path:
    """The tiny llama's folder without its weights file: an estimate that read a weight fails."""
    folder = tmp_path_factory.mktemp("weightless") / "llama"
    shutil.copytree(tiny_llama, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    return folder


def test_reads_no_weights_and_parts_add_up(weightless_llama, tiny_data, tmp_path) -> None:
    assert not list(weightless_llama.glob("*.safetensors"))
    est = estimate_of(tmp_path, weightless_llama, tiny_data)
    assert est.train_peak == sum(est.parts.values()) and est.peak == max(est.train_peak, est.load_peak)
    assert set(est.parts) == {"framework", "base weights", "trainable parameters", "gradients", "optimizer state",
                              "method state", "activations", "logits"}
    assert all(v >= 0 for v in est.parts.values()) and est.parts["activations"] > 0
    # LoRA on every linear layer: fp32 parameters, gradients the same, AdamW two moments
    assert est.parts["gradients"] == est.parts["trainable parameters"] == 4 * est.trainable_parameters
    assert est.parts["optimizer state"] == 2 * est.parts["trainable parameters"]
    assert 0 < est.trainable_parameters < est.total_parameters
    assert est.parts["base weights"] == 4 * (est.total_parameters - est.trainable_parameters)
    assert est.seconds_per_step > 0 and est.step_flops > 0
    assert est.batch.rows == 8 and 0 < est.batch.length <= 48


def test_lora_below_full_fine_tuning(tiny_llama, tiny_data, tmp_path) -> None:
    lora = estimate_of(tmp_path, tiny_llama, tiny_data)
    full = estimate_of(tmp_path, tiny_llama, tiny_data, method={"name": "full", "options": {}})
    assert full.trainable_parameters == full.total_parameters > 2 * lora.trainable_parameters
    assert full.parts["optimizer state"] > lora.parts["optimizer state"]
    assert full.train_peak - full.parts["framework"] > lora.train_peak - lora.parts["framework"]
    assert full.step_flops > lora.step_flops  # weight gradients of every layer
    assert not full.notes  # full's prepare ran on the meta model
    assert full.parts["method state"] == full.parts["trainable parameters"] > 0  # its copy of the initial weights
    assert lora.parts["method state"] == 0


def test_grows_with_batch_size_and_length(tiny_llama, tiny_data, tmp_path) -> None:
    small = estimate_of(tmp_path, tiny_llama, tiny_data, "training.batch_size=2")
    large = estimate_of(tmp_path, tiny_llama, tiny_data, "training.batch_size=16")
    assert large.batch.rows == 16 and small.batch.rows == 2
    assert large.parts["activations"] > 4 * small.parts["activations"]
    long_answers = tmp_path / "long"  # answers of 1 to 30 words: rows longer than the cut below
    long_answers.mkdir()
    (long_answers / "sft.jsonl").write_text("".join(
        json.dumps({"question": "what is the colour of the sky ?", "answer": " ".join(["blue"] * (1 + i % 30))}) + "\n"
        for i in range(64)))
    short = estimate_of(tmp_path, tiny_llama, long_answers, "training.max_length=16")
    long = estimate_of(tmp_path, tiny_llama, long_answers, "training.max_length=48")
    assert short.batch.length == 16 < long.batch.length
    assert long.parts["activations"] > short.parts["activations"]
    assert long.step_flops > short.step_flops


def test_full_logits_without_label_positions(tiny_llama, tiny_data, tmp_path) -> None:
    at_labels = estimate_of(tmp_path, tiny_llama, tiny_data)
    everywhere = estimate_of(tmp_path, tiny_llama, tiny_data, "training.logits_on_labels_only=false")
    assert everywhere.parts["logits"] > 2 * at_labels.parts["logits"]


def test_classifier_head(tiny_bert, tiny_data, tmp_path) -> None:
    est = estimate_of(tmp_path, tiny_bert, tiny_data, classification=True)
    assert est.parts["logits"] == 0 and est.parts["activations"] > 0
    assert est.batch.label_tokens == 0


@pytest.mark.parametrize("name", ["int8", "qlora"])
def test_quantized_bases_take_fewer_bytes(name, tiny_llama, tiny_data, tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    from plugtune.kernel.components import BaseLoading
    from plugtune.kernel.registry import get_plugin_system

    method = get_plugin_system().find("method", name)
    assert method is not None
    options = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    hints = method.obj(method.obj.Options(**options)).memory_hints(BaseLoading())
    assert hints.linear_bytes_per_param < 4
    lora = estimate_of(tmp_path, tiny_llama, tiny_data, method={"name": "lora", "options": options})
    try:
        quantized = estimate_of(tmp_path, tiny_llama, tiny_data, method={"name": name, "options": options})
    except Exception as exc:  # noqa: BLE001 - bitsandbytes without a CPU backend: validation refuses the method
        pytest.skip(f"{name} cannot run here: {exc}")
    assert quantized.parts["base weights"] < lora.parts["base weights"]
    assert quantized.trainable_parameters == lora.trainable_parameters  # prepare ran on the meta model
    assert quantized.load_peak > 0  # the load converts: the checkpoint's pages and the quantized base at once


def test_meta_saved_tensors_match_a_real_step(tiny_llama, tiny_data, tmp_path) -> None:
    """What the meta step counts as saved for backward is what a real CPU step saves."""
    import copy

    import torch

    from plugtune.data.encoding import collate_rows
    from plugtune.kernel.components import PrepareContext
    from plugtune.training.estimate import build_meta_model
    from plugtune.training.preview import build_preview, local_tokenizer
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(write(tmp_path, recipe_dict(tiny_llama, tiny_data)))
    found = local_tokenizer(str(tiny_llama))
    preview = build_preview(recipe, found, splits=("train",))
    batch = collate_rows(preview.task, preview.splits["train"].encoded[:8], found.tokenizer.pad_token_id)
    batch.pop("attention_mask")  # the meta step runs without it; compare like with like
    real = AutoModelForCausalLM.from_pretrained(tiny_llama)
    meta = build_meta_model(real.config, "lm", 2, torch.float32, found.tokenizer.pad_token_id)
    models = [recipe.method.build().prepare(m, preview.task, PrepareContext()) for m in (real, meta)]
    traced_meta = trace_step(models[1], copy.deepcopy(batch), label_only=True)
    params = {p.data_ptr() for p in models[0].parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    from plugtune.training.loss import label_token_losses

    models[0].train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses, _ = label_token_losses(models[0], batch)
    real_bytes = sum(saved.values())
    assert 0.8 < (traced_meta.activations + traced_meta.logits) / real_bytes < 1.5  # 1.16 on the tiny llama


def test_estimate_near_a_real_run(tiny_llama, tiny_data, tmp_path) -> None:
    """A real 2-step run in a child process: its peak RSS is within a loose factor of the
    estimate, which is made in another child the same way."""
    from test_cli import plugtune

    raw = recipe_dict(tiny_llama, tiny_data)
    raw["output"] = {"dir": str(tmp_path / "out")}
    path = write(tmp_path, raw)
    overrides = ["training.max_steps=2", "training.eval_before=false", "training.max_eval_examples=8"]
    est = plugtune("estimate", path, *overrides, "--json")
    assert est.returncode == 0, est.stderr
    estimated = json.loads(est.stdout)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # The child's own peak from its /proc VmHWM, which starts afresh at exec; ru_maxrss (wait4)
    # carries over exec, so in a long pytest process it would report the parent's peak at fork.
    report = ("import sys; from plugtune.cli import main; code = main(sys.argv[1:]); "
              "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))); sys.exit(code)")
    child = subprocess.run([sys.executable, "-c", report, "run", str(path), *overrides, "--quiet"],
                           cwd=REPO, env=env, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    measured = int(child.stdout.strip().splitlines()[-1]) * 1024
    assert 0.6 < estimated["peak_bytes"] / measured < 1.6, (estimated["parts"], measured)


def test_validate_prints_the_estimate_line(tiny_llama, tiny_data, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("PLUGTUNE_AVAILABLE_MEMORY", raising=False)
    path = write(tmp_path, recipe_dict(tiny_llama, tiny_data))
    assert main(["validate", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = next(x for x in lines if x.startswith("estimate: "))
    assert line.startswith("estimate: peak RSS ") and " s/step (largest batch 8 x " in line and "available" in line
    assert not any(x.startswith("warning:") for x in lines)


def test_warning_when_it_does_not_fit(tiny_llama, tiny_data, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PLUGTUNE_AVAILABLE_MEMORY", "64M")
    path = write(tmp_path, recipe_dict(tiny_llama, tiny_data))
    assert main(["validate", str(path)]) == 0  # a warning, never a failure
    lines = capsys.readouterr().out.splitlines()
    warning = next(x for x in lines if x.startswith("warning: "))
    assert "exceeds the 64 MB available ($PLUGTUNE_AVAILABLE_MEMORY)" in warning
    assert main(["estimate", str(path)]) == 0
    assert "warning: the estimated peak RSS" in " ".join(capsys.readouterr().out.split())


def test_parse_bytes() -> None:
    assert parse_bytes("1024") == 1024 and parse_bytes("512M") == 512 << 20 and parse_bytes("1.5GB") == 3 << 29
    assert parse_bytes("8Gi") == 8 << 30
    for bad in ("", "lots", "-1G", "nanG"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_bad_input_is_one_line(tiny_llama, tiny_data, tmp_path, capsys, monkeypatch) -> None:
    """In this process (``main`` is what the ``plugtune`` script calls; the real-process exit
    paths are tests/test_cli.py's): the exit code and stderr's one error line."""
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def estimate(*args: object) -> tuple[int, list[str]]:
        code = main(["estimate", *map(str, args)])
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        return code, [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]

    code, lines = estimate(tmp_path / "missing.yaml")
    assert code == 2 and len(lines) == 1 and "missing.yaml" in lines[0]
    path = write(tmp_path, recipe_dict(tiny_llama, tiny_data))
    code, lines = estimate(path, "training.batch_size=0")
    assert code == 2 and ": training.batch_size: Input should be greater than 0" in lines[0]
    absent = write(tmp_path, recipe_dict("nobody/no-such-model", tiny_data), "absent.yaml")
    assert estimate(absent) == (4, [
        "error: base_model: nobody/no-such-model is neither a folder here nor in the local Hugging Face cache; "
        "the estimate needs the tokenizer and configuration (never the weights)"])
    monkeypatch.setenv("PLUGTUNE_AVAILABLE_MEMORY", "lots")
    assert estimate(path) == (2, ["error: $PLUGTUNE_AVAILABLE_MEMORY: 'lots' is not a size; give bytes or e.g. 512M, 8G"])


def test_validate_says_why_the_estimate_skipped(tiny_data, tmp_path, capsys) -> None:
    path = write(tmp_path, recipe_dict("nobody/no-such-model", tiny_data))
    assert main(["validate", str(path)]) == 0
    assert any(x.startswith("estimate skipped: base_model: nobody/no-such-model") for x in capsys.readouterr().out.splitlines())
