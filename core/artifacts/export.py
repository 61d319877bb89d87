"""Export an adapter to the servers people run: a llama.cpp LoRA GGUF, an Ollama Modelfile
beside it, or a peft LoRA folder that vLLM and LoRAX load.

    plugtune export adapters/quickstart --to gguf   [-o OUT] [--dtype f32|f16|bf16]
    plugtune export adapters/quickstart --to ollama [-o OUT] [--base-gguf PATH_OR_OLLAMA_NAME]
    plugtune export adapters/quickstart --to vllm   [-o OUT]

Every target applies plain LoRA only (``W x + scaling * B (A x)`` on linear layers), so the
core asks the adapter's handler for that form (the
:class:`~plugtune.kernel.components.ExportsLora` capability), never a method's name: a handler
without it, or an adapter it cannot give exactly (DoRA, multiplicative tuners, inits that
changed the base), is refused with the reason in one line, and nothing is written.

What each target gets, and the rules it follows:

* ``gguf``: one file ``OUT/<name>.gguf`` laid out as llama.cpp's own
  ``convert_lora_to_gguf.py`` writes it: ``general.type = adapter``, ``adapter.type = lora``,
  ``adapter.lora.alpha`` (float32), ``general.architecture`` the base's; tensors
  ``blk.N.attn_q.weight.lora_a`` (A, ggml shape ``(in, r)``) and ``.lora_b`` (B, ``(r, out)``),
  named through the ``gguf`` package's :class:`gguf.TensorNameMap`; for the Llama family the
  rows of B of ``q_proj``/``k_proj`` are permuted as the converter permutes the base's weights
  (llama.cpp's rotary layout); in f32, f16 or bf16 (1-D tensors stay f32). llama.cpp scales
  each pair by ``alpha / rank`` with one alpha for the file, so per-module scalings (rsLoRA's
  ``alpha / sqrt(r)``, ``alpha_pattern``, mixed ranks) are folded: the file's alpha makes the
  first module's scaling exact and any module whose scaling differs has it multiplied into B.
  When the base is itself a GGUF (the ``smollm2-135m`` alias), every tensor is checked
  against the base file's tensor of that name and shape.
* ``ollama``: the GGUF adapter plus ``OUT/Modelfile``: ``FROM`` the base GGUF (or
  ``--base-gguf``), ``ADAPTER ./<name>.gguf``, a ``TEMPLATE`` (the task's prompt template with
  ``{{ .Prompt }}`` in the text's place, or a ChatML / Llama-3 chat template mapped to Go
  template syntax; any other chat template is left out with a comment saying so), ``PARAMETER
  stop`` lines and ``PARAMETER temperature 0`` (plugtune's generation is greedy).
* ``vllm``: ``OUT`` is a plain peft LoRA folder (``adapter_config.json`` +
  ``adapter_model.safetensors``) for ``vllm serve --lora-modules name=OUT`` and LoRAX, with
  plugtune's manifest beside it (so ``AdapterHost`` loads it too, and it records where it
  came from). The config is the original one with rsLoRA and ``alpha_pattern`` folded
  (``use_rslora: false``, one ``lora_alpha``; mixed ranks stay in ``rank_pattern``, which vLLM
  reads); peft computes the same update from it. Modules saved whole are refused except one
  classification head named ``score`` or ``classifier`` (vLLM 0.32's ``PEFTHelper`` takes only
  those, and applies them only when the base is served as a pooling model).

Outputs follow the output policy of core/artifacts/outputs.py: never the adapter, its base or
inside them; an existing folder only with ``overwrite``; written to a staging folder and
swapped in whole.
"""

from __future__ import annotations

import collections
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plugtune.artifacts.adapters import WEIGHTS_FILE, Adapter, read_adapter, save_adapter
from plugtune.artifacts.handlers import resolve_handler
from plugtune.artifacts.inputs import base_inputs
from plugtune.artifacts.outputs import check_output, staged_output
from plugtune.kernel.components import ExportsLora, PlainLora
from plugtune.kernel.errors import AdapterError
from plugtune.kernel.registry import PluginSystem, get_plugin_system

if TYPE_CHECKING:
    import torch

