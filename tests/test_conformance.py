"""The built-in plugins through the conformance kit plugin authors use (plugtune.testing).

Each method's kit trains its adapters once (the session fixture ``method_kits`` in conftest.py,
whose adapters test_peft_tuners.py hosts together) and every contract is its own test, so a
failure names the method and the contract.
"""

from __future__ import annotations

from pathlib import Path

from typing import Any

import pytest

from plugtune.data.tasks import build_task
from plugtune.testing import MethodKit, check_data_loader, check_evaluator, check_regularizer, check_task

METHODS = {
    "lora": ({"r": 4, "alpha": 8, "target_modules": "all-linear"}, {}),
    "full": ({}, {"learning_rate": 1e-3}),
    "prefix": ({"num_virtual_tokens": 4}, {}),
    "int8": ({"r": 4, "alpha": 8, "target_modules": "all-linear"}, {}),
    "peft": ({"type": "LOKR", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, {"learning_rate": 1e-2}),
    "dora": ({"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, {"learning_rate": 1e-2}),
    "ia3": ({}, {"learning_rate": 1e-2}),
    "loha": ({"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, {"learning_rate": 1e-2}),
    "lokr": ({"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, {"learning_rate": 1e-2}),
    "vera": ({"r": 8, "target_modules": ["q_proj", "v_proj"]}, {"learning_rate": 1e-2}),
    "oft": ({"r": 0, "block_size": 4, "target_modules": ["q_proj", "v_proj"]}, {"learning_rate": 1e-2}),
    "boft": ({"block_size": 4, "target_modules": ["q_proj", "v_proj"]}, {"learning_rate": 1e-2}),
    "adalora": ({"init_r": 4, "target_r": 2, "target_modules": ["q_proj", "v_proj"]}, {"learning_rate": 1e-2}),
    "ln_tuning": ({}, {"learning_rate": 1e-2}),
    "prompt_tuning": ({"num_virtual_tokens": 4}, {"learning_rate": 5e-2}),
    "p_tuning": ({"num_virtual_tokens": 4, "encoder_hidden": 16}, {"learning_rate": 5e-2}),
    "qlora": ({"r": 4, "alpha": 8, "target_modules": "all-linear"}, {}),
}


def _int8_unavailable() -> str | None:
    """int8's own preflight: None where bitsandbytes runs 8-bit layers here (CUDA, or its CPU backend)."""
    from plugtune.plugins.methods.int8 import Int8Method

    return Int8Method(Int8Method.Options()).preflight()


def _qlora_unavailable() -> str | None:
    """qlora's own preflight: None where bitsandbytes runs 4-bit layers here."""
    from plugtune.plugins.methods.qlora import QloraMethod

    return QloraMethod(QloraMethod.Options()).preflight()


def _marks(method: str, check: str) -> list:
    marks = []
    if (method, check) in KNOWN_GAPS:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[method, check]))
    if method == "int8":
        reason = _int8_unavailable()
        marks.append(pytest.mark.skipif(reason is not None, reason=f"int8: {reason}"))
    if method == "qlora":
        reason = _qlora_unavailable()
        marks.append(pytest.mark.skipif(reason is not None, reason=f"qlora: {reason}"))
    return marks
# Contracts a built-in method does not meet, each with its reason.
KNOWN_GAPS = {
    ("int8", "save_reload"): "by design: int8 trains LoRA on an 8-bit copy of the base, and the host serves the "
                             "adapter on the full-precision base, so logits differ by the quantization error "
                             "(about 4e-2 on the tiny model)",
    ("qlora", "save_reload"): "by design, as int8: qlora trains LoRA on a 4-bit base (loaded quantized), the host "
                              "serves the adapter on the full-precision base, and logits differ by the quantization "
                              "error (about 3e-2 on the tiny model)",
}


@pytest.mark.parametrize("method, check", [
    pytest.param(m, c, marks=_marks(m, c)) for m in METHODS for c in MethodKit.CHECKS
])
def test_builtin_method_meets_the_contract(method_kits: dict[str, MethodKit], method: str, check: str) -> None:
    getattr(method_kits[method], f"check_{check}")()


def test_table_loader_meets_the_contract(tiny_data: Path) -> None:
    splits = check_data_loader("table", {"path": "sft.jsonl", "test_size": 0.25}, base_dir=tiny_data,
                               bad_options=[{"path": "missing.csv"}, {"path": "sft.jsonl", "test_size": 1.5},
                                            {"path": "sft.jsonl", "format": "xml"}])
    assert len(splits["train"]) + len(splits["test"]) == 256


def test_text_loader_meets_the_contract(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"paragraph {i} of the corpus" for i in range(20)))
    check_data_loader("text", {"path": "corpus.txt", "test_size": 0.2}, base_dir=tmp_path,
                      bad_options=[{"path": "corpus.txt", "unit": "sentence"}, {"path": "corpus.txt", "min_chars": 0}])


@pytest.mark.parametrize("name, options, classification", [
    ("word_dropout", {"p": 0.2, "seed": 3}, False),
    ("early_stopping", {"metric": "loss", "patience": 5}, False),
    ("label_smoothing", {"epsilon": 0.1}, True),
])
def test_builtin_regularizer_meets_the_contract(tmp_path: Path, name: str, options: dict, classification: bool) -> None:
    check_regularizer(name, options, tmp_path=tmp_path, classification=classification)


CLS = build_task(dict(type="sequence-classification", text="{text}", labels=["negative", "positive"]))
LM = build_task(dict(type="causal-lm", prompt="question : {question} answer :", response=" {answer}"))


@pytest.mark.parametrize("name, task", [("accuracy", CLS), ("f1", CLS), ("loss", LM), ("perplexity", LM), ("accuracy", LM)])
def test_builtin_evaluator_meets_the_contract(name: str, task: Any) -> None:
    metrics = check_evaluator(name, task=task)
    assert metrics


@pytest.mark.parametrize("name, options, bad", [
    ("causal-lm", {"prompt": "question : {question} answer :", "response": " {answer}"},
     [{"response": " {answer}"}, {"prompt": "q {question", "response": " {answer}"}]),
    ("sequence-classification", {"text": "{text}", "label": "label"}, [{"text": "{text}", "labels": "positive"}]),
])
def test_builtin_task_meets_the_contract(tmp_path: Path, name: str, options: dict, bad: list) -> None:
    task = check_task(name, options, tmp_path=tmp_path, bad_options=bad)
    assert task.type == name


# Classifiers: a head saved whole (peft's modules_to_save) by several handlers on one base.
CLASSIFIER_METHODS = {
    "loha": ({"r": 4, "alpha": 8, "target_modules": ["query", "value"]}, {"learning_rate": 1e-2}),
    "prompt_tuning": ({"num_virtual_tokens": 4}, {"learning_rate": 5e-2}),
}


@pytest.fixture(scope="module")
def classifier_kits(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, tiny_data: Path) -> dict[str, MethodKit]:
    first = None
    kits = {}
    for name, (options, training) in CLASSIFIER_METHODS.items():
        kits[name] = MethodKit(name, options, tmp_path=tmp_path_factory.mktemp(f"kit-cls-{name}"), classification=True,
                               training=training, base_model=tiny_bert, data_dir=tiny_data, lora_from=first)
        first = first or kits[name]
    return kits


@pytest.mark.parametrize("method", CLASSIFIER_METHODS)
@pytest.mark.parametrize("check", ["save_reload", "composes_with_lora", "mixed_batch"])
def test_classifier_heads_of_several_handlers_compose(classifier_kits: dict[str, MethodKit], method: str, check: str) -> None:
    getattr(classifier_kits[method], f"check_{check}")()
