# plugtune: the two commands a fresh clone needs are `make demo` and `make test`.
#
# TORCH_SPEC picks the torch build installed into the venv before plugtune. The default pins
# the release whose CPU wheel this machine kind has on disk; on a GPU machine PyPI's build of
# the same release is the CUDA one. Override it (make setup TORCH_SPEC="torch==2.6.0") or
# install torch into .venv yourself first: setup leaves an importable torch alone.

VENV ?= .venv
PY := $(VENV)/bin/python
PLUGTUNE := $(VENV)/bin/plugtune
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.plugtune-installed
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "setuptools>=77" wheel
	$(PY) -m pip install -q -e ".[test,int8,serve]"
	$(PY) -m pip check
	@touch $(STAMP)

# Fine-tune SmolLM2-135M with LoRA on the demo data, show before/after, then train a second
# adapter and swap both on one loaded base.
demo: setup
	$(PLUGTUNE) run recipes/quickstart.yaml --overwrite
	$(PLUGTUNE) run recipes/reviews-smollm2-lora.yaml --overwrite
	$(PY) examples/swap_adapters.py adapters/quickstart adapters/reviews-smollm2-lora

# One pytest worker per CPU (pytest-xdist); each takes its share of the cores for torch
# (tests/conftest.py sets PLUGTUNE_CORES). On 2 shared cores: 801-913 s (`make test`, 2026-12-03).
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= auto

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS)

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

bench: setup
	HF_HUB_OFFLINE=1 $(PY) bench/methods.py
	HF_HUB_OFFLINE=1 $(PY) bench/regularization.py
	HF_HUB_OFFLINE=1 $(PY) bench/hosting.py
	HF_HUB_OFFLINE=1 $(PY) bench/serving.py
	HF_HUB_OFFLINE=1 $(PY) bench/throughput.py
	HF_HUB_OFFLINE=1 $(PY) bench/loader_memory.py
	HF_HUB_OFFLINE=1 $(PY) bench/dpo_vs_trl.py   # TRL from $$PLUGTUNE_TRL_PATH or bench/out/trl; without it, the memory part only

clean:
	rm -rf $(VENV) .pytest_cache