TARGETS = ("gguf", "ollama", "vllm")
DTYPES = ("f32", "f16", "bf16")
SERVERS = {"gguf": "llama.cpp", "ollama": "Ollama", "vllm": "vLLM"}
PEFT_PREFIX = "base_model.model."
# vLLM 0.32 (vllm/lora/peft_helper.py, vllm/lora/utils.py parse_fine_tuned_lora_name): the
# only modules an adapter may save whole, one per adapter, for classification models
VLLM_WHOLE_MODULES = ("score", "classifier")


def llama_cpp_adapter_type() -> str:
    """llama.cpp's GGUF header value for a LoRA adapter file (``adapter.type``): the plain-LoRA
    form's own name, which is peft's type name in lower case (convert_lora_to_gguf.py writes
    the same word). Taken from peft rather than spelled here, so the core names no method."""
    from peft import PeftType

    return PeftType.LORA.value.lower()


class ExportError(AdapterError):
    """An export that cannot be made as asked (exit 5, like every adapter refusal)."""


@dataclass
class Exported:
    """What :func:`export_adapter` wrote: the folder, the files in it, and notes for the user
    (what was folded, what a server needs to be told)."""

    folder: Path
    files: list[str]
    notes: list[str] = field(default_factory=list)


def default_output(adapter_dir: str | Path, to: str) -> Path:
    """``adapters/quickstart`` -> ``adapters/quickstart-gguf`` (beside the adapter, never in it)."""
    path = Path(adapter_dir)
    return path.parent / f"{path.resolve().name}-{to}"


