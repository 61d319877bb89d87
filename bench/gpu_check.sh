#!/usr/bin/env bash
# On a CUDA machine with the project installed (make setup): every tuning method a few steps on
# SmolLM2-135M in bf16, plus int8 and 4-bit (qlora) bases; peak GPU memory and s/step per method,
# written to BENCHMARKS.md ("gpu"); then the SFT throughput benchmark against the peer in bf16,
# and `plugtune serve`'s tokens/s under 32 clients. Non-zero exit on any failure. Under 10
# minutes (a few, usually). SST-2 is read from ../shared/data/sst2 or $THROUGHPUT_SST2 (on the
# lent GPU machine: copy it to bench/out/sst2 first and carry that folder).
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
  # Serving on the GPU: plugtune serve alone (vLLM's CPU build is the CPU peer), 4 LoRA adapters.
  HF_HUB_OFFLINE=1 timeout 150 "$PY" bench/serving.py --servers plugtune --clients 32 --seconds 20 --rounds 1 --no-write \
    | tee bench/out/serving-cuda.md
fi
