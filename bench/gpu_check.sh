#!/usr/bin/env bash
# On a CUDA machine with the project installed (make setup): every tuning method a few steps on
# SmolLM2-135M in bf16, plus int8 and 4-bit (qlora) bases; peak GPU memory and s/step per method,
# written to BENCHMARKS.md ("gpu"); then the SFT throughput benchmark against the peer in bf16.
# Non-zero exit on any failure. Under 10 minutes (a few, usually).
#   bash bench/gpu_check.sh             # the check
#   bash bench/gpu_check.sh --dry-run   # anywhere: build and validate every case's recipe
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 timeout 420 "$PY" bench/gpu_check.py "$@"
# The SFT throughput benchmark in bf16 on the GPU, plugtune against Trainer + peft (issue 20's
# target: at least 1.5x the peer's real tokens/s); one JSON line, kept in bench/out/throughput.
if [[ " $* " != *" --dry-run "* && " $* " != *" --cpu "* ]]; then
  mkdir -p bench/out/throughput
  HF_HUB_OFFLINE=1 THROUGHPUT_DEVICE=cuda THROUGHPUT_ROUNDS=1 timeout 150 "$PY" bench/throughput.py --compare \
    | tail -1 | tee bench/out/throughput/compare-cuda.json
fi
