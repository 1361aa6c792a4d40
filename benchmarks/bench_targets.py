"""SHDD targets: read the stage's cached codes vs compute them on the fly with SHDD(L).encode.

Both sides produce the same thing — a float32 ``[N, (L+1)^2]`` tensor of SHDD codes for N training
coordinates — measured in the same run on the same points (the MP16 gallery shipped in geoclip).
The cache side is the stage itself: the points are written as a one-part embeddings artifact,
``locdiff.stages.targets.build_targets`` caches their codes (float32 or float16 ``.npy`` arrays), and
``load_targets`` reads them back through the artifact store into a torch tensor.

    .venv/bin/python benchmarks/bench_targets.py [--n 20000] [--degrees 16 32 64] [--threads 2]

Prints codes/s for each way and the ratio (on-the-fly / cached); > 1 means computing beats reading.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--degrees", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from locdiff.datasets.bluemarble import gallery_coordinates
    from locdiff.embedstore import write_part
    from locdiff.stages.targets import build_targets, load_targets, targets_for
    from locdiff.storage import Store
    from locdiff_core.shdd import SHDD

    g_lat, g_lon = gallery_coordinates()
    lat64 = np.asarray(g_lat[: args.n], np.float64)
    lon64 = np.asarray(g_lon[: args.n], np.float64)
    lat, lon = torch.from_numpy(lat64).float(), torch.from_numpy(lon64).float()
    print(f"N={args.n} points, {torch.get_num_threads()} threads; best of {args.repeat}")
    print(
        f"{'L':>4} {'D':>6} {'on-the-fly/s':>14} {'read f32/s':>12} {'read f16/s':>12} "
        f"{'MB f32':>8} {'fly/read32':>11} {'fly/read16':>11}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.from_uri(tmp)
        emb_key = store.key("embeddings", "bench/gallery", "bench", {"n": args.n}, [])
        # the points as a one-part embeddings artifact
        with store.writer(emb_key, version="bench", config={"n": args.n}) as w:
            ids = [str(i) for i in range(args.n)]
            write_part(w, 0, ids, np.zeros((args.n, 2), np.float16), lat64, lon64, ["train"] * args.n)
            w.set(dim=2)
        for L in args.degrees:
            shdd = SHDD(L)
            shdd.encode(lat, lon)  # warm-up
            t_fly = _best(lambda shdd=shdd: shdd.encode(lat, lon), args.repeat)
            want = targets_for(lat64, lon64, L, torch.float64).float()
            row = [L, shdd.dim, args.n / t_fly]
            sizes = {}
            for dtype in ("float32", "float16"):
                key = build_targets(store, emb_key, L, dtype)
                sizes[dtype] = sum(f["size"] for f in store.manifest(key)["files"] if "code" in f["relpath"])
                err = (load_targets(store, key)[1] - want).abs().max().item()
                assert err < (1e-6 if dtype == "float32" else 5e-2 * (L + 1)), err
                t_read = _best(lambda key=key: load_targets(store, key), args.repeat)
                row.append(args.n / t_read)
            r32, r16 = row[2] / row[3], row[2] / row[4]
            print(
                f"{L:>4} {shdd.dim:>6} {row[2]:>14,.0f} {row[3]:>12,.0f} {row[4]:>12,.0f} "
                f"{sizes['float32'] / 1e6:>8.1f} {r32:>11.2f} {r16:>11.2f}"
            )
    print("ratio = codes/s on the fly / codes/s read from the cache (> 1: computing is faster)")


if __name__ == "__main__":
    main()
