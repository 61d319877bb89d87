"""A pytest plugin for plugtune and for plugin authors: tiny offline models and data.

Use it with ``pytest_plugins = ["plugtune.testing"]`` in a ``conftest.py``. Fixtures:

``tiny_llama``
    a folder with a randomly initialised 2-layer Llama (hidden 32) and a word-level
    tokenizer: a real Hugging Face model folder, usable as ``base_model`` in a recipe.
``tiny_bert``
    the same for a 2-layer BERT encoder (sequence classification).
``tiny_data``
    a folder with ``sentiment.csv`` (text,label) and ``sft.jsonl`` (question,answer).
``tiny_chat_llama``
    the tiny Llama with ``<|im_start|>``/``<|im_end|>`` special tokens and a chatml chat
    template on its tokenizer (its EOS stays ``</s>``), for conversation tasks.
``tiny_chats``
    a folder with ``chats.jsonl``: two-turn conversations in the OpenAI ``messages`` shape.
``make_recipe``
    ``make_recipe(**sections) -> Path``: writes a recipe YAML for the tiny models into
    ``tmp_path`` and returns its path; sections override the defaults.
``plugin_system``
    a fresh registry (entry points reloaded) installed for the test and reset after.

Everything is built from configs with fixed seeds, in well under a second, offline.
"""

from __future__ import annotations

import contextlib
import csv
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

WORDS_POS = "great wonderful superb lovely brilliant moving fun charming delightful fresh".split()
WORDS_NEG = "awful boring dull tedious clumsy bland messy weak flat tiresome".split()
FILLER = "the film movie plot acting was is and a very really quite story cast ending".split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]"]


