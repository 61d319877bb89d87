"""``plugtune preview`` and ``validate``'s data line: the tokenizer only, never the weights
(core/training/preview.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from plugtune.cli import main
from plugtune.data.labels import IGNORE_INDEX
from plugtune.testing import recipe_dict
from plugtune.training.preview import (
    TRAINED,
    build_preview,
    local_tokenizer,
    render_example,
    summary_line,
)
from plugtune.training.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


class WeightsLoaded(AssertionError):
    pass


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every road to model weights raises: ``from_pretrained`` of every model class,
    safetensors' readers, ``torch.load``, transformers' GGUF tensor loading."""
    import safetensors
    import safetensors.torch
    import torch
    import transformers
    import transformers.modeling_utils as modeling_utils

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise WeightsLoaded(f"weights were loaded: {args[:2]!r}")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for name in ("safe_open", "load_state_dict", "safe_load_file"):
        if hasattr(modeling_utils, name):
            monkeypatch.setattr(modeling_utils, name, refuse)


def test_the_guard_refuses_a_model_load(no_weights, tiny_llama) -> None:
    from transformers import AutoModelForCausalLM

    with pytest.raises(WeightsLoaded):
        AutoModelForCausalLM.from_pretrained(tiny_llama)


def tiny_base_for(path: Path, tiny_llama: Path, tiny_bert: Path, tiny_chat_llama: Path) -> Path:
    """The tiny model for a recipe's head; a chat recipe (or one whose prompts are chat
    messages) gets the one whose tokenizer has a chat template (the shipped ones render with
    the base tokenizer's own)."""
    task = yaml.safe_load(path.read_text(encoding="utf-8"))["task"]
    if task.get("type") == "chat" or task.get("template") == "tokenizer":  # preference pairs with chat prompts too
        return tiny_chat_llama
    return tiny_bert if task.get("type") == "sequence-classification" else tiny_llama


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_preview_of_every_shipped_recipe_on_a_tiny_model(path, tiny_llama, tiny_bert, tiny_chat_llama, no_weights,
                                                         capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    base = tiny_base_for(path, tiny_llama, tiny_bert, tiny_chat_llama)
    assert main(["preview", str(path), f"base_model={base}", "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert f"preview {yaml.safe_load(path.read_text())['name']}: task " in out
    assert "#1 train" in out and "#2 train" in out and "lengths in tokens" in out


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_preview_of_every_shipped_recipe_as_shipped(path, no_weights, capsys, monkeypatch) -> None:
    """With the recipe's own base model where its tokenizer is on this machine (an alias
    fetched once, the Hugging Face cache); otherwise skipped, saying why."""
    monkeypatch.setenv("COLUMNS", "200")
    recipe = load_recipe(path)
    found = local_tokenizer(recipe.spec.base_model)
    if found.tokenizer is None:
        pytest.skip(found.reason)
    assert main(["preview", str(path), "--rows", "1"]) == 0
    assert "#1 train" in capsys.readouterr().out


def test_a_gguf_without_its_converted_folder_reads_the_gguf_metadata(no_weights, monkeypatch) -> None:
    from plugtune.artifacts.models import local_location
    from plugtune.training import preview

    location = local_location("smollm2-135m")
    if location is None:
        pytest.skip("smollm2-135m is not fetched (plugtune fetch smollm2-135m)")
    converted = preview.converted_folder(location)
    if not (converted / "tokenizer_config.json").is_file():
        pytest.skip("the converted folder is absent: the GGUF path is what every preview takes")
    monkeypatch.setattr(preview, "converted_folder", lambda gguf: Path("/nonexistent"))
    found = local_tokenizer("smollm2-135m")
    assert found.where.endswith("(GGUF metadata)")
    from transformers import AutoTokenizer

    folder = AutoTokenizer.from_pretrained(converted)
    text = "<|im_start|>user\nMy order ORD-1 never came<|im_end|>"
    assert found.tokenizer(text)["input_ids"] == folder(text)["input_ids"]


# --------------------------------------------------------------------------------------------
# What it shows
# --------------------------------------------------------------------------------------------


def write_recipe(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def byte_level_tokenizer() -> Any:
    """A small byte-level BPE tokenizer: every character of any text survives a round trip."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["question : what is the colour of the sky ? answer : blue"] * 4,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>")


def test_trained_tokens_are_the_labels_and_text_is_never_markup() -> None:
    tokenizer = byte_level_tokenizer()
    question = "question : [bold]what[/bold] is [/] the sky ? answer :"
    prompt = tokenizer(question)["input_ids"]
    answer = tokenizer(" blue", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    row = {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}
    text = render_example(row, tokenizer)
    assert text.plain == question + " blue</s>"  # the whole row, as it decodes
    trained = "".join(text.plain[s.start:s.end] for s in text.spans if s.style in (TRAINED, "bold magenta"))
    assert trained == " blue</s>"  # the response and the end-of-text token, shown literally
    assert [text.plain[s.start:s.end] for s in text.spans if s.style == "bold magenta"] == ["</s>"]
    console = Console(record=True, width=200)
    console.print(text)
    assert question in console.export_text()  # printed as written, never read as markup


def test_rows_decode_whole_with_a_word_level_tokenizer(tiny_llama) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompt = tokenizer("question : what is the colour of the sky ? answer :")["input_ids"]
    answer = tokenizer(" blue", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    row = {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}
    assert render_example(row, tokenizer).plain == tokenizer.decode(row["input_ids"], skip_special_tokens=False)


def test_lengths_and_what_overlong_does(tiny_llama, tiny_data, tmp_path) -> None:
    long = tmp_path / "long.jsonl"
    rows = [{"question": "the " * n, "answer": "blue"} for n in (2, 4, 40, 60)] * 5
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = recipe_dict(tiny_llama, tiny_data)
    raw["data"] = {"loader": "table", "options": {"path": str(long), "test_size": 0.2}}
    for policy, words in (("truncate", "truncated at max_length 32"), ("drop", "dropped over max_length 32 (overlong: drop)"),
                          ("refuse", "over max_length 32: overlong: refuse stops the run")):
        raw["training"].update(max_length=32, overlong=policy)
        recipe = load_recipe(raw=raw, base_dir=tmp_path)
        built = build_preview(recipe, local_tokenizer(str(tiny_llama)))
        stats = built.splits["train"]
        full = sorted(stats.lengths)
        assert len(full) == 16 and stats.over == sum(1 for n in full if n > 32)
        assert stats.percentiles()["max"] == full[-1] == 4 + 60 + 2  # the prompt's 4 words, the question, the answer and eos
        if policy == "truncate":
            assert stats.cut == stats.over and len(stats.encoded) <= 16
        elif policy == "drop":
            assert stats.dropped == stats.over and len(stats.encoded) == 16 - stats.over
        else:
            assert stats.error
        assert words in summary_line(built)


def test_a_mixture_shows_each_source_share(tiny_llama, tiny_data, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    raw = recipe_dict(tiny_llama, tiny_data)
    raw["data"] = {"mix": "sample", "size": 100, "sources": [
        {"loader": "table", "options": {"path": str(tiny_data / "sft.jsonl")}, "weight": 3, "name": "qa"},
        {"loader": "table", "options": {"path": str(tiny_data / "sentiment.csv"), "columns": {"question": "text",
                                                                                             "answer": "label"}},
         "weight": 1, "name": "sentiment"}]}
    assert main(["preview", str(write_recipe(tmp_path, raw)), "--rows", "4"]) == 0
    out = capsys.readouterr().out
    assert "mixture (sample)" in out and "source qa" in out
    qa = next(line for line in out.splitlines() if line.startswith("│ qa "))
    sentiment = next(line for line in out.splitlines() if line.startswith("│ sentiment "))
    assert "75.0%" in qa and "25.0%" in sentiment


def test_the_test_split_and_rows(tiny_llama, tiny_data, tmp_path, capsys) -> None:
    path = write_recipe(tmp_path, recipe_dict(tiny_llama, tiny_data))
    assert main(["preview", str(path), "--split", "test", "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "#1 test" in out and "#2 test" not in out


def test_a_classifier_shows_its_label(tiny_bert, tiny_data, tmp_path, capsys) -> None:
    path = write_recipe(tmp_path, recipe_dict(tiny_bert, tiny_data, classification=True))
    assert main(["preview", str(path), "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "0 trained · label " in out and "[CLS]" in out


# --------------------------------------------------------------------------------------------
# The command line: validate's line, one-line errors
# --------------------------------------------------------------------------------------------


def test_validate_prints_the_data_line(tiny_llama, tiny_data, tmp_path, capsys) -> None:
    path = write_recipe(tmp_path, recipe_dict(tiny_llama, tiny_data))
    assert main(["validate", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ok ") and lines[-1].startswith("data: 192 train + 64 test rows; train tokens p50 ")
    assert "% of tokens trained; " in lines[-1] and lines[-1].endswith("truncated at max_length 48")


def test_validate_says_why_it_skipped(tiny_llama, tiny_data, tmp_path, capsys) -> None:
    path = write_recipe(tmp_path, recipe_dict("nobody/no-such-model", tiny_data))
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "data summary skipped: nobody/no-such-model is neither a folder here nor in the local Hugging Face cache "
        "(the tokenizer is needed, never the weights)")


def test_preview_errors_are_one_line(tiny_data, tmp_path) -> None:
    from test_cli import error_lines, plugtune

    path = write_recipe(tmp_path, recipe_dict("nobody/no-such-model", tiny_data))
    result = plugtune("preview", path)
    assert result.returncode == 4
    assert error_lines(result) == [
        "error: base_model: nobody/no-such-model is neither a folder here nor in the local Hugging Face cache; "
        "preview needs the tokenizer only (no weights), from a local folder, a fetched alias or the Hugging Face cache"]
    result = plugtune("preview", path, "--rows", "-1")
    assert result.returncode == 1 and error_lines(result) == ["error: --rows: -1 is out of range; use 0 or more"]
