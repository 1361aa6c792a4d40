"""Download rehearsal: the real `train-mp16/default` prepare stage on a real Prefect server and worker,
downloading MP16 from a local mirror with faults, the worker killed once mid-way and the run resumed.

- A local mirror folder holds ``mp16_urls.csv`` (no header: id, URL) and ``mp16_places365.csv``
  (``IMG_ID,AUTHOR,LAT,LON,...``) as GeoEstimation publishes them, ``--n`` rows; the URLs point at the
  fault-injecting server of ``tests.servers`` (its own process): synthetic JPEGs of varied sizes,
  ``--latency`` (50-200 ms), 5 % dead links, 1 % resets, 1 % 5 s stalls.
- A stack (``locdiff.stack.Stack``: Prefect server on a free port, process worker, temporary home and
  store) runs the deployment with ``dataset=mp16`` and ``dataset_options`` naming the mirror; the
  dataset is missing, so the prepare stage downloads it (``locdiff.datasets.sources``).
- When ``--kill-at`` of the shards are committed as parts, the worker and its flow run are SIGKILLed; a
  new worker and a new flow run of the same deployment resume. When the dataset is committed the flow
  run is cancelled (the later stages are not part of this rehearsal) and the stack stopped.

Prints images/s (of the whole, kill and restart included, and of each attempt), the peak RSS of the
worker's process tree, the store's disk use, and the dead/failed counts from the committed manifest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.rehearse_mp16 import TreeRSS  # noqa: E402
from locdiff.stack import Stack, deploy, flow_run, free_port, run_deployment  # noqa: E402
from locdiff.storage import Store  # noqa: E402
from tests.servers import Chaos, chaos_server  # noqa: E402


def write_mirror(folder: Path, base_url: str, n: int) -> None:
    import random

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "mp16_urls.csv", "w") as u, open(folder / "mp16_places365.csv", "w") as m:
        m.write("IMG_ID,AUTHOR,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban\n")
        for i in range(n):
            img_id = f"{i % 256:02x}/{(i // 256) % 256:02x}/{i}.jpg"
            u.write(f"{img_id},{base_url}/img/{i}.jpg\n")
            lat, lon = rng.uniform(-60, 70), rng.uniform(-180, 180)
            m.write(f"{img_id},{i % 997}@N00,{lat:.6f},{lon:.6f},1,6,48,0.1,0.8,0.1\n")


def kill_tree(pid: int) -> None:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=10)


def committed_parts(store: Store) -> int:
    base = store.root.rstrip("/") + "/datasets"
    if not os.path.isdir(base):
        return 0
    return sum(1 for p in Path(base).rglob("_parts/*.json"))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--latency", default="0.05,0.2")
    ap.add_argument("--kill-at", type=float, default=0.4, help="share of the shards before the kill")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=4 * 3600)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = ap.parse_args()
    lo, hi = (float(x) for x in a.latency.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="rehearse-download-"))
    store_uri = "file://" + str(tmp / "store")
    store = Store.from_uri(store_uri)
    n_shards = -(-a.n // a.shard_size)
    stack = Stack(
        root=ROOT,
        home=tmp / "prefect-home",
        port=free_port(None),
        pool="locdiff-rehearse",
        extra_env={"LOCDIFF_STORAGE": store_uri, "LOCDIFF_DOWNLOADS": str(tmp / "downloads")},
    )
    rss = TreeRSS()
    params = {
        "storage": store_uri,
        "dataset": "mp16",
        "encoder": "efficientnet-lite0",
        "preset": "tiny",
        "eval_datasets": [],
        "dataset_options": {
            "mirror": str(tmp / "mirror"),
            "shard_size": a.shard_size,
            "max_skip_share": 1.0,
            "download": {"concurrency": a.concurrency, "per_host": a.concurrency},
        },
    }
    chaos = Chaos((lo, hi), 0.05, 0.01, 0.01, 5.0)
    times: dict[str, float] = {}
    try:
        with chaos_server(tmp, chaos, synthetic=64) as url:
            write_mirror(tmp / "mirror", url, a.n)
            stack.start_server()
            stack.ensure_pool()
            deploy(stack, ["default"])
            t0 = time.monotonic()
            worker = stack.start_worker(name="rehearse-1")
            rss.pids.append(worker)
            fr = run_deployment(stack, "train-mp16/default", params)
            while committed_parts(store) < 2 * a.kill_at * n_shards:  # a tar and an index per shard
                state = (flow_run(stack, fr["id"]).get("state") or {}).get("type")
                if state in ("FAILED", "CRASHED", "COMPLETED", "CANCELLED"):
                    raise SystemExit(f"the first flow run ended {state} before the kill point")
                if time.monotonic() - t0 > a.timeout:
                    raise SystemExit("timed out before the kill point")
                time.sleep(1)
            done_before = committed_parts(store) // 2
            times["first"] = time.monotonic() - t0
            kill_tree(worker)
            rss.pids.remove(worker)
            print(f"killed the worker after {times['first']:.0f} s with {done_before} shards committed")
            t1 = time.monotonic()
            worker = stack.start_worker(name="rehearse-2")
            rss.pids.append(worker)
            fr2 = run_deployment(stack, "train-mp16/default", params)
            while store.latest("datasets", "mp16") is None:
                state = (flow_run(stack, fr2["id"]).get("state") or {}).get("type")
                if state in ("FAILED", "CRASHED", "CANCELLED"):
                    raise SystemExit(f"the resumed flow run ended {state}")
                if time.monotonic() - t0 > a.timeout:
                    raise SystemExit("timed out")
                time.sleep(1)
            times["second"] = time.monotonic() - t1
            times["total"] = time.monotonic() - t0
            httpx.post(
                f"{stack.api_url}/flow_runs/{fr2['id']}/set_state",
                json={"state": {"type": "CANCELLING"}, "force": True},
                timeout=10,
            )
            key = "progress-download"
            arts = httpx.post(
                f"{stack.api_url}/artifacts/filter",
                json={"artifacts": {"key": {"any_": [key]}}, "limit": 1, "sort": "UPDATED_DESC"},
                timeout=10,
            ).json()
    finally:
        rss.stop()
        stack.down(grace_s=5)
    key = store.latest("datasets", "mp16")
    man = store.manifest(key)
    disk = dir_bytes(Path(store.root))
    print(
        f"\nrehearsal: {a.n} MP16-format rows, {n_shards} shards, latency {lo * 1e3:.0f}-{hi * 1e3:.0f} ms,"
    )
    print("5 % dead, 1 % resets, 1 % 5 s stalls; real Prefect server + process worker; worker killed once")
    print(
        f"  committed {key}: {man['rows']} images, {man['n_dead']} dead, {man['n_failed']} failed, "
        f"{man['n_skipped']} left out in all, {man['shards_reused']} shards reused after the kill"
    )
    print(
        f"  images/s: {man['rows'] / times['total']:.1f} overall (kill + restart included); "
        f"first attempt {times['first']:.0f} s, resumed attempt {times['second']:.0f} s"
    )
    mib, peak = 2**20, rss.peak()
    print(
        f"  peak RSS: {peak['rss_tree'] / mib:.0f} MiB (worker tree), {peak['rss_one'] / mib:.0f} MiB "
        f"(one process); PSS of the tree {peak['pss_tree'] / mib:.0f} MiB"
    )
    per = disk / max(1, man["rows"]) / 1024
    print(f"  disk: {disk / 2**30:.2f} GiB in the store ({per:.1f} KiB per image)")
    if arts:
        print(f"  Prefect progress artifact: {arts[0].get('description')}")
    if a.keep:
        print(f"  kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
