"""Artifact-store overhead: writing N parts through Store.writer (staging, a SHA-256 read-back and
marker per part, manifest commit) vs plain write+fsync of the same bytes, in the same run.

    .venv/bin/python benchmarks/bench_store.py [--mb 256] [--parts 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from locdiff.storage import Store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256, help="total megabytes written")
    ap.add_argument("--parts", type=int, default=16)
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

        store = Store.from_uri(os.path.join(d, "store"))
        key = store.key("bench", "write", "1", {"mb": args.mb})
        t0 = time.perf_counter()
        with store.writer(key) as w:
            for i in range(args.parts):
                with w.open(f"part-{i}.bin") as f:
                    f.write(part)
                    f.flush()
                    os.fsync(f.fileno())
                w.commit_part(f"part-{i}.bin", rows=1)
        t_store = time.perf_counter() - t0
    mb = args.mb
    print(f"plain write+fsync : {mb / t_raw:8.1f} MB/s")
    print(f"store writer      : {mb / t_store:8.1f} MB/s (checksummed, resumable, atomic commit)")
    print(f"ratio store/plain : {t_raw / t_store:8.2f} (1.0 = no overhead)")


if __name__ == "__main__":
    main()
