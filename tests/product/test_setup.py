"""`make demo` and `make test` run the set-up first when it is missing (no .venv) or stale (older than
pyproject.toml), and only then (dry runs of the real Makefile in a scratch copy)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _dry(folder: Path, target: str) -> str:
    out = subprocess.run(["make", "-n", target], cwd=folder, capture_output=True, text=True, check=True)
    return out.stdout


def test_demo_and_test_set_up_only_when_missing_or_stale(tmp_path):
    for f in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / f, tmp_path / f)
    for target, command in (("test", "pytest"), ("demo", "locdiff demo")):
        stamp = tmp_path / ".venv" / ".setup-done"
        shutil.rmtree(tmp_path / ".venv", ignore_errors=True)
        missing = _dry(tmp_path, target)  # no .venv
        assert "pip install -q -e '.[dev]'" in missing and "chromium" in missing and command in missing
        stamp.parent.mkdir()
        stamp.touch()
        now = time.time()
        os.utime(tmp_path / "pyproject.toml", (now - 60, now - 60))
        fresh = _dry(tmp_path, target)  # set up after the last change to pyproject.toml
        assert "pip install" not in fresh and command in fresh
        os.utime(tmp_path / "pyproject.toml", (now + 60, now + 60))
        stale = _dry(tmp_path, target)  # pyproject.toml changed since
        assert "pip install -q -e '.[dev]'" in stale and command in stale
