#!/usr/bin/env bash
# The GPU check on a CUDA machine that has a CUDA build of torch but reaches no package registry
# and takes only a small upload (a GPU box lent for minutes, an air-gapped one):
#
#   bash bench/gpu_kit.sh pack   # here, with the project set up (make setup): writes .gpu-kit/
#   bash bench/gpu_kit.sh run    # there, in a copy of the repo with .gpu-kit/ beside it
#
# pack: this venv's versions of the packages plugtune needs that such a CUDA image usually
# lacks (or holds in other versions), as CPython $KIT_PYTHON wheels (bitsandbytes cut to its
# CUDA 13 and CPU libraries: the whole wheel is 43 MB of other CUDA versions), plugtune's own
# wheel, SST-2's two files (for the throughput comparison) and SmolLM2-135M's config and
# tokenizer. Not its weights: 94 MB of GGUF do not fit a 64 MiB upload, so `run` makes random
# weights of the same architecture there (bench/gpu_standin.py). Seconds per step and peak GPU
# memory do not depend on the weights' values; held-out losses do, and the results say so.
# run: installs the wheels into /tmp/gpu-kit-site (nothing on the machine is changed), makes
# the stand-in base, runs bench/gpu_check.sh's three parts, each under its own time limit so one
# that overruns does not cost the others (under 9 minutes in all), and copies the results to
# $OUT when it is set (else bench/out/gpu-kit).
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu-kit
KIT_PYTHON=${KIT_PYTHON:-3.12}
PY=${PY:-.venv/bin/python}
PACKAGES="transformers tokenizers huggingface_hub hf-xet peft accelerate datasets dill multiprocess
  pydantic pydantic_core annotated-types typing-inspection typing_extensions gguf nltk
  fastapi starlette annotated-doc uvicorn pluggy rich safetensors fsspec httpx httpcore h11 anyio
  tqdm filelock packaging typer shellingham click"
SOURCE_ONLY="rouge_score"  # published as a source archive only: built here into a (pure-Python) wheel

pack() {
  set -e
  rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/model" "$KIT/sst2"
  local pins=() sources=() name
  for name in $PACKAGES; do pins+=("$(pin "$name")"); done
  for name in $SOURCE_ONLY; do sources+=("$(pin "$name")"); done
  local platforms=()
  for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$KIT_PYTHON" --implementation cp \
    --platform manylinux2014_x86_64 "${platforms[@]}" -d "$KIT/wheels" "${pins[@]}"
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$KIT/wheels" . "${sources[@]}"
  slim_bitsandbytes
  "$PY" - "$KIT/model" <<'EOF'
import shutil, sys
from pathlib import Path
from plugtune.artifacts.models import gguf_to_hf
from plugtune.plugins.models.builtin import SMOLLM2
folder = gguf_to_hf(SMOLLM2.locate())
for f in folder.iterdir():
    if f.name != "model.safetensors":
        shutil.copy(f, Path(sys.argv[1]) / f.name)
EOF
  local sst2=${THROUGHPUT_SST2:-../shared/data/sst2}
  if [[ -f $sst2/train.tsv && -f $sst2/dev.tsv ]]; then cp "$sst2/train.tsv" "$sst2/dev.tsv" "$KIT/sst2/"; fi
  du -sh "$KIT"
}

pin() {  # NAME -> NAME==the version in this venv
  echo "$1==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1")"
}

slim_bitsandbytes() {
  # bitsandbytes' wheel holds a library per CUDA version; keep CUDA 13's and the CPU one.
  local wheel tmp
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$KIT_PYTHON" \
    --platform manylinux_2_24_x86_64 -d "$KIT/full" "$(pin bitsandbytes)"
  wheel=$(ls "$KIT"/full/bitsandbytes-*.whl)
  tmp=$(mktemp -d)
  (cd "$tmp" && unzip -q "$OLDPWD/$wheel" && find bitsandbytes -name 'libbitsandbytes_*.so' \
     ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete && zip -qr "$OLDPWD/$KIT/wheels/$(basename "$wheel")" .)
  rm -rf "$tmp" "$KIT/full"
}

run() {
  local site=/tmp/gpu-kit-site out=${OUT:-bench/out/gpu-kit} status=0
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$KIT"/wheels/*.whl || return 1
  export PYTHONPATH=$site PY=python3 PLUGTUNE_HOME=${PLUGTUNE_HOME:-/tmp/gpu-kit-home} PLUGTUNE_OFFLINE=1
  export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 THROUGHPUT_SST2=$PWD/$KIT/sst2
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
  python3 bench/gpu_standin.py "$KIT/model" || return 1
  timeout "${KIT_CHECK_S:-280}" python3 bench/gpu_check.py 2>&1 | tee "$out/gpu_check.log" || status=1
  THROUGHPUT_DEVICE=cuda THROUGHPUT_ROUNDS=${KIT_ROUNDS:-1} timeout "${KIT_THROUGHPUT_S:-130}" python3 bench/throughput.py --compare \
    2>&1 | tee "$out/throughput.log" || status=1
  tail -1 "$out/throughput.log" > "$out/compare-cuda.json"
  timeout "${KIT_SERVING_S:-100}" python3 bench/serving.py --servers plugtune --clients 32 --seconds 20 --rounds 1 --no-write \
    2>&1 | tee "$out/serving.log" || status=1
  cp bench/out/gpu_check.json BENCHMARKS.md "$out/" 2>/dev/null
  echo "gpu_kit: done in ${SECONDS} s (status $status)"
  return $status
}

case ${1:-} in
  pack) pack ;;
  run) run ;;
  *) echo "usage: bash bench/gpu_kit.sh pack|run" >&2; exit 2 ;;
esac
