"""locdiff: Prefect pipelines, storage, datasets and CLI around locdiff_core."""

import os

# torch's OpenMP threads (libgomp) spin while they wait at a barrier. On a busy machine a spinning thread
# burns the time slice its partner needs, and training ran 3-20x slower than its fair share
# (benchmarks/bench_train_load.py). Waiting threads sleep instead; libgomp reads this when it loads, so
# it must be set before torch is imported, which importing locdiff first does (CLI, flow runs). A value
# already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
