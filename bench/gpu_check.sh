#!/usr/bin/env bash
# On a CUDA machine with the project installed (make setup): every tuning method a few steps on
# SmolLM2-135M in bf16, plus int8 and 4-bit (qlora) bases; peak GPU memory and s/step per method,
# written to BENCHMARKS.md ("gpu"). Non-zero exit on any failure. Under 10 minutes (a few, usually).
#   bash bench/gpu_check.sh             # the check
#   bash bench/gpu_check.sh --dry-run   # anywhere: build and validate every case's recipe
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 timeout 570 "$PY" bench/gpu_check.py "$@"
