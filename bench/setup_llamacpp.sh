#!/usr/bin/env bash
# Make bench/.venv-llamacpp: llama.cpp's Python binding, compiled CPU-only from the sdist
# (about 10 min on 2 cores), for bench/export_check.py's llama.cpp comparison.
#   flock /tmp/plugtune-heavy.lock bash bench/setup_llamacpp.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-llamacpp"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3.11}" -m venv "$venv"
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
"$venv/bin/python" -c "import llama_cpp" 2>/dev/null || "$venv/bin/python" -m pip install -q --no-cache-dir "llama-cpp-python==${LLAMA_CPP_VERSION:-0.3.36}"
"$venv/bin/python" -c "import llama_cpp; print('setup_llamacpp: llama_cpp', llama_cpp.__version__, 'in $venv')"
