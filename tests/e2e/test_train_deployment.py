"""`train-mp16/default` on a real server + process worker: overrides to the sample and the tiny preset,
artifacts committed and queryable, a metrics artifact in the API, and resume after killing the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from locdiff.stack import flow_run, run_deployment, wait_flow_run
from locdiff.storage import Store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PARAMS = {
    "dataset": "bluemarble",
    "dataset_options": {"n": 240, "shard_size": 80},
    "encoder": "efficientnet-lite0",
    "preset": "tiny",
    "overrides": {"train": {"max_steps": 400, "checkpoint_every": 20, "log_every": 20}},
    "eval_datasets": [],
    "baselines": ["most-common-region"],
}


def _checkpoint_parts(store: Store) -> list[str]:
    """Checkpoint parts committed by an unfinished (not yet committed) training run."""
    base = store.root.rstrip("/") + "/runs"
    if not os.path.isdir(base):
        return []
    return [p for p in store.fs.find(base) if "/_parts/" in p]


def _kill_worker_and_flow_runs(pid: int) -> None:
    """SIGKILL the worker and every process it started (the flow run process included)."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=10)


def test_train_deployment_resumes_after_worker_kill_and_publishes(local_stack, tmp_path):
    stack, store_uri = local_stack
    params = {**PARAMS, "storage": store_uri}
    store = Store.from_uri(store_uri)

    # 1st run: kill the worker (and its flow run) as soon as training has committed a checkpoint
    worker = stack.start_worker(name="e2e-worker-1")
    fr1 = run_deployment(stack, "train-mp16/default", params)
    deadline = time.monotonic() + 400
    while not _checkpoint_parts(store):
        state = (flow_run(stack, fr1["id"]).get("state") or {}).get("type")
        assert state not in ("FAILED", "CRASHED", "COMPLETED"), f"first run ended {state} before a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.2)
    _kill_worker_and_flow_runs(worker)
    assert store.latest("runs") is None  # the run never committed
    assert (flow_run(stack, fr1["id"]).get("state") or {}).get("type") != "COMPLETED"

    # 2nd run, same parameters, fresh worker: resumes from the newest checkpoint
    stack.start_worker(name="e2e-worker-2")
    fr2 = run_deployment(stack, "train-mp16/default", params)
    fr2 = wait_flow_run(stack, fr2["id"], timeout=500)
    assert (fr2.get("state") or {}).get("type") == "COMPLETED", fr2.get("state")

    run_key = store.latest("runs")
    man = store.manifest(run_key)
    assert man["final_step"] == 400
    assert 20 <= man["start_step"] < 400 and man["start_step"] % 20 == 0  # resumed, not from 0

    # artifacts are committed and queryable with `locdiff sql`
    env = {**os.environ, **stack.env(), "LOCDIFF_STORAGE": store_uri}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "locdiff.cli",
            "sql",
            "--format",
            "json",
            "SELECT method, n FROM metrics ORDER BY method",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["method"] for r in rows] == ["locdiff", "locdiff-h", "most-common-region", "retrieval-1nn"]
    assert rows[0]["n"] > 0

    # the metrics table artifact exists in the server's API
    r = httpx.post(f"{stack.api_url}/artifacts/filter", json={"artifacts": {"type": {"any_": ["table"]}}})
    keys = {a["key"] for a in r.json()}
    assert "train-mp16-bluemarble-efficientnet-lite0-tiny-metrics" in keys

    # `locdiff predict` on a Blue Marble tile with the newest run (encoder taken from the run)
    from locdiff.datasets.bluemarble import crop_tile, encode_jpeg, load_bluemarble

    img = tmp_path / "tile.jpg"
    img.write_bytes(encode_jpeg(crop_tile(load_bluemarble(), 30.0, 31.2, 4.0, 128)))
    out = subprocess.run(
        [sys.executable, "-m", "locdiff.cli", "predict", str(img), "--map", str(tmp_path / "map.png")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    lat, lon = (float(v) for v in out.stdout.splitlines()[0].split(": ", 1)[1].split("(")[0].split(","))
    assert -90 <= lat <= 90 and -180 <= lon <= 180
    assert "mode 1:" in out.stdout
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"