def _tokenizer(words: list[str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(words)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return tk, PreTrainedTokenizerFast


def _vocabulary() -> list[str]:
    extra = "question answer what is the capital colour of sky grass sea sun blue green red yellow : ? . , positive negative review label".split()
    return WORDS_POS + WORDS_NEG + FILLER + extra + [str(i) for i in range(10)]


def save_tiny_model(path: Path, model_class: Any, config: Any, tokenizer: Any, seed: int = 0) -> Path:
    """Initialise ``model_class(config)`` from ``seed`` and write it with its tokenizer to
    ``path``: a real Hugging Face model folder."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_llama(path: Path, seed: int = 0, words: list[str] | None = None, max_positions: int = 128) -> Path:
    """Write a tiny random Llama and its tokenizer to ``path``; ``words`` replaces the
    default word-level vocabulary (for data whose words the default lacks)."""
    from transformers import LlamaForCausalLM

    tk, cls = _tokenizer(words if words is not None else _vocabulary())
    tokenizer = cls(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return save_tiny_model(path, LlamaForCausalLM, _tiny_llama_config(tokenizer, max_positions), tokenizer, seed)


def _tiny_llama_config(tokenizer: Any, max_positions: int) -> Any:
    """The tiny Llama's shape: 2 layers, hidden 32, grouped-query attention, tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )


def build_tiny_bpe_llama(path: Path, seed: int = 0, max_positions: int = 256) -> Path:
    """Write a tiny random Llama with a byte-level BPE tokenizer (a few hundred tokens over
    the 256 byte symbols, so it can write any text: JSON, digits, punctuation), for tests
    of structured output and byte-level decoding that a word-level vocabulary cannot spell."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = ['{"name": "Ada", "age": 36, "tags": ["x", "y"]}', '{"kind": "cat", "owner": {"id": 7, "vip": true}}',
              " ".join(_vocabulary()), "true false null [1, 2, 3] 0 1 2 3 4 5 6 7 8 9 abc-12"] * 20
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", bos_token="<s>")
    return save_tiny_model(path, LlamaForCausalLM, _tiny_llama_config(tokenizer, max_positions), tokenizer, seed)


CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT_WORDS = "system user assistant be brief and".split()


def build_tiny_chat_llama(path: Path, seed: int = 0) -> Path:
    """Write a tiny random Llama whose tokenizer has chatml's special tokens and template."""
    from transformers import LlamaForCausalLM

    tk, cls = _tokenizer(_vocabulary() + CHAT_WORDS)
    tokenizer = cls(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                    additional_special_tokens=CHAT_SPECIALS)
    tokenizer.chat_template = CHATML_TEMPLATE
    return save_tiny_model(path, LlamaForCausalLM, _tiny_llama_config(tokenizer, 256), tokenizer, seed)


def write_tiny_chats(folder: Path, rows: int = 192, seed: int = 0) -> Path:
    """``chats.jsonl``: a system prompt, then two questions about colours, each answered."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    answers = {"sky": "blue", "grass": "green", "sea": "blue", "sun": "yellow"}
    with open(folder / "chats.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(rows):
            first, second = rng.sample(sorted(answers), 2)
            messages = [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": f"what is the colour of the {first} ?"},
                        {"role": "assistant", "content": answers[first]},
                        {"role": "user", "content": f"and the {second} ?"},
                        {"role": "assistant", "content": answers[second]}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return folder


def build_tiny_bert(path: Path, seed: int = 0) -> Path:
    """Write a tiny random BERT encoder and its tokenizer to ``path``."""
    from tokenizers import processors
    from transformers import BertConfig, BertModel

    tk, cls = _tokenizer(_vocabulary())
    vocab = tk.get_vocab()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer = cls(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", cls_token="[CLS]", sep_token="[SEP]")
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return save_tiny_model(path, BertModel, config, tokenizer, seed)


def write_tiny_data(folder: Path, rows: int = 256, seed: int = 0) -> Path:
    """``sentiment.csv``: text made of sentiment words and filler, label positive/negative;
    ``sft.jsonl``: question/answer pairs with a learnable mapping."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "sentiment.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(rows):
            positive = i % 2 == 0
            words = rng.sample(FILLER, 4) + rng.sample(WORDS_POS if positive else WORDS_NEG, 2)
            rng.shuffle(words)
            writer.writerow([" ".join(words), "positive" if positive else "negative"])
    answers = {"sky": "blue", "grass": "green", "sea": "blue", "sun": "yellow"}
    with open(folder / "sft.jsonl", "w", encoding="utf-8") as fh:
        for i in range(rows):
            thing = rng.choice(sorted(answers))
            fh.write(json.dumps({"question": f"what is the colour of the {thing} ?", "answer": answers[thing]}) + "\n")
    return folder


def recipe_dict(base_model: str | Path, data_dir: Path, *, classification: bool = False, **sections: Any) -> dict[str, Any]:
    """A small, fast recipe for the tiny models; ``sections`` replace top-level keys."""
    if classification:
        task = {"type": "sequence-classification", "text": "{text}", "label": "label"}
        data = {"loader": "table", "options": {"path": str(data_dir / "sentiment.csv"), "test_size": 0.25}}
        evaluators = ["accuracy", "f1", "loss"]
    else:
        task = {"type": "causal-lm", "prompt": "question : {question} answer :", "response": " {answer}"}
        data = {"loader": "table", "options": {"path": str(data_dir / "sft.jsonl"), "test_size": 0.25}}
        evaluators = ["accuracy", "loss", "perplexity"]
    recipe = {
        "name": "tiny",
        "base_model": str(base_model),
        "task": task,
        "data": data,
        "method": {"name": "lora", "options": {"r": 4, "alpha": 8, "target_modules": "all-linear" if not classification else ["query", "value"]}},
        "evaluators": evaluators,
        "training": {"max_steps": 8, "batch_size": 8, "learning_rate": 2e-2, "seed": 0, "max_length": 48, "device": "cpu"},
    }
    if classification:
        recipe["training"].update(max_steps=24, learning_rate=1e-2)
    recipe.update(sections)
    return recipe


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_llama(tmp_path_factory.mktemp("tiny-chat-llama"))


@pytest.fixture(scope="session")
def tiny_chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_chats(tmp_path_factory.mktemp("tiny-chats"))


@pytest.fixture
def make_recipe(tmp_path: Path, tiny_llama: Path, tiny_bert: Path, tiny_data: Path) -> Any:
    def make(classification: bool = False, **sections: Any) -> Path:
        base = sections.pop("base_model", tiny_bert if classification else tiny_llama)
        data = recipe_dict(base, tiny_data, classification=classification, **sections)
        data.setdefault("output", {"dir": str(tmp_path / "adapters" / data["name"])})
        path = tmp_path / f"{data['name']}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return make


@pytest.fixture
def plugin_system() -> Iterator[Any]:
    from plugtune.kernel.registry import build_plugin_system, set_plugin_system

    system = build_plugin_system()
    set_plugin_system(system)
    try:
        yield system
    finally:
        set_plugin_system(None)


# == the conformance kit =====================================================================
#
# Checks a plugin author calls from their own tests, one entry per component kind. Each
# check is a small named function that fails with an AssertionError saying which contract
# was broken. Where a check must reach host or handler internals it goes through one of the
# small functions right below, so there is one place to adapt when those internals change.


def hosted_handler(host: Any, name: str) -> Any:
    """The host-side handler (:class:`~plugtune.sdk.AdapterHandler`) serving adapter ``name``
    on ``host``: one instance per handler class, shared by every adapter it hosts."""
    return host.adapters[name].method


def handler_supports_mixed_rows(handler: Any) -> bool:
    """Whether a handler declares :class:`~plugtune.sdk.MixesRows` (and does not opt out)."""
    from plugtune.kernel.components import mixes_rows

    return mixes_rows(handler)


def handler_can_fold(handler: Any) -> bool:
    """Whether a handler declares :class:`~plugtune.sdk.Folds` (merge/unmerge on a host)."""
    from plugtune.kernel.components import Folds

    return isinstance(handler, Folds)


def handler_capabilities(handler: Any) -> list[str]:
    """The capability protocols ``handler`` declares, by name (``["MixesRows", "Folds", ...]``;
    ``MixesRows`` only when :func:`~plugtune.sdk.mixes_rows` agrees)."""
    from plugtune.kernel import components as c

    found = [p.__name__ for p in (c.MixesRows, c.Folds, c.Merges, c.StartsDecoding, c.ReportsResidentBytes, c.Combines)
             if isinstance(handler, p)]
    return [n for n in found if n != "MixesRows" or c.mixes_rows(handler)]


def base_snapshot(host: Any) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The bare base's tensors (cloned) and its module tree (path, class name)."""
    model = host.base.model
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [(n, type(m).__name__) for n, m in model.named_modules()]


def assert_base_unchanged(host: Any, snapshot: tuple[dict[str, Any], list[tuple[str, str]]], when: str) -> None:
    """The host's base is ``torch.equal`` to ``snapshot``: same modules, same tensors."""
    import torch

    state, modules = base_snapshot(host)
    assert modules == snapshot[1], f"{when}: the base's modules changed (wrappers left behind or lost)"
    assert state.keys() == snapshot[0].keys(), f"{when}: the base's tensors changed names: {sorted(state.keys() ^ snapshot[0].keys())[:4]}"
    changed = [k for k in state if not torch.equal(state[k], snapshot[0][k])]
    assert not changed, f"{when}: the base's weights changed: {changed[:4]}"


PROBE_TEXTS = [
    "question : what is the colour of the sky ? answer : blue",
    "question : what is the colour of the sun ? answer :",
    "the film was great",
    "question : what is the colour of the grass ? answer : green and very fresh",
]


class _Probe:
    """A lifecycle plugin: logits of the trained model, in memory, when training ends."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.logits: Any = None

    from plugtune.kernel.hookspecs import hookimpl as _hookimpl

    @_hookimpl
    def on_train_end(self, run: Any, adapter_dir: str, metrics: dict[str, float]) -> None:
        import torch

        model = run.model
        model.eval()
        enc = run.tokenizer(self.texts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
        with torch.no_grad():
            self.logits = real_token_logits(model(**enc).logits, enc["input_ids"]).detach().cpu()


class _Crash:
    """A lifecycle plugin that makes training die after step ``at_step`` (as a killed process
    would, between checkpoints)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    from plugtune.kernel.hookspecs import hookimpl as _hookimpl

    @_hookimpl
    def on_step_end(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        if step == self.at_step:
            raise RuntimeError(f"conformance kit: simulated kill after step {step}")


@contextlib.contextmanager
def plugin_system_with(extra_plugins: list[tuple[str, Any]] | None = None) -> Iterator[Any]:
    """A fresh registry with ``extra_plugins`` installed for the block, reset after."""
    from plugtune.kernel.registry import build_plugin_system, set_plugin_system

    system = build_plugin_system(extra_plugins=list(extra_plugins or []))
    set_plugin_system(system)
    try:
        yield system
    finally:
        set_plugin_system(None)


def valid_positions(host: Any, texts: list[str]) -> Any:
    """(batch, tokens) bool: the positions that are real tokens in a right-padded batch."""
    return host.tokenizer(list(texts), return_tensors="pt", padding=True)["attention_mask"].bool()


def real_token_logits(logits: Any, input_ids: Any) -> Any:
    """A model's logits at the positions of ``input_ids`` ``(B, T)``: a causal LM wrapped by a
    method that prepends virtual tokens (peft's prompt tuning, p-tuning) returns ``(B, T', V)``
    with ``T' - T`` of them first; they are left out, as the host leaves them out of
    :meth:`~plugtune.serving.host.AdapterHost.logits`. Other logits are returned as they are."""
    if logits.dim() == 3 and logits.size(1) > input_ids.size(1):
        return logits[:, logits.size(1) - input_ids.size(1):]
    return logits


def _at(logits: Any, mask: Any) -> Any:
    """Per-token logits ``(B, T, V)`` at the real positions ``mask``; a classifier's
    ``(B, C)`` as they are (one row per text, no padding to leave out)."""
    return logits[mask] if logits.dim() == 3 else logits


def _close(a: Any, b: Any, atol: float) -> float:
    """Largest absolute difference between two tensors of one shape."""
    assert a.shape == b.shape, f"logits of shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


class MethodKit:
    """The conformance checks for a tuning method, sharing the adapters they train.

    ``MethodKit(name, options, tmp_path=...)`` trains (on first need, once) two adapters of the
    method (seeds 0 and 1) and one LoRA adapter on a tiny model; each ``check_*`` method is
    one contract. ``lora_from``: another kit on the same base and data whose LoRA adapter this
    kit reuses (a suite checking many methods trains it once). ``extra_plugins`` registers plugins in code (``[("ia3", module)]``) for a
    method that is not installed as a distribution. ``training`` updates the recipe's
    training block (a method may need another learning rate to learn in a few steps).
    """

    CHECKS = ("loss_falls", "save_reload", "peft_format", "base_untouched", "composes_with_lora", "mixed_batch",
              "fold_unfold", "kill_and_resume", "strict_attach", "adapter_disabled")

    def __init__(self, name: str, options: dict[str, Any] | None = None, *, tmp_path: Path,
                 classification: bool = False, extra_plugins: list[tuple[str, Any]] | None = None,
                 training: dict[str, Any] | None = None, base_model: Path | None = None,
                 data_dir: Path | None = None, atol: float = 1e-5, lora_from: MethodKit | None = None) -> None:
        self.name, self.options, self.classification = name, dict(options or {}), classification
        self.tmp = Path(tmp_path).resolve()
        self.extra_plugins = list(extra_plugins or [])
        self.training = {"max_steps": 6, "checkpoint_every": 2, **(training or {})}
        self.atol = atol
        self.base_model = base_model
        self.data_dir = data_dir
        self._trained: dict[str, tuple[Path, Any, Any]] = {}
        self.lora_from = lora_from  # a kit on the same base and data whose LoRA adapter this one reuses

    # -- setup ----------------------------------------------------------------------------

    def _base(self) -> Path:
        if self.base_model is None:
            build = build_tiny_bert if self.classification else build_tiny_llama
            self.base_model = build(self.tmp / "base")
        return self.base_model

    def _data(self) -> Path:
        if self.data_dir is None:
            self.data_dir = write_tiny_data(self.tmp / "data")
        return self.data_dir

    def recipe(self, tag: str, *, method: str | None = None, options: dict[str, Any] | None = None, seed: int = 0) -> Path:
        """Write the recipe of one kit run to ``tmp_path/<tag>.yaml`` and return its path."""
        raw = recipe_dict(self._base(), self._data(), classification=self.classification, evaluators=["loss"],
                          output={"dir": str(self.tmp / "adapters" / tag)})
        if method is None:
            raw["method"] = {"name": self.name, "options": self.options}
        raw["training"].update(self.training, seed=seed)
        raw["name"] = tag
        path = self.tmp / f"{tag}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    def trained(self, tag: str) -> tuple[Path, Any, Any]:
        """(adapter folder, RunResult, in-memory logits of the trained model on PROBE_TEXTS)
        for ``tag``: ``a`` and ``b`` are this method (seeds 0, 1), ``lora`` a LoRA adapter."""
        if tag == "lora" and self.lora_from is not None:
            return self.lora_from.trained("lora")
        if tag not in self._trained:
            import plugtune

            recipe = self.recipe(tag, method="lora" if tag == "lora" else None, seed=1 if tag == "b" else 0)
            probe = _Probe(self._probe_texts())
            with plugin_system_with([*self.extra_plugins, ("plugtune-kit-probe", probe)]) as system:
                result = plugtune.run(recipe, plugins=system, show_progress=False)
            self._trained[tag] = (Path(result.adapter_dir), result, probe.logits)
        return self._trained[tag]

    def _probe_texts(self) -> list[str]:
        return ["the film was great", "awful boring plot", "a very charming cast and a fresh story", "dull"] \
            if self.classification else list(PROBE_TEXTS)

    @contextlib.contextmanager
    def host(self, *tags: str) -> Iterator[Any]:
        """An ``AdapterHost`` on the tiny base with the adapters ``tags`` loaded (as their tags)."""
        from plugtune.data.tasks import build_task
        from plugtune.artifacts.adapters import read_manifest
        from plugtune.serving.host import AdapterHost

        folders = [self.trained(t)[0] for t in tags]
        with plugin_system_with(self.extra_plugins) as system:
            task = build_task(read_manifest(folders[0] if folders else self.trained("a")[0]).task, system)
            host = AdapterHost.from_base(str(self._base()), task, system, device="cpu")
            for tag, folder in zip(tags, folders):
                host.load(folder, tag)
            yield host

    # -- the checks -----------------------------------------------------------------------

    def check_loss_falls(self) -> None:
        """A short run from a recipe lowers the held-out loss."""
        _, result, _ = self.trained("a")
        before, after = result.before["loss"], result.after["loss"]
        assert after < before, f"{self.name}: the held-out loss did not fall in {result.steps} steps ({before:.4f} -> {after:.4f})"

    def check_save_reload(self) -> None:
        """The saved adapter, loaded on an AdapterHost, gives the trained model's logits."""
        _, _, trained = self.trained("a")
        with self.host("a") as host:
            got = host.logits(self._probe_texts(), "a")
            mask = valid_positions(host, self._probe_texts())
        diff = _close(_at(got, mask), _at(trained, mask), self.atol)
        assert diff <= self.atol, f"{self.name}: save then reload changed the logits (max |diff| {diff:.2e} > {self.atol:g})"

    def check_peft_format(self) -> None:
        """Where adapter_config.json has a ``peft_type``, plain ``PeftModel.from_pretrained``
        gives the host's logits (returns without checking when the adapter is not in peft's format)."""
        import torch
        from peft import PeftModel

        folder, _, _ = self.trained("a")
        config = json.loads((folder / "adapter_config.json").read_text())
        if "peft_type" not in config:
            return
        texts = self._probe_texts()
        with self.host("a") as host:
            hosted = host.logits(texts, "a")
            mask = valid_positions(host, texts)
        with self.host() as fresh:
            model = PeftModel.from_pretrained(fresh.base.model, str(folder)).eval()
            enc = fresh.tokenizer(texts, return_tensors="pt", padding=True)
            with torch.no_grad():
                plain = real_token_logits(model(**enc).logits, enc["input_ids"])
        diff = _close(_at(plain, mask), _at(hosted, mask), self.atol)
        assert diff <= self.atol, f"{self.name}: plain peft and the host disagree on the adapter's logits (max |diff| {diff:.2e})"

    def _attach_switch_unload(self, load: tuple[str, ...], unload: tuple[str, ...], when: str) -> None:
        import torch

        texts = self._probe_texts()
        with self.host() as host:
            fresh = base_snapshot(host)
            bare = host.logits(texts, None)
            alone = {}
            for tag in load:
                host.load(self.trained(tag)[0], tag)
                assert torch.equal(host.logits(texts, None), bare), f"{self.name}: loading {tag!r} changed the bare base's logits ({when})"
            for tag in (*load, load[0], None):
                host.use(tag)
                alone.setdefault(tag, host.logits(texts))
            assert torch.equal(host.logits(texts, None), bare), f"{self.name}: the bare base gives other logits while adapters are resident ({when})"
            for i, tag in enumerate(unload):
                host.unload(tag)
                for other in unload[i + 1:]:
                    diff = _close(host.logits(texts, other), alone[other], 0.0)
                    assert diff == 0.0, f"{self.name}: unloading {tag!r} changed adapter {other!r}'s logits ({when}; max |diff| {diff:.2e})"
            assert_base_unchanged(host, fresh, f"{self.name}: after attach, switch and unload ({when})")
            assert torch.equal(host.logits(texts, None), bare), f"{self.name}: the base gives other logits after unload ({when})"

    def check_base_untouched(self) -> None:
        """Attach, switch and unload (two adapters of the method, and a LoRA adapter loaded
        before them) leave every other adapter as it was and the base ``torch.equal`` to a
        fresh copy."""
        self._attach_switch_unload(("lora", "a", "b"), ("a", "b", "lora"), "LoRA loaded first")

    def check_composes_with_lora(self) -> None:
        """The same with the LoRA adapter loaded after the method's adapters, and unloaded
        in either order: the two methods' layer wrappers compose on one base."""
        self._attach_switch_unload(("a", "b", "lora"), ("lora", "a", "b"), "LoRA loaded last, unloaded first")
        self._attach_switch_unload(("lora", "a"), ("lora", "a"), "LoRA loaded first, unloaded first")

    def check_mixed_batch(self) -> None:
        """Rows on this adapter, another adapter of the method, the bare base and a LoRA
        adapter, in one batch, each equal that row run alone (only when the handler claims
        mixed rows; returns without checking otherwise)."""
        texts = self._probe_texts()
        names = ["a", "b", None, "lora"]
        with self.host("lora", "a", "b") as host:
            if not handler_supports_mixed_rows(hosted_handler(host, "a")):
                return
            mixed = host.logits(texts, names)
            mask = valid_positions(host, texts)
            for i, (text, name) in enumerate(zip(texts, names)):
                alone = host.logits([text], name)[0]  # (tokens, vocab)
                n = int(mask[i].sum())
                diff = _close(mixed[i, :n], alone[:n], self.atol)
                assert diff <= self.atol, (f"{self.name}: in a mixed batch, row {i} (adapter {name!r}) differs from the row "
                                           f"run alone (max |diff| {diff:.2e}); the host or the handler mixes rows wrongly")

    def check_fold_unfold(self) -> None:
        """Merged logits equal unmerged ones, and unmerge restores the base bit for bit
        (only when the handler can fold)."""
        import torch

        texts = self._probe_texts()
        with self.host("a") as host:
            if not handler_can_fold(hosted_handler(host, "a")):
                return
            host.use(None)
            fresh = base_snapshot(host)
            unmerged = host.logits(texts, "a")
            host.merge("a")
            merged = host.logits(texts, "a")
            mask = valid_positions(host, texts)
            diff = _close(_at(merged, mask), _at(unmerged, mask), self.atol)
            assert diff <= self.atol, f"{self.name}: merged logits differ from unmerged ones (max |diff| {diff:.2e})"
            host.unmerge()
            assert torch.equal(host.logits(texts, "a"), unmerged), f"{self.name}: after unmerge the adapter gives other logits"
            host.use(None)
            assert_base_unchanged(host, fresh, f"{self.name}: after merge and unmerge")

    def check_kill_and_resume(self) -> None:
        """A run that dies after a checkpoint, resumed with ``resume=True``, saves the very
        tensors of the uninterrupted run (bit-exact)."""
        import plugtune
        import torch
        from plugtune.artifacts.adapters import read_adapter
        from plugtune.kernel.errors import PluginError

        every = int(self.training["checkpoint_every"])
        assert every and self.training["max_steps"] > every + 1, "the kit's training block needs checkpoint_every < max_steps - 1"
        reference, _, _ = self.trained("a")
        recipe = self.recipe("resumed")
        with plugin_system_with([*self.extra_plugins, ("plugtune-kit-crash", _Crash(every + 1))]) as system:
            try:
                plugtune.run(recipe, plugins=system, show_progress=False)
            except PluginError:
                pass
            else:
                raise AssertionError("conformance kit: the simulated kill did not stop the run")
        with plugin_system_with(self.extra_plugins) as system:
            result = plugtune.run(recipe, plugins=system, show_progress=False, resume=True)
        got, want = read_adapter(result.adapter_dir).state, read_adapter(reference).state
        assert got.keys() == want.keys(), f"{self.name}: the resumed run saved other tensors: {sorted(got.keys() ^ want.keys())[:4]}"
        differ = [k for k in want if not torch.equal(got[k], want[k])]
        assert not differ, f"{self.name}: kill and resume is not bit-exact; these tensors differ: {differ[:4]}"

    def broken_adapters(self) -> dict[str, Path]:
        """Copies of adapter ``a`` with a wrong-shaped, a missing and an unexpected tensor."""
        import torch
        from plugtune.artifacts.adapters import read_adapter, save_adapter

        adapter = read_adapter(self.trained("a")[0])
        # a tensor with elements: one row more of an empty one (a rank AdaLoRA pruned to 0) is still empty
        first = next((k for k in sorted(adapter.state) if adapter.state[k].numel() > 0), sorted(adapter.state)[0])
        wrong = dict(adapter.state)
        wrong[first] = torch.cat([wrong[first], wrong[first][:1]])  # one row too many
        missing = {k: v for k, v in adapter.state.items() if k != first}
        unexpected = {**adapter.state, first + ".unexpected": adapter.state[first].clone()}
        out = {}
        for label, state in {"wrong_shape": wrong, "missing": missing, "unexpected": unexpected}.items():
            out[label] = save_adapter(self.tmp / "broken" / label, state=state, config=adapter.config,
                                      manifest={**adapter.manifest.model_dump(), "name": label})
        return out

    def check_strict_attach(self) -> None:
        """An adapter with a wrong-shaped, a missing or an unexpected tensor is refused with
        AdapterError, and the host (its adapters, the base, the resident adapter's logits)
        is left as it was."""
        import torch
        from plugtune.kernel.errors import AdapterError

        texts = self._probe_texts()
        broken = self.broken_adapters()
        with self.host("a") as host:
            host.use(None)
            fresh = base_snapshot(host)
            listed = host.list()
            logits = host.logits(texts, "a")
            for label, folder in broken.items():
                try:
                    host.load(folder, label)
                except AdapterError:
                    pass
                else:
                    raise AssertionError(f"{self.name}: an adapter with a {label.replace('_', ' ')} tensor was accepted")
                assert host.list() == listed, f"{self.name}: a refused adapter ({label}) changed the host's list"
                assert_base_unchanged(host, fresh, f"{self.name}: after refusing the {label} adapter")
                assert torch.equal(host.logits(texts, "a"), logits), f"{self.name}: refusing the {label} adapter changed adapter a's logits"

    def check_adapter_disabled(self) -> None:
        """A method with ``adapter_disabled``: inside the block the prepared model (its
        trainable weights moved off their start, so the adapter does something) gives the
        base's logits, and after it its own again; nothing to check for a method without."""
        import torch

        from plugtune.artifacts.models import load_base
        from plugtune.kernel.components import PrepareContext, call_prepare
        from plugtune.training.recipe import load_recipe

        with plugin_system_with(self.extra_plugins) as system:
            recipe = load_recipe(self.recipe("disabled"), plugins=system)
            method = recipe.method.build()
            if not hasattr(method, "adapter_disabled"):
                return
            base = load_base(str(self._base()), recipe.task, plugins=system, seed=0,
                             loading=getattr(method, "base_loading", None), loaded=getattr(method, "base_loaded", None))
            batch = base.tokenizer(self._probe_texts(), return_tensors="pt", padding=True)
            mask = batch["attention_mask"].bool()
            with torch.no_grad():
                bare = _at(real_token_logits(base.model(**batch).logits, batch["input_ids"]), mask)
            context = PrepareContext(new_parameters=base.new_parameters, tokenizer=base.tokenizer, seed=0, device="cpu",
                                     total_steps=self.training.get("max_steps"))
            model = call_prepare(method, base.model, recipe.task, context)
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for param in model.parameters():
                    if param.requires_grad and param.is_floating_point():
                        param.add_(torch.randn(param.shape, generator=generator).to(param) * 0.5)
                model.eval()

                def logits() -> Any:
                    return _at(real_token_logits(model(**batch).logits, batch["input_ids"]), mask)

                adapted = logits()
                with method.adapter_disabled(model):
                    off = logits()
                again = logits()
        assert _close(off, bare, self.atol) <= self.atol, \
            f"{self.name}: inside adapter_disabled the model is not the base (max |diff| {_close(off, bare, self.atol):.2e})"
        assert _close(adapted, bare, self.atol) > self.atol, f"{self.name}: the perturbed adapter changed nothing; the check proves nothing"
        assert torch.equal(again, adapted), f"{self.name}: after adapter_disabled the adapter did not come back"

    def run_all(self, skip: tuple[str, ...] = ()) -> None:
        """Every check but ``skip`` (names from :attr:`CHECKS`), in order."""
        for check in self.CHECKS:
            if check not in skip:
                getattr(self, f"check_{check}")()


def check_tuning_method(name: str, options: dict[str, Any] | None = None, *, tmp_path: Path, classification: bool = False,
                        skip: tuple[str, ...] = (), **kit: Any) -> MethodKit:
    """Run every tuning-method contract (see :class:`MethodKit`) on the tiny models; returns
    the kit, whose adapters further tests may reuse. ``skip`` names checks to leave out."""
    method_kit = MethodKit(name, options, tmp_path=tmp_path, classification=classification, **kit)
    method_kit.run_all(skip)
    return method_kit


# -- data loaders, regularizers, evaluators ----------------------------------------------------


def _component(kind: str, name_or_cls: Any, extra_plugins: list[tuple[str, Any]] | None = None) -> Any:
    """A registered component class by name (or the class itself)."""
    if not isinstance(name_or_cls, str):
        return name_or_cls
    with plugin_system_with(extra_plugins) as system:
        return system.get(kind, name_or_cls).obj


def _refused(cls: Any, options: dict[str, Any], base_dir: Path | None) -> bool:
    from pydantic import ValidationError

    from plugtune.kernel.errors import PlugtuneError

    try:
        cls.Options.model_validate(options, context={"base_dir": str(base_dir or ".")})
    except (ValidationError, PlugtuneError):
        return True
    return False


def check_data_loader(name_or_cls: Any, options: dict[str, Any], *, bad_options: list[dict[str, Any]] = (),
                      base_dir: Path | None = None, seed: int = 0,
                      extra_plugins: list[tuple[str, Any]] | None = None) -> dict[str, list[dict[str, Any]]]:
    """A data loader's contract: its options validate (relative paths against ``base_dir``)
    and every dict in ``bad_options`` and an unknown key are refused; ``columns()`` equals the
    keys of every loaded example; ``load(seed)`` returns ``train`` and ``test`` lists, the
    same twice. Returns the splits."""
    cls = _component("loader", name_or_cls, extra_plugins)
    bound = cls.Options.model_validate(options, context={"base_dir": str(base_dir or ".")})
    assert _refused(cls, {**options, "no_such_option_kit": 1}, base_dir), f"{cls.__name__}: an unknown option was accepted"
    for bad in bad_options:
        assert _refused(cls, bad, base_dir), f"{cls.__name__}: bad options {bad} were accepted at validation"
    columns = cls(bound).columns()
    assert isinstance(columns, list) and all(isinstance(c, str) for c in columns), f"{cls.__name__}: columns() must be a list of str"
    splits = cls(bound).load(seed)
    assert {"train", "test"} <= set(splits), f"{cls.__name__}: load() returned splits {sorted(splits)}, not train and test"
    for split in ("train", "test"):
        rows = splits[split]
        assert isinstance(rows, list) and rows, f"{cls.__name__}: the {split} split is empty or not a list"
        for i, row in enumerate(rows):
            assert set(row) == set(columns), f"{cls.__name__}: {split}[{i}] has keys {sorted(row)}, columns() said {sorted(columns)}"
    again = cls(bound).load(seed)
    assert again == splits, f"{cls.__name__}: load({seed}) is not deterministic"
    return splits


REGULARIZER_HOOKS = ("param_groups", "transform_batch", "loss_term", "after_backward", "report", "setup",
                     "augment_examples", "after_evaluate", "state_dict")


def _spying(cls: Any, calls: dict[str, list[Any]]) -> type:
    """A subclass of ``cls`` whose hooks record what they returned in ``calls``."""

    def wrap(hook: str) -> Any:
        def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = getattr(cls, hook)(self, *args, **kwargs)
            calls.setdefault(hook, []).append(result)
            if not calls.get("self") or calls["self"][-1] is not self:
                calls.setdefault("self", []).append(self)
            return result
        return spy

    return type(f"Spying{cls.__name__}", (cls,), {h: wrap(h) for h in REGULARIZER_HOOKS if hasattr(cls, h)})


class _Registers:
    """A plugin registering one component, a regularizer or a tracker (``kind``), under a name."""

    def __init__(self, name: str, cls: Any, kind: str = "regularizer") -> None:
        self.name, self.cls, self.kind = name, cls, kind

    from plugtune.kernel.hookspecs import hookimpl as _hookimpl

    @_hookimpl
    def register_regularizers(self, register: Any) -> None:
        if self.kind == "regularizer":
            register(self.name, self.cls)

    @_hookimpl
    def register_trackers(self, register: Any) -> None:
        if self.kind == "tracker":
            register(self.name, self.cls)


def _same(a: Any, b: Any) -> bool:
    """Equal, looking into dicts, lists and tensors (``torch.equal``)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_regularizer(name_or_cls: Any, options: dict[str, Any] | None = None, *, tmp_path: Path,
                      classification: bool = False, expect: tuple[str, ...] | None = None,
                      extra_plugins: list[tuple[str, Any]] | None = None) -> dict[str, list[Any]]:
    """A regularizer's contract in a short real training run: every hook it defines (or those
    in ``expect``) is called; ``report`` and ``after_backward`` give floats; a ``loss_term``
    is a finite scalar tensor; ``state_dict`` round-trips through ``load_state_dict``.
    Returns what each hook returned."""
    import math

    import plugtune
    import torch

    cls = _component("regularizer", name_or_cls, extra_plugins)
    calls: dict[str, list[Any]] = {}
    spy = _spying(cls, calls)
    tmp = Path(tmp_path).resolve()
    base = (build_tiny_bert if classification else build_tiny_llama)(tmp / "base")
    raw = recipe_dict(base, write_tiny_data(tmp / "data"), classification=classification, evaluators=["loss"],
                      regularizers=[{"name": "kit-spy", "options": dict(options or {})}], output={"dir": str(tmp / "adapter")})
    raw["training"].update(max_steps=4, eval_every=2, checkpoint_every=2)
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    with plugin_system_with([*(extra_plugins or []), ("plugtune-kit-spy", _Registers("kit-spy", spy))]) as system:
        plugtune.run(recipe, plugins=system, show_progress=False)
    wanted = expect if expect is not None else tuple(h for h in REGULARIZER_HOOKS if hasattr(cls, h) and h != "state_dict")
    silent = [h for h in wanted if not calls.get(h)]
    assert not silent, f"{cls.__name__}: hooks never called in a training run: {silent} (check their names and signatures)"
    for hook in ("report", "after_backward"):
        for values in calls.get(hook, []):
            bad = {k: v for k, v in (values or {}).items() if not isinstance(v, float)}
            assert not bad, f"{cls.__name__}.{hook} must report floats; got {bad}"
    for term in calls.get("loss_term", []):
        if term is not None:
            assert isinstance(term, torch.Tensor) and term.dim() == 0 and math.isfinite(float(term.detach())), \
                f"{cls.__name__}.loss_term must return a finite scalar tensor or None; got {term!r}"
    if hasattr(cls, "state_dict"):
        assert hasattr(cls, "load_state_dict"), f"{cls.__name__}: state_dict without load_state_dict"
        state = calls["state_dict"][-1] if calls.get("state_dict") else None
        assert state is not None, f"{cls.__name__}: state_dict was never called when a checkpoint was saved"
        trained = calls["self"][-1]  # the instance that trained: set up, as a resumed run's is
        trained.load_state_dict(state)
        assert _same(cls.state_dict(trained), state), f"{cls.__name__}: state_dict does not round-trip through load_state_dict"
    return calls


TRACKER_HOOKS = ("on_train_start", "on_step_end", "on_evaluate", "on_train_end", "on_train_failed")


def _spying_tracker(cls: Any, calls: dict[str, list[dict[str, Any]]]) -> type:
    """A subclass of the tracker ``cls`` whose lifecycle hooks record their arguments in
    ``calls``; each keeps its ``hookimpl`` mark (``functools.wraps``), so pluggy sees it."""
    import functools

    def wrap(hook: str) -> Any:
        original = getattr(cls, hook)

        @functools.wraps(original)
        def spy(self: Any, **kwargs: Any) -> Any:
            calls.setdefault(hook, []).append(dict(kwargs))
            return original(self, **kwargs)
        return spy

    return type(f"Spying{cls.__name__}", (cls,), {h: wrap(h) for h in TRACKER_HOOKS if hasattr(cls, h)})


def check_tracker(name_or_cls: Any, options: dict[str, Any] | None = None, *, tmp_path: Path,
                  extra_plugins: list[tuple[str, Any]] | None = None) -> dict[str, list[dict[str, Any]]]:
    """A tracker's contract in a short real training run (3 steps, evaluated at steps 0, 2
    and 3): it declares ``Options``, ``requires`` and ``install``; built from ``options``, it
    gets every lifecycle hook it defines (``on_train_start`` and ``on_train_end`` once, the
    latter with the adapter's folder; ``on_step_end`` at each step; ``on_evaluate`` at each
    evaluation; ``on_train_failed`` never) and none of its hooks raises; after the run it is
    no longer registered. Returns each hook's arguments, call by call."""
    import plugtune

    cls = _component("tracker", name_or_cls, extra_plugins)
    for attribute, kind in (("Options", type), ("requires", tuple), ("install", str)):
        assert isinstance(getattr(cls, attribute, None), kind), f"{cls.__name__}.{attribute} must be a {kind.__name__}"
    calls: dict[str, list[dict[str, Any]]] = {}
    tmp = Path(tmp_path).resolve()
    raw = recipe_dict(build_tiny_llama(tmp / "base"), write_tiny_data(tmp / "data"), evaluators=["loss"],
                      tracking=[{"name": "kit-tracker", "options": dict(options or {})}], output={"dir": str(tmp / "adapter")})
    raw["training"].update(max_steps=3, eval_every=2, checkpoint_every=0)
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    plugin = ("plugtune-kit-tracker", _Registers("kit-tracker", _spying_tracker(cls, calls), kind="tracker"))
    with plugin_system_with([*(extra_plugins or []), plugin]) as system:
        result = plugtune.run(recipe, plugins=system, show_progress=False)
        left = [p for p in system.pm.get_plugins() if isinstance(p, cls)]
    assert not left, f"{cls.__name__}: still registered as a plugin after the run"
    expected = {"on_train_start": 1, "on_step_end": 3, "on_evaluate": 3, "on_train_end": 1, "on_train_failed": 0}
    for hook, count in expected.items():
        if hasattr(cls, hook):
            got = len(calls.get(hook, []))
            assert got == count, f"{cls.__name__}.{hook}: called {got} times in a 3-step run, expected {count} (check its @hookimpl mark and parameter names)"
    if hasattr(cls, "on_step_end"):
        assert [c["step"] for c in calls["on_step_end"] if "step" in c] in ([1, 2, 3], []), f"{cls.__name__}: steps out of order"
    if calls.get("on_train_end") and "adapter_dir" in calls["on_train_end"][0]:
        assert calls["on_train_end"][0]["adapter_dir"] == str(result.adapter_dir)
    return calls


def sample_eval_batches(task: Any) -> list[Any]:
    """Three small evaluation batches fitting ``task`` (class indices for classification,
    token-id tuples for causal LMs), with per-example scores and losses."""
    from plugtune.kernel.components import EvalBatch

    rng = random.Random(0)
    batches = []
    for _ in range(3):
        if task.is_classification:
            n_labels = len(task.labels or [0, 1])
            refs = [rng.randrange(n_labels) for _ in range(6)]
            preds = [r if rng.random() < 0.6 else rng.randrange(n_labels) for r in refs]
        else:
            refs = [tuple(rng.randrange(5, 20) for _ in range(3)) for _ in range(6)]
            preds = [r if rng.random() < 0.5 else tuple(reversed(r)) for r in refs]
        losses = [rng.uniform(0.5, 3.0) for _ in refs]
        batches.append(EvalBatch(preds, refs, sum(losses) * 3, 3 * len(refs), scores=[rng.random() for _ in refs],
                                 losses=losses, examples=[{"text": "a b c", "label": "x"} for _ in refs],
                                 generated=["a b" for _ in refs], reference_texts=["a b c" for _ in refs]))
    return batches


def check_evaluator(name_or_cls: Any, options: dict[str, Any] | None = None, *, task: Any,
                    batches: list[Any] | None = None, extra_plugins: list[tuple[str, Any]] | None = None) -> dict[str, float]:
    """An evaluator's contract over ``batches`` (default :func:`sample_eval_batches`):
    ``compute()`` after ``reset``/``update`` gives named floats; the same batches give the
    same metrics; ``reset`` really resets (after it, the first batch alone gives what a fresh
    instance gives for it). Returns the metrics over all batches."""
    cls = _component("evaluator", name_or_cls, extra_plugins)
    batches = batches if batches is not None else sample_eval_batches(task)
    bound = cls.Options.model_validate(dict(options or {}))

    def metrics(evaluator: Any, over: list[Any]) -> dict[str, float]:
        evaluator.reset()
        for batch in over:
            evaluator.update(batch)
        return evaluator.compute()

    evaluator = cls(bound, task)
    first = metrics(evaluator, batches)
    assert isinstance(first, dict) and first, f"{cls.__name__}.compute() returned {first!r}, not a dict of metrics"
    bad = {k: v for k, v in first.items() if not isinstance(k, str) or not isinstance(v, float)}
    assert not bad, f"{cls.__name__}.compute() must give str -> float; got {bad}"
    assert repr(metrics(cls(bound, task), batches)) == repr(first), f"{cls.__name__}: the same batches gave other metrics"
    reused = metrics(evaluator, batches[:1])
    assert repr(reused) == repr(metrics(cls(bound, task), batches[:1])), f"{cls.__name__}: reset() does not reset (earlier batches still count)"
    return first


# -- tasks --------------------------------------------------------------------------------------


def _task_component(name_or_cls: Any, system: Any) -> Any:
    """The registered task component for a name, or for a task class (its registration)."""
    if isinstance(name_or_cls, str):
        return system.get("task", name_or_cls)
    for component in system.components.get("task", {}).values():
        if component.obj is name_or_cls:
            return component
    raise AssertionError(f"{getattr(name_or_cls, '__name__', name_or_cls)} is not registered as a task "
                         f"(pass its plugin in extra_plugins)")


def _tiny_head_model(base: Path, task: Any) -> Any:
    """The tiny base loaded with the task's head (``lm``: causal LM; ``classifier``: a fresh
    classification head over the task's labels), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    if task.head == "classifier":
        labels = list(task.labels or [])
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base), num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base))
    return model.eval()


def check_task(name_or_cls: Any, options: dict[str, Any], *, tmp_path: Path, bad_options: list[dict[str, Any]] = (),
               data: Path | None = None, base_model: Path | None = None, max_length: int = 48,
               train: bool = True, method: dict[str, Any] | None = None, training: dict[str, Any] | None = None,
               extra_plugins: list[tuple[str, Any]] | None = None) -> Any:
    """A task's contract, on the tiny models and data (or ``base_model``/``data``: a table
    file the ``table`` loader reads):

    * ``options`` validate in a recipe's ``task`` block; each of ``bad_options`` and an
      unknown key is refused at recipe validation with a problem naming its field
      (``task.<field>: ...``, or ``task: ...`` for a rule across fields);
    * ``required_fields()`` are columns of the data;
    * after ``setup(train)``, ``encode`` gives lists of ints, at most ``max_length`` long
      (also for a tight ``max_length`` of 4);
      labels in the batch format: for an ``lm`` head one label per token, each ``-100`` or
      that position's token id, and some row with a label; for a ``classifier`` head one class
      index into ``labels``;
    * ``collate`` gives ``input_ids``/``attention_mask``/``labels`` (long, ``(B, T)``, labels
      ``(B, T)`` with ``-100`` on padding or ``(B,)``), right-padded with the pad id;
    * ``eval_batch`` on the tiny model's real logits gives one prediction and one reference
      per example (the references are the class indices for a classifier);
    * a task with its own loss (:class:`~plugtune.sdk.ComputesLoss`) instead: ``collate`` gives
      2-D long ``input_ids``/``attention_mask``, ``reference_scores`` one row per example,
      ``training_loss`` a finite scalar with a graph, ``evaluate_batch`` one prediction per example;
    * ``to_dict()`` is JSON-able and ``build_task`` of it gives an equal task;
    * with ``train``, a short training run (``method``, default LoRA) with the task lowers the
      held-out loss.

    Returns the task built from ``options`` (set up on the training split)."""
    import torch
    from transformers import AutoTokenizer

    import plugtune
    from plugtune.data.labels import IGNORE_INDEX
    from plugtune.data.tasks import build_task
    from plugtune.kernel.errors import RecipeError
    from plugtune.training.recipe import load_recipe

    tmp = Path(tmp_path).resolve()
    with plugin_system_with(extra_plugins) as system:
        component = _task_component(name_or_cls, system)
        name, cls = component.name, component.obj
        head = getattr(cls, "head", None)
        assert head in ("lm", "classifier"), f"{cls.__name__}.head is {head!r}; the core knows 'lm' and 'classifier'"
        classification = head == "classifier"
        base = base_model or (build_tiny_bert if classification else build_tiny_llama)(tmp / "base")
        data = data or write_tiny_data(tmp / "data") / ("sentiment.csv" if classification else "sft.jsonl")

        def raw_recipe(task_block: dict[str, Any], tag: str) -> dict[str, Any]:
            raw = recipe_dict(base, Path(data).parent, classification=classification, evaluators=["loss"],
                              task={"type": name, **task_block}, output={"dir": str(tmp / "adapters" / tag)})
            raw["data"] = {"loader": "table", "options": {"path": str(data), "test_size": 0.25}}
            if method is not None:
                raw["method"] = method
            raw["training"].update(training or {})
            return raw

        # options, at recipe validation
        recipe = load_recipe(raw=raw_recipe(dict(options), "good"), base_dir=tmp, plugins=system)
        for bad in [*bad_options, {**options, "no_such_option_kit": 1}]:
            try:
                load_recipe(raw=raw_recipe(dict(bad), "bad"), base_dir=tmp, plugins=system)
            except RecipeError as exc:
                assert any(p.startswith(("task.", "task:")) for p in exc.problems), \
                    f"{name}: task options {bad} were refused, but no problem names task or a task.<field>: {exc.problems}"
            else:
                raise AssertionError(f"{name}: task options {bad} were accepted at recipe validation")
        task = recipe.task
        assert isinstance(task, cls) and task.type == name, f"{name}: the recipe built {task!r}, not a {cls.__name__} named {name!r}"

        # the data's columns
        loader = recipe.loader.build()
        columns = set(loader.columns())
        missing = sorted(set(task.required_fields()) - columns)
        assert not missing, f"{name}: required_fields() names {missing}, which the data lacks (columns {sorted(columns)})"
        splits = loader.load(0)

        # setup, encode
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        task.setup(splits["train"])
        if classification:
            assert task.labels, f"{name}: a classifier task has no labels after setup()"
        rows = [task.encode(example, tokenizer, max_length) for example in splits["train"][:8]]
        tight = [task.encode(example, tokenizer, 4) for example in splits["train"][:8]]
        for i, row in enumerate(tight):
            assert len(row["input_ids"]) <= 4 and len(row["labels"]) <= (1 if classification else 4), \
                f"{name}: encode(max_length=4) row {i} has {len(row['input_ids'])} tokens and {len(row['labels'])} labels"
        for i, row in enumerate(rows):
            ids, labels = row.get("input_ids"), row.get("labels")
            assert isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids), \
                f"{name}: encode() row {i}: input_ids must be a non-empty list of int, got {ids!r}"
            assert len(ids) <= max_length, f"{name}: encode() row {i} has {len(ids)} tokens, over max_length {max_length}"
            assert isinstance(labels, list) and all(isinstance(t, int) for t in labels), \
                f"{name}: encode() row {i}: labels must be a list of int, got {labels!r}"
            if classification:
                assert len(labels) == 1 and 0 <= labels[0] < len(task.labels), \
                    f"{name}: encode() row {i}: a classifier's labels are one class index into {task.labels}, got {labels}"
            else:
                assert len(labels) == len(ids), f"{name}: encode() row {i}: {len(labels)} labels for {len(ids)} tokens"
                wrong = [t for t, (l, x) in enumerate(zip(labels, ids)) if l != IGNORE_INDEX and l != x]
                assert not wrong, (f"{name}: encode() row {i}: a label is the token id at its position or {IGNORE_INDEX} "
                                   f"(the loss shifts); positions {wrong[:4]} hold something else")
        if not classification:
            assert any(l != IGNORE_INDEX for r in rows for l in r["labels"]), \
                f"{name}: no row encoded with max_length {max_length} has a label to learn"

        # collate
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batch = task.collate(rows, pad_id)
        if hasattr(task, "training_loss"):  # a task with its own loss: its batch has its own shape
            _check_own_loss(name, task, batch, _tiny_head_model(base, task), len(rows))
        else:
            _check_batch_and_eval(name, task, batch, rows, pad_id, base, classification)
        # to_dict round-trip
        recorded = task.to_dict()
        json.dumps(recorded)
        assert recorded.get("type") == name, f"{name}: to_dict()['type'] is {recorded.get('type')!r}"
        again = build_task(json.loads(json.dumps(recorded)), system)
        assert type(again) is type(task) and again.to_dict() == recorded and again == task, \
            f"{name}: build_task(to_dict()) gives another task: {again.to_dict()} vs {recorded}"

        # a short training run
        if train:
            raw = raw_recipe(dict(options), "trained")
            path = tmp / "task-recipe.yaml"
            path.write_text(yaml.safe_dump(raw, sort_keys=False))
            result_run = plugtune.run(path, plugins=system, show_progress=False)
            before, after = result_run.before["loss"], result_run.after["loss"]
            assert after < before, f"{name}: training with this task did not lower the held-out loss ({before:.4f} -> {after:.4f})"
    return task


def _check_batch_and_eval(name: str, task: Any, batch: dict[str, Any], rows: list[dict[str, Any]], pad_id: int,
                          base: Path, classification: bool) -> None:
    """The core's batch format (see :class:`~plugtune.sdk.Task`) and ``eval_batch`` on the
    tiny model's real logits."""
    import torch

    from plugtune.data.labels import IGNORE_INDEX

    n, width = len(rows), max(len(r["input_ids"]) for r in rows)
    for key in ("input_ids", "attention_mask", "labels"):
        assert key in batch, f"{name}: collate() gave keys {sorted(batch)}, no {key!r}"
        assert batch[key].dtype == torch.long, f"{name}: collate()[{key!r}] is {batch[key].dtype}, not torch.long"
    for key in ("input_ids", "attention_mask", *(() if classification else ("labels",))):
        assert tuple(batch[key].shape) == (n, width), f"{name}: collate()[{key!r}] has shape {tuple(batch[key].shape)}, not {(n, width)}"
    if classification:
        assert tuple(batch["labels"].shape) == (n,), f"{name}: a classifier's labels collate to (B,), got {tuple(batch['labels'].shape)}"
        assert batch["labels"].tolist() == [r["labels"][0] for r in rows], f"{name}: collate() changed the class indices"
    for i, row in enumerate(rows):
        k = len(row["input_ids"])
        mask, ids = batch["attention_mask"][i], batch["input_ids"][i]
        assert mask[:k].eq(1).all() and mask[k:].eq(0).all(), f"{name}: collate() row {i}: attention_mask is not 1 on its {k} tokens then 0"
        assert ids[:k].tolist() == row["input_ids"] and ids[k:].eq(pad_id).all(), f"{name}: collate() row {i} is not right-padded with {pad_id}"
        if not classification:
            assert batch["labels"][i, :k].tolist() == row["labels"] and batch["labels"][i, k:].eq(IGNORE_INDEX).all(), \
                f"{name}: collate() row {i}: labels are not the row's, then {IGNORE_INDEX} on padding"

    # eval_batch on real logits
    model = _tiny_head_model(base, task)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    result = task.eval_batch(logits, batch)
    assert len(result.predictions) == n and len(result.references) == n, \
        f"{name}: eval_batch gave {len(result.predictions)} predictions and {len(result.references)} references for {n} examples"
    if classification:
        assert result.references == batch["labels"].tolist(), f"{name}: a classifier's references are its class indices"
    assert result.n_targets > 0, f"{name}: eval_batch counted no targets"


