"""`evaluate-latest/nightly` on a real server + process worker: deployed from prefect.yaml with its active
cron schedule, run against a bring-your-own `yfcc26k` (a CSV of image paths + coordinates, prepared with
`locdiff datasets prepare`), metrics of every method in `locdiff sql`, the report artifact in the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest

from locdiff.stack import deploy, run_deployment, wait_flow_run
from locdiff.storage import Store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

METHODS = ["locdiff", "locdiff-h", "most-common-region", "retrieval-1nn"]


def _cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "locdiff.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _tiny_run(store: Store) -> str:
    """A small committed training run on the Blue Marble sample (the nightly evaluates the newest run)."""
    from locdiff.datasets.bluemarble import build_bluemarble
    from locdiff.stages.embeddings import embed_dataset
    from locdiff.stages.runs import resolve_config, train_run

    emb_key = embed_dataset(store, build_bluemarble(store, n=120, seed=3), "efficientnet-lite0")
    config = resolve_config(
        "tiny",
        {"train": {"max_steps": 20, "log_every": 10, "eval_every": 0, "targets": "per_batch"}},
        embed_dim=int(store.manifest(emb_key)["dim"]),
    )
    return train_run(store, emb_key, config, name="nightly-e2e", preset="tiny")


def test_nightly_deployment_evaluates_a_prepared_benchmark(local_stack, tmp_path):
    from locdiff.datasets.bluemarble import crop_tile, encode_jpeg, load_bluemarble
    from locdiff.stages.reports import slug

    stack, _ = local_stack
    deploy(stack, ["nightly"])
    r = httpx.get(f"{stack.api_url}/deployments/name/evaluate-latest/nightly", timeout=10)
    r.raise_for_status()
    schedules = r.json()["schedules"]
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in schedules] == [
        ("0 3 * * *", "UTC", True)
    ]

    store_uri = "file://" + str(tmp_path / "store")  # its own store: the newest run there is ours
    store = Store.from_uri(store_uri)
    run_key = _tiny_run(store)

    # bring-your-own yfcc26k: 24 image files + a CSV of paths and coordinates (no split column: all test)
    rng = np.random.default_rng(7)
    image = load_bluemarble()
    (tmp_path / "img").mkdir()
    lines = ["id,latitude,longitude,path"]
    for i in range(24):
        lat, lon = float(rng.uniform(-50, 65)), float(rng.uniform(-180, 180))
        (tmp_path / "img" / f"{i}.jpg").write_bytes(encode_jpeg(crop_tile(image, lat, lon, 4.0, 64)))
        lines.append(f"y{i},{lat:.5f},{lon:.5f},{i}.jpg")
    (tmp_path / "yfcc26k.csv").write_text("\n".join(lines) + "\n")
    env = {**os.environ, **stack.env(), "LOCDIFF_STORAGE": store_uri, "HF_HUB_OFFLINE": "1"}
    out = _cli(
        env,
        "datasets",
        "prepare",
        "yfcc26k",
        "--manifest",
        str(tmp_path / "yfcc26k.csv"),
        "--images-root",
        str(tmp_path / "img"),
    )
    assert out.returncode == 0, out.stdout + out.stderr

    worker = stack.start_worker(name="e2e-nightly-worker")
    try:
        fr = run_deployment(stack, "evaluate-latest/nightly", {"storage": store_uri})
        fr = wait_flow_run(stack, fr["id"], timeout=600)
        assert (fr.get("state") or {}).get("type") == "COMPLETED", fr.get("state")
    finally:
        stack.stop("worker", grace_s=5)  # the next e2e test starts (and kills) its own
    assert worker > 0

    out = _cli(
        env,
        "sql",
        "--format",
        "json",
        "SELECT method, run, n, geoscore FROM metrics WHERE dataset = 'yfcc26k' ORDER BY method",
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["method"] for r in rows] == METHODS
    assert all(r["run"] == run_key and r["n"] == 24 and r["geoscore"] is not None for r in rows)

    # the report's table and markdown artifacts are in the server's API; absent benchmarks are noted
    base = slug(f"nightly evaluation of {run_key}") or "report"
    r = httpx.post(
        f"{stack.api_url}/artifacts/filter", json={"artifacts": {"key": {"any_": [base + "-report"]}}}
    )
    r.raise_for_status()
    (md,) = [a for a in r.json() if a["type"] == "markdown"]
    assert "| yfcc26k | locdiff-h |" in md["data"] and "GeoScore" in md["data"]
    assert "gws15k: skipped" in md["data"]
    r = httpx.post(
        f"{stack.api_url}/artifacts/filter", json={"artifacts": {"key": {"any_": [base + "-metrics"]}}}
    )
    (table,) = [a for a in r.json() if a["type"] == "table"]
    assert table["key"] == base + "-metrics"
