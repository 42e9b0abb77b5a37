"""bench/compile_time.py keeps working (a smoke run on the smallest variant; no timing assertions)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_compile_time_script_runs_and_reports():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "bench/compile_time.py", "--variant", "S/8", "--scan"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["variant"] == "S/8" and out["scan"] is True and out["platform"] == "cpu"
    assert 0 < out["compile_s"] <= out["total_s"]
