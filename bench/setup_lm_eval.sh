#!/usr/bin/env bash
# Make bench/.venv-lmeval: lm-evaluation-harness 0.4.13 beside plugtune, for bench/lm_eval_check.py.
#   bash bench/setup_lm_eval.sh      (idempotent)
# plugtune is installed editable from this checkout, and every package the main .venv also has
# is held to the main .venv's version (its `pip freeze` is the constraints file), so the harness
# model and `plugtune serve` run the same torch and transformers.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
venv="$here/.venv-lmeval"
main="${PLUGTUNE_VENV:-$root/.venv}"
version="${LM_EVAL_VERSION:-0.4.13}"
py="${PYTHON:-python3.11}"

if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
fi
constraints="$venv/constraints.txt"
if [ -x "$main/bin/python" ]; then
    # Pins only: editable and direct-URL lines (plugtune itself) are not constraints.
    "$main/bin/python" -m pip freeze --exclude-editable 2>/dev/null | grep -E '^[A-Za-z0-9_.-]+==' > "$constraints"
else
    : > "$constraints"
    echo "setup_lm_eval: warning: no main venv at $main; plugtune's dependencies are not pinned to it" >&2
fi
# The api extra: local-completions needs tenacity, aiohttp and tiktoken.
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys, tenacity, aiohttp; sys.exit(m.version('lm_eval') != '$version')" 2>/dev/null; then
    "$venv/bin/python" -m pip install -q -c "$constraints" "lm-eval[api]==$version"
fi
# plugtune and its own dependencies, at the main venv's versions.
if ! "$venv/bin/python" -c "import plugtune, sys; sys.exit(not plugtune.__file__.startswith('$root/'))" 2>/dev/null; then
    "$venv/bin/python" -m pip install -q -c "$constraints" -e "$root"
    rm -rf "$root"/*.egg-info "$root"/core/*.egg-info
fi
"$venv/bin/python" -c "import lm_eval, plugtune, torch, transformers; print('lm_eval', '$version', 'plugtune', plugtune.__file__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "setup_lm_eval: $venv ready"
