#!/usr/bin/env bash
# On a CUDA machine with the project installed (make setup): every method a few steps on
# SmolLM2-135M, peak GPU memory per method; non-zero exit on any failure. Under 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
HF_HUB_OFFLINE=1 timeout 290 "$PY" bench/gpu_check.py
