"""`plugtune export`: llama.cpp GGUF read back with gguf's own reader, the Ollama Modelfile,
the vLLM rewrite checked with peft, refusals with their reasons, hostile inputs.

The end-to-end check against a running vLLM (slow, skipped without bench/.venv-vllm) is at
the bottom; bench/export_check.py is the same on a trained SmolLM2 adapter."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from plugtune.artifacts.adapters import read_adapter, save_adapter  # noqa: E402
from plugtune.artifacts.export import CHATML, export_adapter, rotary_permute  # noqa: E402
from plugtune.artifacts.models import load_base  # noqa: E402
from plugtune.cli import main  # noqa: E402
from plugtune.data.tasks import build_task  # noqa: E402
from plugtune.kernel.errors import AdapterError, PlugtuneError  # noqa: E402
from plugtune.plugins.methods.lora import random_lora_adapter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = {"type": "causal-lm", "prompt": "question : {question} answer :", "response": " {answer}"}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base(tiny_llama):
    return load_base(str(tiny_llama), build_task(TASK), dtype=torch.float32)


@pytest.fixture(scope="module")
def lora(base, tmp_path_factory) -> Path:
    return random_lora_adapter(tmp_path_factory.mktemp("lora") / "tiny", base, build_task(TASK), r=4, alpha=8,
                               targets=ALL_LINEAR, seed=3, scale=0.5)


def _rewrite(adapter: Path, out: Path, *, config: dict | None = None, state: dict | None = None,
             method: dict | None = None, task: dict | None = None) -> Path:
    """A copy of ``adapter`` with its config, tensors, method record or task changed (saved
    through save_adapter, so the manifest's hashes are right)."""
    a = read_adapter(adapter)
    manifest = a.manifest.model_dump(exclude={"files", "created"})
    if method:
        manifest["method"] = {**manifest["method"], **method}
    if task:
        manifest["task"] = task
    return save_adapter(out, state=state if state is not None else a.state,
                        config={**a.config, **(config or {})}, manifest=manifest)


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# -- gguf ------------------------------------------------------------------------------------


def test_gguf_is_llama_cpp_lora_layout(lora, base, tmp_path):
    done = export_adapter(lora, "gguf", tmp_path / "out")
    assert done.files == ["tiny.gguf"]
    reader = gguf.GGUFReader(str(tmp_path / "out" / "tiny.gguf"))
    fields = _fields(reader)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == pytest.approx(8.0)
    tensors = {t.name: t for t in reader.tensors}
    state = read_adapter(lora).state
    cfg = base.model.config
    assert len(tensors) == 2 * len(ALL_LINEAR) * cfg.num_hidden_layers
    gguf_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for layer in range(cfg.num_hidden_layers):
        for hf, short in gguf_names.items():
            part = "self_attn" if hf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{hf}"
            a, b = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
            ta, tb = tensors[f"blk.{layer}.{short}.weight.lora_a"], tensors[f"blk.{layer}.{short}.weight.lora_b"]
            assert tuple(int(n) for n in ta.shape) == (a.shape[1], a.shape[0])  # ggml order: (in, r)
            assert tuple(int(n) for n in tb.shape) == (b.shape[1], b.shape[0])  # (r, out)
            assert ta.tensor_type == gguf.GGMLQuantizationType.F32
            assert torch.equal(torch.from_numpy(ta.data.copy()), a)
            expected_b = b
            if hf == "q_proj":
                expected_b = rotary_permute(b, cfg.num_attention_heads, cfg.num_attention_heads)
            elif hf == "k_proj":
                expected_b = rotary_permute(b, cfg.num_attention_heads, cfg.num_key_value_heads)
            assert torch.equal(torch.from_numpy(tb.data.copy()), expected_b)
            if hf in ("q_proj", "k_proj"):
                assert not torch.equal(expected_b, b)  # the permutation really moved rows


def test_gguf_rslora_and_alpha_pattern_folded_exactly(lora, tmp_path):
    """llama.cpp scales every pair by file alpha / rank: rsLoRA's alpha/sqrt(r) and a per-module
    alpha must come out the same from the GGUF as peft computes them."""
    pattern = {"model.layers.1.mlp.down_proj": 2.0}
    rs = _rewrite(lora, tmp_path / "rs", config={"use_rslora": True, "alpha_pattern": pattern})
    export_adapter(rs, "gguf", tmp_path / "out", dtype="f16")
    reader = gguf.GGUFReader(str(tmp_path / "out" / "tiny.gguf"))
    alpha = _fields(reader)["adapter.lora.alpha"]
    tensors = {t.name: t for t in reader.tensors}
    state = read_adapter(rs).state
    for key, name, peft_scaling in (("model.layers.0.mlp.up_proj", "blk.0.ffn_up.weight", 8 / 2),
                                    ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight", 2.0 / 2)):
        a, b = state[f"base_model.model.{key}.lora_A.weight"], state[f"base_model.model.{key}.lora_B.weight"]
        ga = torch.from_numpy(tensors[f"{name}.lora_a"].data.astype("float32"))
        gb = torch.from_numpy(tensors[f"{name}.lora_b"].data.astype("float32"))
        assert tensors[f"{name}.lora_a"].tensor_type == gguf.GGMLQuantizationType.F16
        llama_cpp_delta = (alpha / ga.shape[0]) * gb @ ga
        torch.testing.assert_close(llama_cpp_delta, peft_scaling * b @ a, rtol=2e-3, atol=2e-3)


def test_gguf_bf16(lora, tmp_path):
    export_adapter(lora, "gguf", tmp_path / "out", dtype="bf16")
    reader = gguf.GGUFReader(str(tmp_path / "out" / "tiny.gguf"))
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight.lora_a")
    assert t.tensor_type == gguf.GGMLQuantizationType.BF16
    values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    expected = read_adapter(lora).state["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"]
    torch.testing.assert_close(values.reshape(expected.shape), expected.to(torch.bfloat16).float())


def test_rotary_permutation_matches_the_packaged_smollm2_gguf():
    """The q/k row permutation is llama.cpp's: the HF weights transformers dequantized from
    the packaged SmolLM2 GGUF, permuted, equal that GGUF's own attn_q/attn_k exactly."""
    from safetensors import safe_open

    from plugtune.artifacts.models import converted_folder, local_location

    location = local_location("smollm2-135m")
    if location is None or not converted_folder(location).is_dir():
        pytest.skip("smollm2-135m is not fetched and converted here (plugtune fetch smollm2-135m)")
    reader = gguf.GGUFReader(str(location))
    heads, kv = int(_fields(reader)["llama.attention.head_count"]), int(_fields(reader)["llama.attention.head_count_kv"])
    weights = next(converted_folder(location).glob("*.safetensors"))
    with safe_open(str(weights), "pt") as fh:
        for hf, name, n_kv in (("q_proj", "attn_q", heads), ("k_proj", "attn_k", kv)):
            w = fh.get_tensor(f"model.layers.0.self_attn.{hf}.weight")
            t = next(t for t in reader.tensors if t.name == f"blk.0.{name}.weight")
            own = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(w.shape)
            assert torch.equal(rotary_permute(w, heads, n_kv), own)
            assert not torch.equal(w, own)


# -- ollama ----------------------------------------------------------------------------------


def test_ollama_modelfile_from_the_prompt_template(lora, tiny_llama, tmp_path):
    done = export_adapter(lora, "ollama", tmp_path / "out", base_gguf="smollm2:135m")
    assert done.files == ["Modelfile", "tiny.gguf"]
    text = (tmp_path / "out" / "Modelfile").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == ["FROM smollm2:135m", "ADAPTER ./tiny.gguf", 'TEMPLATE """question : {{ .Prompt }} answer :"""',
                     'PARAMETER stop "</s>"', "PARAMETER temperature 0"]
    done = export_adapter(lora, "ollama", tmp_path / "out2")  # no GGUF base: FROM the model folder, with a note
    assert f"FROM {Path(tiny_llama).resolve()}" in (tmp_path / "out2" / "Modelfile").read_text()
    assert any("--base-gguf" in n for n in done.notes)


def test_ollama_chatml_chat_template(lora, tmp_path):
    from plugtune.data.conversations import BUILTIN_TEMPLATES

    chat = build_task({"type": "chat", "template": "chatml"}).to_dict()
    chat["template_text"] = BUILTIN_TEMPLATES["chatml"]
    adapter = _rewrite(lora, tmp_path / "chat", task=chat)
    export_adapter(adapter, "ollama", tmp_path / "out")
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert f'TEMPLATE """{CHATML}"""' in text
    assert 'PARAMETER stop "<|im_start|>"' in text and 'PARAMETER stop "<|im_end|>"' in text


def test_odd_adapter_name_makes_a_safe_file_name(lora, tmp_path):
    a = read_adapter(lora)
    manifest = {**a.manifest.model_dump(exclude={"files", "created"}), "name": '../we ird"name'}
    odd = save_adapter(tmp_path / "odd", state=a.state, config=a.config, manifest=manifest)
    done = export_adapter(odd, "ollama", tmp_path / "out")
    assert done.files == ["Modelfile", "_we_ird_name.gguf"]
    assert "ADAPTER ./_we_ird_name.gguf" in (tmp_path / "out" / "Modelfile").read_text()


# -- vllm --------------------------------------------------------------------------------------


def _peft_logits(base_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_vllm_rewrite_folds_rslora_exactly(lora, tiny_llama, tmp_path):
    pattern = {"model.layers.1.mlp.down_proj": 2.0}
    rs = _rewrite(lora, tmp_path / "rs", config={"use_rslora": True, "alpha_pattern": pattern})
    done = export_adapter(rs, "vllm", tmp_path / "out")
    assert done.files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "plugtune.json"]  # the card too
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["alpha_pattern"] == {} and config["lora_alpha"] == pytest.approx(16.0)
    assert not config.get("modules_to_save") and not config["use_dora"]
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    before, after = _peft_logits(tiny_llama, rs, ids), _peft_logits(tiny_llama, tmp_path / "out", ids)
    bare = _peft_logits(tiny_llama, lora, ids)
    assert not torch.allclose(before, bare, atol=1e-4)  # rsLoRA and the pattern really change the answer
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    manifest = json.loads((tmp_path / "out" / "plugtune.json").read_text())
    assert manifest["exported"]["to"] == "vllm" and manifest["exported"]["original_config"]["use_rslora"] is True


def test_vllm_rewrite_still_loads_in_the_adapter_host(lora, tmp_path):
    from plugtune.serving.host import AdapterHost

    export_adapter(lora, "vllm", tmp_path / "out")
    host = AdapterHost.from_adapters(lora)
    host.load(tmp_path / "out", name="exported")
    prompts = ["what is the colour of the sky ?", "what is the colour of the grass ?"]
    assert host.generate(prompts, "exported", max_new_tokens=6) == host.generate(prompts, "tiny", max_new_tokens=6)


def test_vllm_takes_one_classification_head_and_refuses_other_whole_modules(lora, base, tmp_path):
    a = read_adapter(lora)
    head = {**a.state, "base_model.model.score.weight": torch.randn(3, base.model.config.hidden_size)}
    cls = _rewrite(lora, tmp_path / "cls", state=head, config={"modules_to_save": ["score"], "task_type": "SEQ_CLS"})
    done = export_adapter(cls, "vllm", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    assert any("pooling" in n for n in done.notes)
    with pytest.raises(AdapterError, match="a llama.cpp LoRA GGUF holds only lora_a/lora_b pairs"):
        export_adapter(cls, "gguf", tmp_path / "g")
    embed = {**a.state, "base_model.model.model.embed_tokens.weight": base.model.model.embed_tokens.weight.detach()}
    emb = _rewrite(lora, tmp_path / "emb", state=embed, config={"modules_to_save": ["embed_tokens"]})
    with pytest.raises(AdapterError, match=r"vLLM takes only one classification head named score or classifier"):
        export_adapter(emb, "vllm", tmp_path / "out2")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "g").exists()


# -- refusals ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dora(tiny_llama, base, tmp_path_factory) -> Path:
    """A real DoRA adapter: peft's own state and config (magnitude vectors and all)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    config = model.peft_config["default"].to_dict()
    manifest = {"name": "dora", "method": {"name": "dora", "options": {"r": 4, "alpha": 8}}, "base_model": base.info.to_dict(),
                "task": build_task(TASK).to_dict()}
    return save_adapter(tmp_path_factory.mktemp("dora") / "dora", state=get_peft_model_state_dict(model),
                        config=json.loads(json.dumps(config, default=list)), manifest=manifest)


@pytest.mark.parametrize("to", ["gguf", "vllm"])
def test_dora_refused_with_the_reason(dora, tmp_path, to):
    with pytest.raises(AdapterError, match=r"uses DoRA \(use_dora: true\): DoRA rescales each output column .* "
                                           r"no LoRA reproduces it exactly"):
        export_adapter(dora, to, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,reason", [
    ("prefix", r"a prefix adapter, and its handler \(\w+\) has no plain-LoRA form"),
    ("full", r"a full adapter, and its handler \(\w+\) has no plain-LoRA form"),
    ("loha", r"is a LOHA adapter: its update is not LoRA's scaling \* B A stored as factors"),
])
def test_other_methods_refused_with_the_reason(lora, tmp_path, method, reason):
    other = _rewrite(lora, tmp_path / method, method={"name": method, "options": {}},
                     config={"peft_type": "LOHA"} if method == "loha" else None)
    with pytest.raises(AdapterError, match=reason):
        export_adapter(other, "vllm", tmp_path / "out")


def test_adapter_on_an_adapter_refused(lora, tmp_path):
    a = read_adapter(lora)
    manifest = a.manifest.model_dump(exclude={"files", "created"})
    manifest["base_model"] = {**manifest["base_model"], "id": str(lora)}
    stacked = save_adapter(tmp_path / "stacked", state=a.state, config=a.config, manifest=manifest)
    with pytest.raises(AdapterError, match=r"was trained on another adapter .* `plugtune merge"):
        export_adapter(stacked, "vllm", tmp_path / "out")


def test_nan_factors_refused(lora, tmp_path):
    a = read_adapter(lora)
    state = dict(a.state)
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    bad = _rewrite(lora, tmp_path / "nan", state=state)
    with pytest.raises(AdapterError, match="hold nan or inf"):
        export_adapter(bad, "gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_base_changing_init_refused(lora, tmp_path):
    pissa = _rewrite(lora, tmp_path / "pissa", config={"init_lora_weights": "pissa"})
    with pytest.raises(AdapterError, match=r"initialised with pissa .* relative to that changed base"):
        export_adapter(pissa, "vllm", tmp_path / "out")


# -- hostile inputs, through the command line -----------------------------------------------------


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["export", *map(str, args)])
    return code, capsys.readouterr().err.strip()


def test_cli_writes_and_reports(lora, tmp_path, capsys):
    code = main(["export", str(lora), "--to", "gguf", "-o", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and "tiny.gguf" in out and (tmp_path / "out" / "tiny.gguf").is_file()


def test_cli_refusals_are_one_line_and_write_nothing(lora, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(lora, corrupt)
    data = bytearray((corrupt / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (corrupt / "adapter_model.safetensors").write_bytes(bytes(data))
    cases = [
        ((tmp_path / "missing", "--to", "gguf"), 5, "adapter folder not found"),
        ((tmp_path / "empty", "--to", "vllm"), 5, "is not an adapter: plugtune.json is missing"),
        ((corrupt, "--to", "vllm", "-o", tmp_path / "c"), 5, "does not match the manifest's sha256"),
        ((lora, "--to", "gguf", "-o", tmp_path / "busy"), 2, "already exists and is not empty; pass --overwrite"),
        ((lora, "--to", "gguf", "-o", tmp_path / "file"), 2, "exists and is not a folder"),
        ((lora, "--to", "vllm", "-o", lora), 2, "is the adapter"),
        ((lora, "--to", "vllm", "-o", lora / "inner"), 2, "is inside the adapter"),
        ((lora, "--to", "gguf", "-o", tmp_path / "file" / "x"), 2, "is not a folder"),
    ]
    for args, code, message in cases:
        got, err = _cli(capsys, *args)
        assert (got, len(err.splitlines())) == (code, 1), (args, err)
        assert err.startswith("error: ") and message in err, (args, err)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine" and sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["keep.txt"]
    assert not (tmp_path / "c").exists() and not (lora / "inner").exists()
    assert sorted(p.name for p in lora.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "plugtune.json"]
    code, err = _cli(capsys, lora, "--to", "gguf", "-o", tmp_path / "busy", "--overwrite")
    assert code == 0 and sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["tiny.gguf"]


# -- for real: vLLM's CPU build serves the exported adapter (slow) ---------------------------------

VLLM_PYTHON = ROOT / "bench" / ".venv-vllm" / "bin" / "python"


@pytest.mark.slow
def test_vllm_serves_the_export_like_the_adapter_host(tmp_path):
    """bench/export_check.py end to end: train 20 quickstart steps on SmolLM2, export --to vllm,
    serve it with vLLM's CPU build, and compare greedy answers with AdapterHost's."""
    if not VLLM_PYTHON.exists():
        pytest.skip("no vLLM here: bash bench/setup_vllm.sh builds bench/.venv-vllm")
    result = tmp_path / "check.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "export_check.py"), "--work", str(tmp_path / "work"),
                    "--json", str(result), "--prompts", "8"], check=True, timeout=1500)
    report = json.loads(result.read_text())
    assert report["prompts"] == 8
    assert report["vllm"]["equal"] >= 7, report  # fp32 on both sides; one near-tie may flip
