"""Sharing adapters through the Hugging Face hub: ``plugtune fetch hf://...`` and ``plugtune push``.

    fetch_adapter("hf://acme/support-lora")   # snapshot_download, then verified like any adapter
    push_adapter("adapters/quickstart", "acme/support-lora", private=True)

Both go through huggingface_hub (``snapshot_download``; ``HfApi.create_repo`` and
``upload_folder``), which honours ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, ``HF_TOKEN`` and a
``hf auth login`` token. Network and authentication failures become one
:class:`~plugtune.kernel.errors.AdapterError` line (what, how to fix).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from plugtune.artifacts.adapters import (ADAPTER_FILES, CONFIG_FILE, MANIFEST_FILE, SHAREABLE_NAME, read_adapter,
                                         read_manifest, verify_listed_files)
from plugtune.artifacts.card import CARD_FILE, is_ours, model_card
from plugtune.artifacts.hub import REPO_ID, REVISION, first_line, parse_hub_ref
from plugtune.artifacts.outputs import fsync_write
from plugtune.kernel.errors import AdapterError


def _endpoint(endpoint: str | None) -> str | None:
    return (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None


def network_error(what: str, exc: BaseException, endpoint: str | None) -> AdapterError:
    """One line for a failed hub call: authentication, a missing repo, the network, offline mode."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    where = endpoint or "the Hugging Face hub"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, OfflineModeIsEnabled) or isinstance(exc.__cause__, OfflineModeIsEnabled):
        return AdapterError(f"{what}: HF_HUB_OFFLINE is set; unset it (HF_HUB_OFFLINE=0) to reach {where}")
    if status in (401, 403):
        return AdapterError(f"{what}: {where} refused the token (HTTP {status}); log in with `hf auth login`, set "
                            f"HF_TOKEN, or pass --token with write access")
    if isinstance(exc, RepositoryNotFoundError) or status == 404:
        return AdapterError(f"{what}: not found on {where} (HTTP 404); check the name and that your token can see it")
    if isinstance(exc, HfHubHTTPError):
        return AdapterError(f"{what}: {where} answered HTTP {status} ({first_line(exc)}); try again later")
    return AdapterError(f"{what}: cannot reach {where} ({type(exc).__name__}: {first_line(exc)}); "
                        f"check the network, or --endpoint / HF_ENDPOINT")


def fetch_adapter(value: str, *, endpoint: str | None = None, token: str | None = None) -> Path:
    """Download ``hf://org/name[@revision]`` into the local Hugging Face cache and verify it
    as an adapter (manifest, sizes, hashes); returns the snapshot folder. Offline
    (HF_HUB_OFFLINE), a snapshot already cached is verified and returned; one that is not
    is one line."""
    from huggingface_hub import snapshot_download

    ref = parse_hub_ref(value)
    if ref is None:
        raise AdapterError(f"{value!r} is not a hub adapter reference (hf://ORG/NAME)")
    endpoint = _endpoint(endpoint)
    try:
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, endpoint=endpoint, token=token))
    except Exception as exc:  # noqa: BLE001 - every failure of the download is one line
        raise network_error(f"fetching {ref}", exc, endpoint) from None
    verify_listed_files(folder, read_adapter(folder).manifest)  # not an adapter, or files not as recorded: refused
    return folder


def adapter_files(folder: Path) -> list[str]:
    """The files that make up the adapter in ``folder``: the weights, config and manifest, the
    files the manifest lists (checked: plain names, regular files, sizes and hashes as
    recorded), and the model card; never checkpoints, logs, staging or lock files. Each is a
    plain name (:data:`SHAREABLE_NAME`), so as an ``allow_patterns`` entry it matches itself only."""
    manifest = read_manifest(folder)
    verify_listed_files(folder, manifest)
    names = [*ADAPTER_FILES, *manifest.files, CARD_FILE]
    for name in names:
        if (folder / name).is_symlink():
            raise AdapterError(f"{folder / name}: a symbolic link; push uploads only regular files inside the "
                               f"adapter folder (copy the file in)")
    return [n for n in dict.fromkeys(names) if SHAREABLE_NAME.fullmatch(n) and (folder / n).is_file()]


def refresh_card(folder: Path, repo_id: str) -> None:
    """Rewrite plugtune's model card in ``folder`` (written when missing) so its loading
    snippets name ``repo_id``, atomically; a README the user wrote is left alone, and a card
    that cannot be made or written leaves the folder as it was, with a warning."""
    readme = folder / CARD_FILE
    if readme.is_symlink() or (readme.exists() and not is_ours(readme)):
        return
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        config_path = folder / CONFIG_FILE
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        text = str(model_card(manifest, config, repo_id=repo_id))
    except Exception as exc:  # noqa: BLE001 - the card is best-effort; the adapter goes up anyway
        print(f"warning: could not refresh the model card in {folder} ({type(exc).__name__}: {exc})", file=sys.stderr)
        return
    staged = folder / f".{CARD_FILE}.tmp-{os.getpid()}"
    try:
        fsync_write(staged, text.encode())
        os.replace(staged, readme)
    except OSError as exc:  # a read-only folder still pushes, with the card it has
        staged.unlink(missing_ok=True)
        print(f"warning: could not refresh the model card in {folder} ({exc.strerror or exc}); pushing it as it is",
              file=sys.stderr)


def push_adapter(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                 endpoint: str | None = None, token: str | None = None) -> tuple[str, list[str]]:
    """Upload the adapter in ``folder`` to the model repo ``repo_id`` (created when missing),
    after checking it reads back whole (hashes verified); returns (commit url, files sent)."""
    from huggingface_hub import HfApi

    if not REPO_ID.fullmatch(repo_id or "") or ".." in repo_id:
        raise AdapterError(f"repo {str(repo_id)[:200]!r} is not a hub repo id; write ORG/NAME (letters, digits, '.', '_', '-')")
    if revision is not None and (not REVISION.fullmatch(revision) or ".." in revision):
        raise AdapterError(f"--revision {revision[:200]!r} is not a branch name")
    path = Path(folder)
    read_adapter(path)  # refuses a folder that is not an adapter or whose weights do not match the manifest
    adapter_files(path)  # every listed file as recorded: checked before the card is touched
    refresh_card(path, repo_id)
    files = adapter_files(path)
    endpoint = _endpoint(endpoint)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=path, allow_patterns=files, revision=revision,
                                   repo_type="model", commit_message=f"plugtune push {path.name}")
    except Exception as exc:  # noqa: BLE001 - every failure of the upload is one line
        raise network_error(f"pushing {path} to {repo_id}", exc, endpoint) from None
    return str(getattr(commit, "commit_url", commit)), files
