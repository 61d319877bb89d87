import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["plugtune.testing"]

# Under pytest-xdist (`make test` runs `-n auto`) each worker, and every plugtune process it
# starts, takes its share of the cores instead of all of them: torch threads waiting on each
# other's cores would make both workers slower than one.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("PLUGTUNE_CORES", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
    os.environ.setdefault("OMP_NUM_THREADS", os.environ["PLUGTUNE_CORES"])

# Property tests draw the same examples on every run ("repeatable", the default), so a
# suite that passed once passes on CI; `HYPOTHESIS_PROFILE=explore make test` draws fresh
# ones to hunt for new failures (add any found as an explicit @example).
from hypothesis import settings  # noqa: E402

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def method_kits(tmp_path_factory, tiny_llama, tiny_data):
    """A conformance kit per built-in method (test_conformance.METHODS) on the tiny llama, all
    sharing one LoRA adapter; each trains its adapters on first use, once per session."""
    from plugtune.testing import MethodKit
    from test_conformance import METHODS

    first, kits = None, {}
    for name, (options, training) in METHODS.items():
        kits[name] = MethodKit(name, options, tmp_path=tmp_path_factory.mktemp(f"kit-{name}"), training=training,
                               base_model=tiny_llama, data_dir=tiny_data, lora_from=first)
        first = first or kits[name]
    return kits
