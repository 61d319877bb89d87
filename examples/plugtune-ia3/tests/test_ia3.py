"""plugtune-ia3 through plugtune's conformance kit, and how it shows on a host."""

from __future__ import annotations

import os

import pytest
import torch

from plugtune.testing import MethodKit, handler_capabilities, hosted_handler

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPTIONS = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
TRAINING = {"learning_rate": 5e-2}


def registered() -> list[tuple[str, object]]:
    """The plugin in code, unless the distribution is installed (then its entry point registers it)."""
    import importlib.metadata as md

    try:
        md.distribution("plugtune-ia3")
        return []
    except md.PackageNotFoundError:
        import plugtune_ia3.plugin

        return [("ia3", plugtune_ia3.plugin)]


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> MethodKit:
    return MethodKit("example_ia3", OPTIONS, tmp_path=tmp_path_factory.mktemp("ia3-kit"), extra_plugins=registered(),
                     training=TRAINING)


@pytest.mark.parametrize("check", MethodKit.CHECKS)
def test_ia3_meets_the_contract(kit: MethodKit, check: str) -> None:
    getattr(kit, f"check_{check}")()


def test_the_handler_declares_its_capabilities(kit: MethodKit) -> None:
    with kit.host("a") as host:
        assert handler_capabilities(hosted_handler(host, "a")) == ["MixesRows", "Folds", "Merges", "ReportsResidentBytes"]


def test_resident_bytes_counts_the_vectors_and_wrappers_go_on_unload(kit: MethodKit) -> None:
    with kit.host("a", "b") as host:
        record = {r["name"]: r for r in host.list()}
        # 2 layers x (k_proj 16 + v_proj 16 + down_proj 64) fp32 values
        assert record["a"]["resident_bytes"] == 2 * (16 + 16 + 64) * 4
        handler = hosted_handler(host, "a")
        assert hosted_handler(host, "b") is handler
        host.unload("a")
        host.unload("b")
        assert not any(type(m).__name__ == "ScaledLayer" for m in host.base.model.modules())


def test_an_ia3_adapter_really_changes_the_logits(kit: MethodKit) -> None:
    with kit.host("a") as host:
        texts = ["the film was great"]
        assert not torch.allclose(host.logits(texts, "a"), host.logits(texts, None))


def test_a_classification_recipe_is_refused_at_validation(tiny_bert, tiny_data) -> None:
    import plugtune
    from plugtune.sdk import RecipeError
    from plugtune.testing import plugin_system_with, recipe_dict

    raw = recipe_dict(tiny_bert, tiny_data, classification=True, method={"name": "example_ia3", "options": {}})
    with plugin_system_with(registered()) as system, pytest.raises(RecipeError) as err:
        plugtune.load_recipe(raw=raw, plugins=system)
    assert "method.name: example_ia3 trains language-model heads only; task 'sequence-classification' has a classifier head" in str(err.value)