def export_adapter(adapter_dir: str | Path, to: str, out: str | Path | None = None, *, dtype: str = "f32",
                   base_gguf: str | None = None, overwrite: bool = False,
                   plugins: PluginSystem | None = None) -> Exported:
    """Export the adapter at ``adapter_dir`` for server ``to`` (one of :data:`TARGETS`) into
    the folder ``out`` (default :func:`default_output`); see the module docs. Every check runs
    before anything is written; a refusal is an :class:`ExportError` (or the
    :class:`AdapterError` of a bad adapter: missing, not an adapter, hash mismatch)."""
    if to not in TARGETS:
        raise ExportError(f"--to {to!r}: not an export target; use one of {', '.join(TARGETS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    plugins = plugins or get_plugin_system()
    adapter = read_adapter(adapter_dir)  # strict: sizes and sha256 against the manifest
    out = Path(out) if out is not None else default_output(adapter_dir, to)
    inputs = [("the adapter", adapter.path), *base_inputs(adapter.manifest.base_model.id)]
    check_output(out, overwrite=overwrite, inputs=inputs)
    _refuse_stacked(adapter)
    plain = plain_lora(adapter, plugins, to)
    if to == "vllm":
        state, config, manifest, notes = vllm_adapter(adapter, plain)
        check_output(out, overwrite=overwrite, inputs=inputs)  # again: the folder may have appeared meanwhile
        save_adapter(out, state=state, config=config, manifest=manifest)
        return Exported(out, sorted(p.name for p in out.iterdir() if p.is_file()), notes)
    layout = base_layout(adapter.manifest.base_model.id, plugins)
    tensors, alpha, notes = gguf_tensors(adapter, plain, layout, dtype)
    files = {f"{file_stem(adapter.manifest.name)}.gguf": None}
    modelfile = ollama_modelfile(adapter, layout, next(iter(files)), base_gguf, plugins, notes) if to == "ollama" else None
    check_output(out, overwrite=overwrite, inputs=inputs)
    with staged_output(out) as staging:
        write_gguf(staging / next(iter(files)), tensors, alpha, layout.gguf_arch, adapter.manifest.name)
        if modelfile is not None:
            (staging / "Modelfile").write_text(modelfile, encoding="utf-8")
    return Exported(out, sorted(p.name for p in out.iterdir() if p.is_file()), notes)


def _refuse_stacked(adapter: Adapter) -> None:
    """An adapter trained on another adapter (its ``base_model`` an adapter folder) is
    relative to that base with the first adapter merged in; a server would put it on the
    bare base and answer differently, so it is refused."""
    from plugtune.artifacts.adapters import is_adapter_dir

    base = adapter.manifest.base_model.id
    try:
        stacked = is_adapter_dir(Path(base).expanduser())
    except (OSError, ValueError):
        stacked = False
    if stacked:
        raise ExportError(f"adapter {str(adapter.path)!r} was trained on another adapter ({base}): its update is "
                          f"relative to that adapter merged into the base, which a server does not have; "
                          f"`plugtune merge {base} OUT` first and export onto that model, or retrain on the plain base")


def plain_lora(adapter: Adapter, plugins: PluginSystem, to: str) -> PlainLora:
    """The adapter as plain LoRA, from its handler's :class:`ExportsLora` capability."""
    subject = f"adapter {str(adapter.path)!r}"
    spec = resolve_handler(adapter.manifest, plugins, subject=subject)
    if not issubclass(spec.cls, ExportsLora):
        raise ExportError(f"{subject} is a {adapter.manifest.method.name} adapter, and its handler "
                          f"({spec.cls.__name__}) has no plain-LoRA form (the ExportsLora capability); "
                          f"{SERVERS[to]} applies only LoRA adapters; `plugtune merge` writes the base with the "
                          f"adapter folded in, as a plain model folder to convert or serve instead")
    import torch

    plain = spec.build().plain_lora(adapter)
    for module, (a, b, scaling) in plain.pairs.items():
        if not (a.is_floating_point() and b.is_floating_point()) or not math.isfinite(scaling):
            raise ExportError(f"{subject}: {module}'s factors are not floating point or its scaling {scaling} is not finite")
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise ExportError(f"{subject}: {module}'s factors hold nan or inf; a server would answer garbage, "
                              f"so nothing was written")
    return plain


# -- one alpha for the file ------------------------------------------------------------------


def shared_alpha(plain: PlainLora) -> tuple[float, dict[str, float]]:
    """One ``alpha`` with which ``alpha / rank`` (llama.cpp's and a plain peft config's rule)
    gives the first module's scaling exactly, and per module the factor its B must be
    multiplied by so that every module keeps its own scaling (1.0 for all of a plain LoRA
    adapter: its B tensors are then written bit for bit)."""
    first = next(iter(plain.pairs.values()))
    alpha = first[2] * first[0].shape[0]
    factors = {}
    for module, (a, _, scaling) in plain.pairs.items():
        rank = a.shape[0]
        factors[module] = 1.0 if alpha / rank == scaling else scaling * rank / alpha
    return alpha, factors


def _folded_b(b: torch.Tensor, factor: float) -> torch.Tensor:
    return b if factor == 1.0 else (b.double() * factor).to(b.dtype)


# -- the base, as llama.cpp sees it ------------------------------------------------------------

# Hand-written because llama.cpp's convert_hf_to_gguf.py (whose model classes
# convert_lora_to_gguf.py reuses) is not packaged: the gguf package has the tensor names
# (TensorNameMap) but not the per-architecture rewrites. These are the architectures whose
# rewrite of a LoRA pair is known: the GGUF architecture name and whether q_proj/k_proj rows
# are permuted into llama.cpp's rotary layout (LlamaModel.permute; Mistral converts as Llama).
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
    "GemmaForCausalLM": ("gemma", False),
    "Gemma2ForCausalLM": ("gemma2", False),
}
PERMUTED = {arch for arch, permutes in ARCHITECTURES.values() if permutes}


@dataclass
class BaseLayout:
    """What a GGUF adapter must agree with: the GGUF architecture, block and head counts, and
    (when the base is a GGUF file) that file and its tensors' ggml shapes by name."""

    gguf_arch: str
    n_layers: int
    n_head: int
    n_kv_head: int
    gguf: Path | None = None
    folder: Path | None = None
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)


def base_layout(base_id: str, plugins: PluginSystem) -> BaseLayout:
    """Read from the base's GGUF header or its ``config.json``; no weights load."""
    from plugtune.artifacts.models import resolve

    location = resolve(base_id, plugins)
    if isinstance(location, Path) and location.suffix == ".gguf" and location.is_file():
        return _gguf_layout(location)
    if isinstance(location, Path) and (location / "config.json").is_file():
        from plugtune.kernel.bounds import read_json_file

        config = read_json_file(location / "config.json", ExportError, what="a model config (a JSON object)")
        architecture = (config.get("architectures") or ["?"])[0]
        if architecture not in ARCHITECTURES:
            raise ExportError(f"base {base_id!r} is a {architecture}; GGUF export knows how llama.cpp lays out "
                              f"LoRA for {', '.join(sorted(ARCHITECTURES))} (llama.cpp's convert_lora_to_gguf.py "
                              f"covers more)")
        n_head = int(config.get("num_attention_heads") or 0)
        return BaseLayout(ARCHITECTURES[architecture][0], int(config.get("num_hidden_layers") or 0), n_head,
                          int(config.get("num_key_value_heads") or n_head), folder=location)
    raise ExportError(f"base {base_id!r} is not on this machine as a GGUF file or a model folder with config.json; "
                      f"GGUF export reads the base's layout from one (fetch it first)")


