"""lm-evaluation-harness against ``plugtune serve`` and through the AdapterHost-backed harness
model give the same scores (bench/lm_eval_check.py on a few documents of its local task).
Needs lm-eval, which is a peer and not a dependency: it lives in bench/.venv-lmeval
(``bash bench/setup_lm_eval.sh``); skipped with that reason where it is absent."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LMEVAL = ROOT / "bench" / ".venv-lmeval" / "bin" / "python"


@pytest.mark.slow
def test_lm_eval_scores_equal_through_the_server_and_the_host():
    if not LMEVAL.is_file():
        pytest.skip("lm-eval is not installed (bash bench/setup_lm_eval.sh makes bench/.venv-lmeval)")
    if not (ROOT / "adapters" / "quickstart" / "plugtune.json").is_file():
        pytest.skip("adapters/quickstart is not trained (make demo)")
    done = subprocess.run([str(LMEVAL), str(ROOT / "bench" / "lm_eval_check.py"), "--adapter", "adapters/quickstart",
                           "--limit", "12", "--no-write"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "**no**" not in done.stdout
