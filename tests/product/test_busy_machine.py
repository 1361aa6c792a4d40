"""Every locdiff process makes torch's OpenMP threads sleep, not spin, while they wait (a spinning
thread on a busy machine burns the slice its partner needs: benchmarks/bench_train_load.py), and a
value the user set wins. Checked in fresh interpreters, where libgomp reads the setting as it loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = "import locdiff, os; print(os.environ.get('OMP_WAIT_POLICY'))"


def _probe(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**base, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_locdiff_processes_wait_passively_unless_told_otherwise():
    assert _probe()[0] == "PASSIVE"
    assert _probe(OMP_WAIT_POLICY="ACTIVE")[0] == "ACTIVE"
