"""SHDD targets: read cached codes from Parquet vs compute them on the fly with SHDD(L).encode.

Both sides produce the same thing — a float32 ``[N, (L+1)^2]`` tensor of SHDD codes for N training
coordinates — measured in the same run on the same points (the MP16 gallery shipped in geoclip).
The cache side reads what ``locdiff.stages.targets.build_targets`` writes (one Parquet file, float32 or
float16 fixed-size lists) through the artifact store and converts to a torch tensor.

    .venv/bin/python benchmarks/bench_targets.py [--n 20000] [--degrees 16 32 64] [--threads 2]

Prints codes/s for each way and the ratio (on-the-fly / cached); > 1 means computing beats reading.
"""

from __future__ import annotations

import argparse
import tempfile
import time

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
    from locdiff.stages.targets import read_codes, write_codes
    from locdiff.storage import Store
    from locdiff_core.shdd import SHDD

    g_lat, g_lon = gallery_coordinates()
    lat = torch.from_numpy(g_lat[: args.n]).float()
    lon = torch.from_numpy(g_lon[: args.n]).float()
    print(f"N={args.n} points, {torch.get_num_threads()} threads; best of {args.repeat}")
    print(
        f"{'L':>4} {'D':>6} {'on-the-fly/s':>14} {'read f32/s':>12} {'read f16/s':>12} "
        f"{'MB f32':>8} {'fly/read32':>11} {'fly/read16':>11}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.from_uri(tmp)
        for L in args.degrees:
            shdd = SHDD(L)
            codes = shdd.encode(lat, lon)  # warm-up, and the data to cache
            t_fly = _best(lambda shdd=shdd: shdd.encode(lat, lon), args.repeat)
            row = [L, shdd.dim, args.n / t_fly]
            sizes = {}
            for dtype in ("float32", "float16"):
                key = store.key("bench", f"targets/L{L}/{dtype}", "1", {"L": L, "dtype": dtype}, [])
                with store.writer(key, version="1", config={"L": L, "dtype": dtype}) as w:
                    write_codes(w, "codes.parquet", [str(i) for i in range(args.n)], codes, dtype)
                sizes[dtype] = store.manifest(key)["bytes"] / 1e6
                got = read_codes(store, key, "codes.parquet")[1]
                err = (got - codes).abs().max().item()
                assert err < (1e-6 if dtype == "float32" else 5e-2 * (L + 1)), err
                t_read = _best(lambda key=key: read_codes(store, key, "codes.parquet"), args.repeat)
                row.append(args.n / t_read)
            r32, r16 = row[2] / row[3], row[2] / row[4]
            print(
                f"{L:>4} {shdd.dim:>6} {row[2]:>14,.0f} {row[3]:>12,.0f} {row[4]:>12,.0f} "
                f"{sizes['float32']:>8.1f} {r32:>11.2f} {r16:>11.2f}"
            )
    print("ratio = codes/s on the fly / codes/s read from the cache (> 1: computing is faster)")


if __name__ == "__main__":
    main()
