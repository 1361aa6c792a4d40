"""locdiff: Prefect pipelines, storage, datasets and CLI around locdiff_core."""

import os
from pathlib import Path

# torch's OpenMP threads (libgomp) spin while they wait at a barrier. On a busy machine a spinning thread
# burns the time slice its partner needs: 10 training steps of the demo's preset took >= 60 s instead of
# 2-3 s at a load average of 14 on 2 cores (benchmarks/bench_train_load.py, docs/performance.md).
# Waiting threads sleep instead. libgomp reads this when it loads, so it must be set before torch is
# imported, which importing locdiff first does (CLI, flow runs). A value already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def project_dir() -> Path:
    """The project folder, the one place the project root is computed: $LOCDIFF_PROJECT_DIR, else the
    nearest parent of cwd holding locdiff's pyproject.toml, else the checkout this package is installed
    from (an editable install), else the current directory."""
    env = os.environ.get("LOCDIFF_PROJECT_DIR")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    checkout = Path(__file__).resolve().parents[1]
    for d in (*(here, *here.parents), checkout):
        pp = d / "pyproject.toml"
        if pp.is_file() and 'name = "locdiff"' in pp.read_text(errors="replace"):
            return d
    return here