def _check_own_loss(name: str, task: Any, batch: dict[str, Any], model: Any, n: int) -> None:
    """A :class:`~plugtune.sdk.ComputesLoss` task: the batch holds long ``input_ids`` and
    ``attention_mask``; ``reference_scores`` give one row per example; ``training_loss`` is a
    finite scalar whose graph reaches the model's weights; ``evaluate_batch`` gives one
    prediction and one reference per example."""
    import torch

    for key in ("input_ids", "attention_mask"):
        assert key in batch and batch[key].dtype == torch.long and batch[key].dim() == 2, \
            f"{name}: collate() must give a 2-D long {key!r} (regularizers and the token count read it)"
    mode = getattr(task, "reference", None)
    assert mode in ("none", "auto", "adapter_off", "precomputed", "copy"), f"{name}: reference is {mode!r}, not a ReferenceMode"
    if mode != "none":
        with torch.no_grad():
            scores = task.reference_scores(model, batch)
        assert isinstance(scores, torch.Tensor) and scores.dim() == 2 and scores.size(0) == n, \
            f"{name}: reference_scores must be a (B, k) tensor for {n} examples, got {getattr(scores, 'shape', scores)!r}"
        batch = {**batch, "reference": scores.float()}
    result = task.training_loss(model, batch)
    loss = result.loss
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and torch.isfinite(loss), f"{name}: training_loss gave {loss!r}"
    assert loss.requires_grad, f"{name}: training_loss has no graph back to the model's weights"
    assert isinstance(result.tokens, int) and result.tokens > 0, f"{name}: TaskLoss.tokens is {result.tokens!r}"
    assert all(isinstance(v, float) for v in result.terms.values()), f"{name}: TaskLoss.terms must be floats"
    with torch.no_grad():
        evaluated = task.evaluate_batch(model, batch)
    assert len(evaluated.predictions) == n and len(evaluated.references) == n, \
        f"{name}: evaluate_batch gave {len(evaluated.predictions)} predictions for {n} examples"
    assert all(len(v) == n for v in evaluated.values.values()), f"{name}: evaluate_batch values are not one per example"
