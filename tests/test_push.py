"""``plugtune push`` and ``hf://org/name`` adapters (core/artifacts/hub.py), against the hub
stand-in on 127.0.0.1 (tests/hub_standin.py): push, download with ``snapshot_download``
into a temporary cache, then offline: the same logits as the local folder, a recipe that
stacks on it validates; missing from the cache, a bad folder, a refused token: one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, constants, snapshot_download

from hub_standin import HubStandIn
from plugtune.artifacts.adapters import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE
from plugtune.artifacts.card import CARD_FILE
from plugtune.cli import main
from plugtune.serving.host import AdapterHost
from plugtune.testing import recipe_dict
from plugtune.training.recipe import load_recipe

TOKEN = "hf_standin_secret"
PROBE = ["what is the colour of the sky ?", "the grass"]


@pytest.fixture(scope="module")
def hub():
    standin = HubStandIn(token=TOKEN)
    endpoint, stop = standin.serve()
    yield standin, endpoint
    stop()
    shutil.rmtree(standin.blobs, ignore_errors=True)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch) -> Path:
    """A fresh Hugging Face cache, online (the stand-in is the only hub there is); tests go
    offline with ``monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)``."""
    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return cache


@pytest.fixture
def adapter(method_kits, tmp_path: Path) -> Path:
    """A trained LoRA adapter copied out (push rewrites its card), with what a run leaves
    beside an adapter that must never be uploaded."""
    source, _, _ = method_kits["lora"].trained("a")
    folder = shutil.copytree(source, tmp_path / "adapter")
    (folder / "checkpoints" / "step-2").mkdir(parents=True)
    (folder / "checkpoints" / "step-2" / "state.pt").write_bytes(b"x")
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    (folder / ".adapter.lock").write_text("")
    return folder


def _push(folder: Path, repo: str, endpoint: str, *extra: str) -> int:
    return main(["push", str(folder), repo, "--endpoint", endpoint, "--token", TOKEN, *extra])


def test_push_download_and_load_offline_give_the_same_logits(hub, hf_cache, adapter, method_kits, capsys, monkeypatch) -> None:
    standin, endpoint = hub
    assert _push(adapter, "acme/tiny-lora", endpoint, "--private") == 0
    assert "pushed" in capsys.readouterr().out
    sent = standin.files("acme/tiny-lora")
    assert sorted(sent) == sorted([WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE, CARD_FILE])  # no checkpoints, logs, locks
    assert all(sent[name] == (adapter / name).read_bytes() for name in sent)
    assert standin.repos["acme/tiny-lora"].private
    card = ModelCard(sent[CARD_FILE].decode())
    assert 'PeftModel.from_pretrained(base, "acme/tiny-lora")' in card.text  # the card names where it now lives

    folder = Path(snapshot_download("acme/tiny-lora", endpoint=endpoint, token=TOKEN))
    assert folder.is_relative_to(hf_cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    host = AdapterHost.from_adapters(str(adapter), device="cpu")
    name = host.load("hf://acme/tiny-lora", "from-hub")
    assert host.adapters["from-hub"].path == folder
    assert torch.equal(host.logits(PROBE, "from-hub"), host.logits(PROBE, host.active))

    from plugtune.serving.server import build_host

    served = build_host(["hf://acme/tiny-lora"], dtype="float32")  # plugtune serve hf://acme/tiny-lora
    assert torch.equal(served.logits(PROBE, "a"), host.logits(PROBE, "from-hub"))

    blend = adapter.parent / "blend"
    assert main(["combine", str(blend), "hf://acme/tiny-lora", str(adapter), "--weights", "0.5", "0.5"]) == 0
    card = ModelCard.load(blend / CARD_FILE)
    assert "## Combined from" in card.text and card.data.library_name == "peft"

    kit = method_kits["lora"]
    raw = recipe_dict("hf://acme/tiny-lora", kit._data(), name="stacked",
                      output={"dir": str(adapter.parent / "stacked")})
    recipe_file = adapter.parent / "stacked.yaml"
    recipe_file.write_text(yaml.safe_dump(raw))
    assert load_recipe(recipe_file).spec.base_model == "hf://acme/tiny-lora"
    assert main(["validate", str(recipe_file)]) == 0
    assert name == "from-hub"


def test_fetch_downloads_a_branch_and_verifies_it(hub, hf_cache, adapter, capsys, monkeypatch) -> None:
    standin, endpoint = hub
    assert _push(adapter, "acme/branched", endpoint, "--revision", "v2") == 0
    assert main(["fetch", "hf://acme/branched@v2", "--endpoint", endpoint, "--token", TOKEN]) == 0
    assert str(hf_cache) in capsys.readouterr().out
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["adapters", "--json", str(adapter)]) == 0  # the local one still lists
    from plugtune.artifacts.adapters import read_adapter

    assert read_adapter("hf://acme/branched@v2").manifest.name == read_adapter(adapter).manifest.name
    assert main(["fetch", "hf://acme/branched@v2", "--endpoint", endpoint]) == 0  # cached: verified, no network
    capsys.readouterr()
    assert main(["fetch", "hf://acme/never-fetched", "--endpoint", endpoint]) == 5
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_fetch_refuses_a_repo_that_is_not_an_adapter(hub, hf_cache, tmp_path: Path, capsys) -> None:
    standin, endpoint = hub
    api = HfApi(endpoint=endpoint, token=TOKEN)
    api.create_repo("acme/plain", exist_ok=True)
    api.upload_file(path_or_fileobj=b"just a model\n", path_in_repo="notes.txt", repo_id="acme/plain")
    assert main(["fetch", "hf://acme/plain", "--endpoint", endpoint, "--token", TOKEN]) == 5
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "is not an adapter" in err and len(err.splitlines()) == 1


def test_an_adapter_not_in_the_cache_is_one_line_everywhere(hf_cache, make_recipe, capsys, monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    expected = ("hf://acme/missing is not in the local Hugging Face cache; fetch it with "
                "`plugtune fetch hf://acme/missing` (needs network)")
    assert main(["generate", "hello", "--adapter", "hf://acme/missing"]) == 5
    assert capsys.readouterr().err == f"error: {expected}\n"
    recipe = make_recipe(base_model="hf://acme/missing")
    assert main(["validate", str(recipe)]) == 2
    assert f"base_model: {expected}" in capsys.readouterr().err
    for bad in ("hf://not a repo", "hf://acme/x@../../../etc", "hf://acme/../x"):
        assert main(["generate", "hello", "--adapter", bad]) == 5
        assert "not a hub adapter reference" in capsys.readouterr().err


def test_push_refuses_a_folder_that_is_not_a_whole_adapter(hub, hf_cache, adapter, tmp_path: Path, capsys) -> None:
    standin, endpoint = hub
    before = len(standin.requests)
    (tmp_path / "empty").mkdir()
    assert _push(tmp_path / "empty", "acme/nothing", endpoint) == 5
    assert "is not an adapter" in capsys.readouterr().err
    config = adapter / CONFIG_FILE
    original = config.read_bytes()
    config.write_bytes(original.replace(b'"r": 4', b'"r": 8'))  # same size, another rank: only the hash tells
    assert _push(adapter, "acme/retuned", endpoint) == 5
    assert "adapter_config.json: content does not match the manifest's sha256" in capsys.readouterr().err
    config.write_bytes(original)
    card = adapter / CARD_FILE
    (tmp_path / "elsewhere.md").write_text("outside\n")
    card.unlink()
    card.symlink_to(tmp_path / "elsewhere.md")
    assert _push(adapter, "acme/linked", endpoint) == 5
    assert "a symbolic link" in capsys.readouterr().err
    weights = adapter / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert _push(adapter, "acme/corrupt", endpoint) == 5
    err = capsys.readouterr().err
    assert "does not match the manifest" in err and len(err.strip().splitlines()) == 1
    assert _push(adapter, "not/a/repo", endpoint) == 5
    assert len(standin.requests) == before  # nothing was sent


def test_a_refused_token_is_one_line(hub, hf_cache, adapter, capsys) -> None:
    _, endpoint = hub
    assert main(["push", str(adapter), "acme/denied", "--endpoint", endpoint, "--token", "wrong"]) == 5
    err = capsys.readouterr().err
    assert err.startswith("error: pushing") and "HTTP 401" in err and "hf auth login" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
