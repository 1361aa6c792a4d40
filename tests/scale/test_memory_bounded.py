"""Memory outside the training loop is bounded: building the retrieval index and evaluating a run with
LocDiff-H (radius calibration on val, the gallery searched block by block) costs the same peak RSS over
a gallery of 10^6 rows as over 10^5 (within 1.3x; the old whole-split build held ~6 copies of it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from locdiff.datasets.synth import synth_embeddings
from locdiff.storage import Store

ROOT = Path(__file__).resolve().parents[2]
DIM = 64  # narrow rows keep the test fast; the old build's float32 copies still showed at 10^6

CHILD = """
import json, sys
import locdiff.stages.evals as evals
from locdiff.stages.retrieval import build_index
from locdiff.storage import Store

store_uri, big, small, run = sys.argv[1:5]
evals.CALIBRATION_ROWS = 400  # the cap's size, not its existence, is what costs time here
store = Store.from_uri(store_uri)
index = build_index(store, big)
ev = evals.evaluate_run(
    store, run, small, split="test", retrieval_key=index, baselines=["most-common-region"]
)
methods = sorted(store.manifest(ev)["metrics"])
# VmHWM: this process image's own peak (ru_maxrss would carry the forking parent's peak over exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
gallery = store.manifest(index)["gallery_size"]
print(json.dumps({"peak_mib": hwm / 1024, "gallery": gallery, "methods": methods}))
"""


def _peak(store_uri: str, rows: int) -> dict:
    """Peak RSS of build + evaluate in a fresh process, over a gallery of ``rows`` synthetic rows with a
    tiny run trained on them (so calibration reads their val split)."""
    from locdiff.stages.runs import train_run
    from tests.flows.conftest import run_inputs, tiny_config

    store = Store.from_uri(store_uri)
    big = synth_embeddings(store, f"big{rows}", rows=rows, dim=DIM, seed=rows)
    small = synth_embeddings(store, "small", rows=2000, dim=DIM, seed=1)
    config = tiny_config(embed_dim=DIM, max_steps=2, batch_size=32)
    run = train_run(store, big, config, **run_inputs(store_uri, big, config), name=f"mem{rows}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, store_uri, big, small, run],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_index_build_and_evaluation_peak_rss_is_flat_in_gallery_size(tmp_path):
    store_uri = str(tmp_path / "store")
    small, large = _peak(store_uri, 100_000), _peak(store_uri, 1_000_000)
    assert small["gallery"] == 80_000 and large["gallery"] == 800_000  # the train split: 80 % of the rows
    assert {"locdiff", "locdiff-h", "retrieval-1nn", "most-common-region"} <= set(large["methods"])
    ratio = large["peak_mib"] / small["peak_mib"]
    print(f"peak RSS 10^5: {small['peak_mib']:.0f} MiB, 10^6: {large['peak_mib']:.0f} MiB, ratio {ratio:.2f}")
    assert ratio <= 1.3, (small, large)
