#!/usr/bin/env bash
# An 8-trial sweep on AG News within a 20-minute budget, against the recipe as written (the
# baseline row), selected on 10% of train, the best scored once on AG News dev.
#   bash bench/sweep_agnews.sh            # results: bench/out/sweep-agnews/leaderboard.md, test.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
start=$(date +%s)
HF_HUB_OFFLINE=1 "$PY" -m plugtune.cli sweep bench/recipes/agnews-minilm-lora.yaml output.dir=bench/out/sweep-agnews-best \
  --space bench/spaces/agnews-lora.yaml --trials 8 --budget "${BUDGET:-20m}" --dir bench/out/sweep-agnews --fresh --overwrite "$@"
echo "sweep wall time: $(( $(date +%s) - start )) s"
