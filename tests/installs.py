"""Test distributions installed with pip, for real, but never into the shared environment.

``pip install --target`` puts them in a folder of their own; only the processes a test starts
with that folder on their ``PYTHONPATH`` (:func:`process_env`) see them. An install into the
venv, and its uninstall, would reach every test running meanwhile on any xdist worker (the
entry points would come and go under them).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "NO_COLOR": "1"}
PLUGIN_SWITCHES = ("PLUGTUNE_STRICT_PLUGINS", "PLUGTUNE_DISABLE_PLUGINS", "PYTHONPATH")  # the caller's own never leak in


def installed_here(dist: str) -> bool:
    """Whether ``dist`` is installed in this environment (a second copy would register twice)."""
    try:
        md.distribution(dist)
    except md.PackageNotFoundError:
        return False
    return True


def install_into(folder: Path, *sources: Path) -> Path:
    """``pip install`` each source folder, built from a copy (no build/ or *.egg-info lands in
    the tree), without dependencies or build isolation (no network), into ``folder/site``;
    returns that folder. Skips the test where setuptools is missing (offline builds need it)."""
    pytest.importorskip("setuptools", reason="building test distributions offline needs setuptools in the venv")
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    copies = [str(shutil.copytree(source, folder / "sources" / source.name, ignore=ignore)) for source in sources]
    site = folder / "site"
    site.mkdir(parents=True, exist_ok=True)
    if copies:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
                               "--no-build-isolation", "-q", "--target", str(site), *copies],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    return site


def process_env(site: Path, *, drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """This process's environment for a child that sees the distributions in ``site``: offline,
    no plugin switches or path of the caller's (nor the names in ``drop``), then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in {*PLUGIN_SWITCHES, *drop}}
    return {**env, **OFFLINE, "PYTHONPATH": str(site), **extra}