def _gguf_layout(path: Path) -> BaseLayout:
    reader = _gguf_reader(path)
    arch = _gguf_field(reader, "general.architecture")
    if arch not in {a for a, _ in ARCHITECTURES.values()}:
        raise ExportError(f"{path}: GGUF architecture {arch!r}; GGUF export knows the LoRA layout of "
                          f"{', '.join(sorted({a for a, _ in ARCHITECTURES.values()}))}")
    n_head = int(_gguf_field(reader, f"{arch}.attention.head_count"))
    return BaseLayout(arch, int(_gguf_field(reader, f"{arch}.block_count")), n_head,
                      int(_gguf_field(reader, f"{arch}.attention.head_count_kv", n_head)), gguf=path,
                      tensors={t.name: tuple(int(n) for n in t.shape) for t in reader.tensors})


def _gguf_reader(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure of a foreign file is one line
        raise ExportError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {str(exc)[:200]})") from None


_MISSING = object()


def _gguf_field(reader: Any, key: str, default: Any = _MISSING) -> Any:
    found = reader.fields.get(key)
    if found is None:
        if default is _MISSING:
            raise ExportError(f"the base GGUF has no {key} in its header; it is not a model file llama.cpp loads")
        return default
    return found.contents()


# -- gguf ----------------------------------------------------------------------------------------


def gguf_tensors(adapter: Adapter, plain: PlainLora, layout: BaseLayout, dtype: str) -> tuple[list[tuple[str, Any, Any]], float, list[str]]:
    """The GGUF tensors ``(name, numpy array, ggml type)``, in ``lora_a``/``lora_b`` order per
    module, the file's alpha, and notes; every check happens here, before any write."""
    import gguf
    import numpy as np

    subject = f"adapter {str(adapter.path)!r}"
    if plain.whole:
        module = sorted(plain.whole)[0]
        raise ExportError(f"{subject} saves module(s) {', '.join(sorted(plain.whole))} whole (peft's modules_to_save, "
                          f"e.g. {module}.{sorted(plain.whole[module])[0]}); a llama.cpp LoRA GGUF holds only "
                          f"lora_a/lora_b pairs, so it cannot carry them")
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == layout.gguf_arch)
    names = gguf.get_tensor_name_map(arch, layout.n_layers)
    alpha, factors = shared_alpha(plain)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16}[dtype]
    out: list[tuple[str, Any, Any]] = []
    for module, (a, b, _) in plain.pairs.items():
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None:
            raise ExportError(f"{subject}: module {module} has no llama.cpp tensor name for architecture "
                              f"{layout.gguf_arch} (gguf's TensorNameMap); it cannot be exported")
        b = _folded_b(b, factors[module])
        if layout.gguf_arch in PERMUTED and module.endswith(("q_proj", "k_proj")):
            b = rotary_permute(b, layout.n_head, layout.n_head if module.endswith("q_proj") else layout.n_kv_head)
        if layout.tensors:
            _check_against_base(subject, layout, name, module, a, b)
        for suffix, tensor in ((".lora_a", a), (".lora_b", b)):
            data = tensor.detach().to("cpu").float().contiguous().numpy()
            if qtype == gguf.GGMLQuantizationType.F16:
                data = data.astype(np.float16)
            elif qtype == gguf.GGMLQuantizationType.BF16:
                data = gguf.quants.quantize(data, qtype)
            out.append((name + suffix, data, qtype))
    notes = [f"adapter.lora.alpha = {alpha:g} ({len(plain.pairs)} modules, {dtype})"]
    folded = sorted(m for m, f in factors.items() if f != 1.0)
    if folded:
        notes.append(f"{len(folded)} module(s) have a scaling other than alpha/rank (rsLoRA, alpha_pattern or "
                     f"mixed ranks); it is multiplied into their lora_b")
    return out, alpha, notes


