"""Modal-search decoder: codes/s and peak memory at several anchor counts, accuracy vs a dense search.

Codes are realistic: noisy mixtures of 1-3 random locations with random weights. The reference answer is an
exhaustive search: the argmax of each code's sphere function over a dense Fibonacci grid (default 2M
anchors, evaluated in chunks). For each decoder setting we report codes/s, the peak resident memory of a
fresh process running it, the distance from the reference argmax, and how often the decoder finds a value
at least as high as the dense grid's (refinement can beat any finite grid).

    .venv/bin/python benchmarks/bench_decoder.py [--L 32] [--codes 500] [--dense 2000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from locdiff_core.anchors import AnchorGrid
from locdiff_core.shdd import SHDD
from locdiff_core.sphere import haversine_km, sample_uniform


def make_codes(shdd: SHDD, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lat, lon = sample_uniform(3 * n, generator=g)
    codes = shdd.encode(lat.float(), lon.float()).reshape(n, 3, -1)
    w = torch.rand(n, 3, generator=g) * (torch.rand(n, 3, generator=g) < 0.6)
    w[:, 0] = 1.0
    w = w / w.sum(1, keepdim=True)
    noise = (
        0.3 * torch.randn(n, shdd.dim, generator=g) * codes[:, 0].norm(dim=1, keepdim=True) / shdd.dim**0.5
    )
    return (w[:, :, None] * codes).sum(1) + noise


def run_one(L: int, n_codes: int, anchors: int | None, dense: bool) -> dict:
    torch.set_num_threads(2)
    shdd = SHDD(L)
    codes = make_codes(shdd, n_codes)
    t0 = time.perf_counter()
    if dense:
        grid = AnchorGrid.fibonacci(anchors, L, max_cache_bytes=0, chunk_size=32768)
        vals = grid.evaluate(codes)
        best = vals.argmax(1)
        lat, lon, fval = grid.lat_deg[best], grid.lon_deg[best], vals.max(1).values
    else:
        grid = AnchorGrid.fibonacci(anchors, L) if anchors else None
        d = shdd.decode(codes, anchors=grid)
        lat, lon, fval = d.lat_deg, d.lon_deg, d.score * shdd.peak
    dt = time.perf_counter() - t0
    return {
        "seconds": dt,
        "codes_per_s": n_codes / dt,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "lat": lat.tolist(),
        "lon": lon.tolist(),
        "f": fval.tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, default=32)
    ap.add_argument("--codes", type=int, default=500)
    ap.add_argument("--dense", type=int, default=2_000_000)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(run_one(args.L, args.codes, spec["anchors"], spec["dense"])))
        return

    def child(anchors, dense=False):
        spec = json.dumps({"anchors": anchors, "dense": dense})
        cmd = [sys.executable, __file__, "--L", str(args.L), "--codes", str(args.codes), "--one", spec]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    ref = child(args.dense, dense=True)
    default_n = SHDD(args.L).default_anchor_count()
    print(f"L={args.L}, {args.codes} noisy 1-3 point mixtures; reference: argmax over {args.dense:,} anchors")
    print(f"  dense search: {ref['codes_per_s']:.1f} codes/s, peak RSS {ref['peak_rss_mib']:.0f} MiB")
    heads = [("decoder anchors", 16), ("codes/s", 9), ("x dense", 8), ("RSS MiB", 8), ("median km", 10)]
    heads += [("p99 km", 8), ("f>=dense", 9)]
    print(" ".join(f"{h:>{w}}" for h, w in heads))
    rlat, rlon, rf = (torch.tensor(ref[k], dtype=torch.float64) for k in ("lat", "lon", "f"))
    for anchors in (None, 100_000, 1_000_000):
        r = child(anchors)
        d = haversine_km(
            rlat,
            rlon,
            torch.tensor(r["lat"], dtype=torch.float64),
            torch.tensor(r["lon"], dtype=torch.float64),
        )
        ge = (torch.tensor(r["f"], dtype=torch.float64) >= rf * (1 - 1e-4)).double().mean()
        label = f"{anchors or default_n:,}" + (" (default)" if anchors is None else "")
        print(
            f"{label:>16} {r['codes_per_s']:>9.1f} {r['codes_per_s'] / ref['codes_per_s']:>8.1f} "
            f"{r['peak_rss_mib']:>8.0f} {d.median():>10.2f} {d.quantile(0.99):>8.1f} {ge:>9.1%}"
        )


if __name__ == "__main__":
    main()
