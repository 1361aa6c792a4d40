"""Artifact-store overhead, each figure against its plain counterpart in the same run:

- write: N parts through Store.writer (staging, SHA-256 computed while writing, marker per part,
  manifest commit) vs plain write+fsync of the same bytes;
- read: the same parts read back through Store.open checked against the manifest's SHA-256 (one
  streaming pass) vs the same reads unchecked (``verify=False``), and a Parquet part through
  Store.read_table checked vs unchecked. Page cache is warm for both sides; best of ``--repeat``.

    .venv/bin/python benchmarks/bench_store.py [--mb 256] [--parts 16] [--repeat 3] [--storage URI]

``--storage s3://bucket/prefix`` runs the store side against that store (endpoint and credentials from
the environment, as for every store); the plain write baseline stays local.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time

import numpy as np
import pyarrow as pa

from locdiff.storage import Store


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256, help="total megabytes written")
    ap.add_argument("--parts", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--storage", default=None, help="store URI (default: a temporary local folder)")
    args = ap.parse_args()
    part = os.urandom(args.mb * (1 << 20) // args.parts)
    with tempfile.TemporaryDirectory() as d:
        raw = os.path.join(d, "raw")
        os.makedirs(raw)
        t0 = time.perf_counter()
        for i in range(args.parts):
            with open(os.path.join(raw, f"part-{i}.bin"), "wb") as f:
                f.write(part)
                f.flush()
                os.fsync(f.fileno())
        t_raw = time.perf_counter() - t0

        store = Store.from_uri(args.storage or os.path.join(d, "store"))
        key = store.key("bench", "write", "1", {"mb": args.mb})
        t0 = time.perf_counter()
        with store.writer(key, version="1", config={"mb": args.mb}) as w:
            for i in range(args.parts):
                with w.open(f"part-{i}.bin") as f:
                    f.write(part)
                    f.flush()
                    if store.is_local:
                        os.fsync(f.fileno())
                w.commit_part(f"part-{i}.bin", rows=1)
        t_store = time.perf_counter() - t0
        tkey = store.key("bench", "table", "1", {"mb": args.mb})
        with store.writer(tkey, version="1", config={"mb": args.mb}) as w:
            rows = args.mb * (1 << 20) // 8 // 4  # a Parquet part of a quarter of the volume
            w.write_table("table.parquet", pa.table({"x": np.random.default_rng(0).random(rows)}))

        def read_parts(verify: bool) -> None:
            s = Store.from_uri(store.url)  # fresh: nothing known to be verified already
            for i in range(args.parts):
                with s.open(key, f"part-{i}.bin", verify=verify) as f:
                    while f.read(1 << 20):
                        pass

        def read_table(verify: bool) -> None:
            Store.from_uri(store.url).read_table(tkey, "table.parquet", verify=verify)

        read_parts(False)  # warm the page cache
        t_plain = _best(lambda: read_parts(False), args.repeat)
        t_checked = _best(lambda: read_parts(True), args.repeat)
        t_tab_plain = _best(lambda: read_table(False), args.repeat)
        t_tab_checked = _best(lambda: read_table(True), args.repeat)
        tab_mb = store.manifest(tkey)["bytes"] / (1 << 20)
    buf = os.urandom(64 << 20)
    t_hash = _best(lambda: hashlib.sha256(buf).digest(), args.repeat)
    mb = args.mb
    print(f"sha256 alone          : {64 / t_hash:8.1f} MB/s (this CPU's ceiling for checked reads)")
    print(f"plain write+fsync     : {mb / t_raw:8.1f} MB/s")
    print(f"store writer          : {mb / t_store:8.1f} MB/s (hashed while writing, atomic commit)")
    print(f"ratio store/plain     : {t_raw / t_store:8.2f} (1.0 = no overhead)")
    print(f"read unchecked        : {mb / t_plain:8.1f} MB/s ({args.parts} parts, 1 MiB reads)")
    print(f"read checked (sha256) : {mb / t_checked:8.1f} MB/s")
    print(f"read overhead         : {t_checked / t_plain:8.2f}x time (checked / unchecked)")
    print(f"read_table unchecked  : {tab_mb / t_tab_plain:8.1f} MB/s ({tab_mb:.0f} MB Parquet)")
    print(f"read_table checked    : {tab_mb / t_tab_checked:8.1f} MB/s")
    print(f"read_table overhead   : {t_tab_checked / t_tab_plain:8.2f}x time (checked / unchecked)")


if __name__ == "__main__":
    main()