def rotary_permute(weight: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``, on the rows (outputs) of ``weight``: the order in
    which llama.cpp's rotary embedding expects q and k (applied to a LoRA pair's B, as its
    converter's LoraTorchTensor does)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _check_against_base(subject: str, layout: BaseLayout, name: str, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """llama.cpp's own check at load (llama-adapter.cpp): the base tensor exists, A's input
    size is its ne[0] and B's output size its ne[1]."""
    base = layout.tensors.get(f"{name}")
    if base is None:
        raise ExportError(f"{subject}: {module} -> {name}, which the base GGUF {layout.gguf} does not have "
                          f"(a tied output head, or another base); llama.cpp would refuse the adapter")
    if len(base) != 2 or base[0] != a.shape[1] or base[1] != b.shape[0]:
        raise ExportError(f"{subject}: {module} is {a.shape[1]} -> {b.shape[0]} but the base GGUF's {name} has ggml "
                          f"shape {base}; the adapter is not for this base")


def write_gguf(path: Path, tensors: list[tuple[str, Any, Any]], alpha: float, arch: str, name: str) -> None:
    """The adapter file, as llama.cpp's converter writes it (header, KV, tensors)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, llama_cpp_adapter_type())
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor_name, data, qtype in tensors:
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def file_stem(name: str) -> str:
    """An adapter name as a file name: characters other than letters, digits, ``.``, ``_`` and
    ``-`` become ``_`` (a name with a slash or a quote must not make a path or break the
    Modelfile's ``ADAPTER`` line)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[:120]
    return stem or "adapter"


# -- ollama --------------------------------------------------------------------------------------

SENTINEL = "\x00PLUGTUNE_PROMPT\x00"
CHATML = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
          '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n')
LLAMA_3 = ('{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
           '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
           '<|start_header_id|>assistant<|end_header_id|>\n\n')
# chat template families with a known Go-template form: (marker in the Jinja text, template, stops)
CHAT_FAMILIES = (("<|im_start|>", CHATML, ("<|im_start|>", "<|im_end|>")),
                 ("<|start_header_id|>", LLAMA_3, ("<|start_header_id|>", "<|eot_id|>")))


def ollama_modelfile(adapter: Adapter, layout: BaseLayout, adapter_file: str, base_gguf: str | None,
                     plugins: PluginSystem, notes: list[str]) -> str:
    """The Modelfile's text (see the module docs); ``notes`` gets what the user must know."""
    from plugtune.data.tasks import build_task

    base = base_gguf or (str(layout.gguf.resolve()) if layout.gguf else None)
    lines = [f"# {adapter.manifest.name}: written by plugtune export from {adapter.path.resolve()}"]
    if base is None:
        base = str(layout.folder.resolve()) if layout.folder else adapter.manifest.base_model.id
        notes.append(f"FROM names the base's model folder ({base}): Ollama imports safetensors folders of some "
                     f"architectures; pass --base-gguf PATH_OR_NAME for a GGUF of the same base")
    lines += [f"FROM {_modelfile_value(base)}", f"ADAPTER ./{adapter_file}"]
    task = build_task(adapter.manifest.task, plugins=plugins, where=f"adapter {adapter.path}: task")
    eos, chat_template = _tokenizer_facts(layout)
    prompt = task.format_prompt(SENTINEL)
    stops: list[str] = []
    if isinstance(prompt, str) and prompt.count(SENTINEL) == 1 and '"""' not in prompt:
        go = prompt.replace("{{", '{{"{{"}}').replace(SENTINEL, "{{ .Prompt }}")
        lines.append(f'TEMPLATE """{go}"""')
        stops = [eos] if eos else []
    else:
        jinja = _recorded_chat_template(adapter.manifest.task) or chat_template or ""
        family = next((f for f in CHAT_FAMILIES if f[0] in jinja), None)
        if family is not None and prompt is None:
            lines.append(f'TEMPLATE """{family[1]}"""')
            stops = list(family[2])
        else:
            lines.append("# no TEMPLATE: this adapter's prompt format has no simple Go-template form here "
                         "(Ollama then uses the base GGUF's own template)")
            notes.append("Modelfile: no TEMPLATE (the prompt format has no simple Go-template mapping); check the answers")
            stops = [eos] if eos else []
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in dict.fromkeys(stops) if s]
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def _modelfile_value(value: str) -> str:
    """A ``FROM`` value on one line (a path with spaces quoted)."""
    if "\n" in value or "\r" in value:
        raise ExportError(f"--base-gguf {value!r}: a path or model name on one line")
    return json.dumps(value) if any(c.isspace() for c in value) else value


