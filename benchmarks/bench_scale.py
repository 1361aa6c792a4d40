"""Scale benchmark: the memory-mapped data path, DDP on CPU, and the Dask embedding fan-out.

    .venv/bin/python benchmarks/bench_scale.py [--rows 100000 1000000] [--steps 200] [--quick]

Prints, each beside its reference measured in the same run:

1. Training data path at E = 768 float16 (synthetic embeddings, ``locdiff datasets synth``): for each row
   count, a fresh process opens the train split and trains the tiny model for ``--steps`` steps; peak
   RSS (``VmHWM``: anonymous *and* file-backed resident pages, so mapped pages count) and loader
   throughput (random global batches of 1024 rows gathered across all parts, rows/s), with the arrays
   dropped from the page cache first ("mmap-cold": a run on files written earlier) and just written
   ("mmap": a hot cache holds them in large folios, and a fault maps a whole folio). Reference: the
   in-memory path (Parquet parts concatenated into one float32 table, what the trainer did before),
   run where free memory allows.
2. DDP: seconds per step of the tiny preset with 2 gloo ranks (torchrun) vs 1 process, same global batch.
3. Dask: embedding a small Blue Marble dataset on a 2-worker LocalCluster vs the sequential stage.

Everything is written under a temporary folder that is removed at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CHILD = r"""
import json, sys, time
import torch
from locdiff.storage import Store
from locdiff.stages.runs import load_geo, load_geo_in_memory, resolve_config
from locdiff_core.data import BatchSampler, as_parted
from locdiff_core.train import train
store, key, mode, steps = Store.from_uri(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode == "mmap-cold":  # drop the arrays from the page cache first: a run on files written earlier
    import glob, os
    for f in glob.glob(store.root + "/**/*.npy", recursive=True):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
t0 = time.perf_counter()
data = load_geo(store, key, "train") if mode != "inmemory" else load_geo_in_memory(store, key, "train")
open_s = time.perf_counter() - t0
parted = as_parted(data)
sampler, gen = BatchSampler(len(parted), 1024), torch.Generator().manual_seed(0)
n_batches = 100
t0 = time.perf_counter()
for _ in range(n_batches):
    idx = sampler.draw(gen)
    parted.coords(idx)
    parted.gather(idx, ("emb",))
gather_s = time.perf_counter() - t0
cfg = resolve_config("tiny", {"train": {"max_steps": steps, "batch_size": 256, "log_every": steps}},
                     embed_dim=768)
t0 = time.perf_counter()
train(cfg, data)
train_s = time.perf_counter() - t0
# VmHWM: the peak resident set of this process image (ru_maxrss would carry the parent's over exec)
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
print(json.dumps({"rows": len(parted), "open_s": open_s, "rows_per_s": n_batches * 1024 / gather_s,
                  "steps_per_s": steps / train_s,
                  "peak_rss_mib": hwm / 1024}))
"""


def _free_gib() -> float:
    with open("/proc/meminfo") as f:
        info = {ln.split(":")[0]: int(ln.split()[1]) for ln in f}
    return info["MemAvailable"] / 2**20


def _child(store_uri: str, key: str, mode: str, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, store_uri, key, mode, str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_data_path(
    tmp: str, rows_list: list[int], steps: int, modes=("mmap-cold", "mmap", "inmemory")
) -> None:
    from locdiff.datasets.synth import synth_embeddings
    from locdiff.storage import Store

    print("\n== 1. training data path, E=768 float16, tiny model, peak RSS of a fresh process ==")
    print(
        f"{'rows':>10} {'path':<9} {'data GiB':>8} {'peak RSS MiB':>12} {'loader rows/s':>14} "
        f"{'train steps/s':>13} {'open s':>7}"
    )
    results = {}
    for rows in rows_list:
        root = os.path.join(tmp, f"store-{rows}")
        store = Store.from_uri(root)
        t0 = time.perf_counter()
        key = synth_embeddings(store, "bench", rows=rows, dim=768, seed=0, part_rows=100_000)
        write_s = time.perf_counter() - t0
        data_gib = rows * 768 * 2 / 2**30
        for mode in modes:
            need = data_gib * 4 + 1.5  # the in-memory path peaks at ~3.6x the data (issue #13)
            if mode == "inmemory" and _free_gib() < need + 4:
                print(f"{rows:>10} {mode:<9} {data_gib:>8.2f} {f'skipped: needs ~{need:.0f} GiB free':>12}")
                continue
            r = _child(store.url, key, mode, steps)
            results[(rows, mode)] = r
            print(
                f"{rows:>10} {mode:<9} {data_gib:>8.2f} {r['peak_rss_mib']:>12.0f} {r['rows_per_s']:>14,.0f} "
                f"{r['steps_per_s']:>13.1f} {r['open_s']:>7.2f}"
            )
        print(f"{'':>10} (synthetic artifact written in {write_s:.1f} s)")
        shutil.rmtree(root, ignore_errors=True)
    mm = [results[(r, "mmap")] for r in rows_list if (r, "mmap") in results]
    if len(mm) >= 2:
        print(
            f"mmap peak RSS {rows_list[-1]:,} vs {rows_list[0]:,} rows: "
            f"{mm[-1]['peak_rss_mib'] / mm[0]['peak_rss_mib'] - 1:+.1%}"
        )


def bench_ddp(tmp: str, steps: int) -> None:
    from locdiff.datasets.synth import synth_embeddings
    from locdiff.ddp import launch_train
    from locdiff.stages.runs import resolve_config
    from locdiff.storage import Store
    from tests.flows.conftest import run_inputs

    print("\n== 2. DDP on CPU (gloo), tiny preset, global batch 256, E=768 ==")
    store = Store.from_uri(os.path.join(tmp, "ddp"))
    key = synth_embeddings(store, "ddp", rows=20_000, dim=768, seed=0, part_rows=5_000)
    cfg = resolve_config(
        "tiny", {"train": {"max_steps": steps, "batch_size": 256, "log_every": 10}}, embed_dim=768
    )
    inputs = run_inputs(store.url, key, cfg)
    secs = {}
    threads = os.cpu_count() or 1
    for n, omp in ((1, threads), (1, 1), (2, max(1, threads // 2))):
        run = launch_train(
            store.url, key, cfg, nproc=n, name=f"ddp{n}-t{omp}", env={"OMP_NUM_THREADS": str(omp)}, **inputs
        )
        with store.open(run, "curves.json") as f:
            curves = json.loads(f.read())["train"][1:]  # skip the first window (start-up)
        secs[(n, omp)] = sum(256 / c["samples_per_s"] for c in curves) / len(curves)  # s per step
    ref = secs[(1, threads)]
    for (n, omp), t in secs.items():
        print(
            f"{n} process(es) x {omp} thread(s): {t * 1e3:7.1f} ms/step  ({ref / t:.2f}x the rate of "
            f"1 process x {threads} threads)"
        )
    print(f"(this machine: {threads} cores, shared with other jobs while measured)")


def bench_dask(tmp: str) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from locdiff.datasets.bluemarble import build_bluemarble
    from locdiff.flows.stages import embed_flow
    from locdiff.stages import EmbedSpec
    from locdiff.stages.embeddings import embed_dataset
    from locdiff.storage import Store

    print(
        "\n== 3. embedding 160 Blue Marble tiles (8 shards, 64 px, efficientnet-lite0): Dask vs sequential =="
    )
    spec = {"n": 160, "seed": 5, "size_px": 64, "shard_size": 20}
    opts = {"image_size": 64, "batch_size": 20}
    seq = Store.from_uri(os.path.join(tmp, "seq"))
    dkey = build_bluemarble(seq, **spec)
    t0 = time.perf_counter()
    k1 = embed_dataset(seq, dkey, num_workers=0, **opts)
    seq_s = time.perf_counter() - t0
    dsk = Store.from_uri(os.path.join(tmp, "dask"))
    build_bluemarble(dsk, **spec)
    with prefect_test_harness(server_startup_timeout=120):
        t0 = time.perf_counter()
        k2 = embed_flow(storage=dsk.url, spec=EmbedSpec(dkey, options=opts), dask="local", dask_workers=2)
        dask_s = time.perf_counter() - t0
    same = [f["sha256"] for f in seq.manifest(k1)["files"] if f["relpath"].startswith("parts/")] == [
        f["sha256"] for f in dsk.manifest(k2)["files"] if f["relpath"].startswith("parts/")
    ]
    print(f"sequential stage        : {seq_s:6.1f} s")
    print(
        f"Dask, 2-worker cluster  : {dask_s:6.1f} s  (incl. cluster start-up and Prefect task overhead; "
        f"{seq_s / dask_s:.2f}x) parts byte-equal: {same}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--ddp-steps", type=int, default=60)
    ap.add_argument("--only", choices=["data", "ddp", "dask"], nargs="+", default=["data", "ddp", "dask"])
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["mmap-cold", "mmap", "inmemory"],
        choices=["mmap", "mmap-cold", "inmemory"],
    )
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = tempfile.mkdtemp(prefix="locdiff-bench-scale-")
    print(f"bench_scale: {os.cpu_count()} cores, {_free_gib():.1f} GiB available, scratch {tmp}")
    try:
        if "data" in args.only:
            bench_data_path(tmp, args.rows, args.steps, args.modes)
        if "ddp" in args.only:
            bench_ddp(tmp, args.ddp_steps)
        if "dask" in args.only:
            bench_dask(tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
