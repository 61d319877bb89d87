import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["plugtune.testing"]

# Property tests draw the same examples on every run ("repeatable", the default), so a
# suite that passed once passes on CI; `HYPOTHESIS_PROFILE=explore make test` draws fresh
# ones to hunt for new failures (add any found as an explicit @example).
from hypothesis import settings  # noqa: E402

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