def _recorded_chat_template(task: dict[str, Any]) -> str | None:
    """The Jinja chat template a chat-like task recorded in the manifest, if any."""
    for value in task.values():
        if isinstance(value, str) and "{%" in value:
            return value
        if isinstance(value, dict):
            found = _recorded_chat_template(value)
            if found:
                return found
    return None


def _tokenizer_facts(layout: BaseLayout) -> tuple[str | None, str | None]:
    """The base tokenizer's end-of-sequence token and chat template, from the GGUF header or
    the model folder's tokenizer files (no weights)."""
    if layout.gguf is not None:
        reader = _gguf_reader(layout.gguf)
        tokens = _gguf_field(reader, "tokenizer.ggml.tokens", [])
        eos_id = _gguf_field(reader, "tokenizer.ggml.eos_token_id", None)
        eos = tokens[int(eos_id)] if eos_id is not None and 0 <= int(eos_id) < len(tokens) else None
        return eos, _gguf_field(reader, "tokenizer.chat_template", None)
    if layout.folder is not None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(layout.folder))
        except Exception:  # noqa: BLE001 - no usable tokenizer: the Modelfile goes without stops
            return None, None
        template = getattr(tokenizer, "chat_template", None)
        return tokenizer.eos_token, template if isinstance(template, str) else None
    return None, None


# -- vllm ----------------------------------------------------------------------------------------


def vllm_adapter(adapter: Adapter, plain: PlainLora) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[str]]:
    """The rewritten adapter's tensors, peft config and manifest, and notes (see the module docs)."""
    subject = f"adapter {str(adapter.path)!r}"
    notes: list[str] = []
    whole = plain.whole
    if whole:
        names = sorted(whole)
        if len(names) > 1 or names[0] not in VLLM_WHOLE_MODULES:
            raise ExportError(f"{subject} saves {', '.join(names)} whole (peft's modules_to_save); vLLM takes only "
                              f"one classification head named {' or '.join(VLLM_WHOLE_MODULES)} and refuses the "
                              f"adapter otherwise; `plugtune merge` gives a plain model folder to serve instead")
        if "weight" not in whole[names[0]] or set(whole[names[0]]) - {"weight", "bias"}:
            raise ExportError(f"{subject}: its saved {names[0]} has parameters {sorted(whole[names[0]])}; vLLM takes "
                              f"a head's weight and bias only")
        notes.append(f"the {names[0]} head travels whole (modules_to_save); vLLM applies it only when the base is "
                     f"served as a classification (pooling) model")
    alpha, factors = shared_alpha(plain)
    ranks = {m: int(a.shape[0]) for m, (a, _, _) in plain.pairs.items()}
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    state: dict[str, Any] = {}
    for module, (a, b, _) in plain.pairs.items():
        state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = _folded_b(b, factors[module])
    for module, params in whole.items():
        state.update({f"{PEFT_PREFIX}{module}.{p}": v for p, v in params.items()})
    config = dict(adapter.config)
    changes = {k: config.get(k) for k in ("use_rslora", "alpha_pattern", "lora_alpha", "r", "rank_pattern")
               if config.get(k) not in (None, False, {}, [])}
    config.update(r=rank, lora_alpha=alpha, use_rslora=False, alpha_pattern={},
                  rank_pattern={m: r for m, r in ranks.items() if r != rank},
                  modules_to_save=sorted(whole) or None)
    if changes.get("use_rslora") or changes.get("alpha_pattern") or any(f != 1.0 for f in factors.values()):
        notes.append(f"scalings folded: lora_alpha {changes.get('lora_alpha')} -> {alpha:g}, use_rslora false"
                     + (", alpha_pattern folded into lora_B" if any(f != 1.0 for f in factors.values()) else ""))
    manifest = adapter.manifest.model_dump(exclude={"files", "created"})
    manifest["exported"] = {"to": "vllm", "from": str(adapter.path.resolve()),
                            "sha256": adapter.manifest.files.get(WEIGHTS_FILE, {}).get("sha256"),
                            "original_config": changes}
    return state, config, manifest, notes
