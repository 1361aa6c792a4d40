"""Modal-search decoder: codes/s, grid build time and peak memory per setting, accuracy vs a dense search.

Codes are realistic: noisy mixtures of 1-3 random locations with random weights. The reference answer is an
exhaustive search: the argmax of each code's sphere function over a dense Fibonacci grid (default 2M
anchors, evaluated chunk by chunk with a running argmax, so its memory stays bounded). Every setting runs
in a fresh child process; for each we report:

* the one-time costs apart: building the grid (basis or synthesis tables) and a first call on 8 codes
  (numba's import and cached machine code);
* codes/s of one ``decode`` call on the whole batch, and its ratio to the dense search's codes/s;
* the child's peak resident memory, at the batch size and at 4x it (the decoder works in chunks of
  codes, so this must not grow with the batch);
* the distance from the dense argmax (median, p99) against the dense grid's spacing, and how often the
  decoder's value is at least the dense grid's (refinement can beat any finite grid; 1e-4 relative slack
  for float32 rounding in the dense matmul).

    .venv/bin/python benchmarks/bench_decoder.py [--L 32] [--codes 1000] [--dense 2000000] [--threads 2]
        [--cpu-time] [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

from locdiff_core.anchors import AnchorGrid
from locdiff_core.harmonics import real_sph_harm
from locdiff_core.shdd import SHDD
from locdiff_core.sphere import EARTH_RADIUS_KM, fibonacci_lattice, haversine_km, sample_uniform

CLOCK = time.perf_counter  # --cpu-time: time.process_time (CPU seconds of the process)


def make_codes(shdd: SHDD, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lat, lon = sample_uniform(3 * n, generator=g)
    w = torch.rand(n, 3, generator=g) * (torch.rand(n, 3, generator=g) < 0.6)
    w[:, 0] = 1.0
    w = w / w.sum(1, keepdim=True)
    eps = torch.randn(n, shdd.dim, generator=g)
    out = torch.empty(n, shdd.dim)
    for i in range(0, n, 256):  # in chunks, so that making the codes does not set the peak memory
        j = min(n, i + 256)
        codes = shdd.encode(lat[3 * i : 3 * j].float(), lon[3 * i : 3 * j].float()).reshape(j - i, 3, -1)
        noise = 0.3 * eps[i:j] * codes[:, 0].norm(dim=1, keepdim=True) / shdd.dim**0.5
        out[i:j] = (w[i:j, :, None] * codes).sum(1) + noise
    return out


def dense_search(codes: torch.Tensor, L: int, n: int, chunk: int = 32768) -> dict:
    """Argmax over an n-point Fibonacci grid; the basis is recomputed per chunk (float32, as AnchorGrid)."""
    lat_all, lon_all = fibonacci_lattice(n)
    best_val = torch.full((codes.shape[0],), -torch.inf)
    best_idx = torch.zeros(codes.shape[0], dtype=torch.long)
    t_basis = t_mm = 0.0
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        t0 = CLOCK()
        basis = real_sph_harm(lat_all[start:stop].float(), lon_all[start:stop].float(), L)
        t1 = CLOCK()
        val, idx = (codes @ basis.T).max(1)
        t_mm += CLOCK() - t1
        t_basis += t1 - t0
        better = val > best_val
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, idx + start, best_idx)
    return {
        "lat": lat_all[best_idx],
        "lon": lon_all[best_idx],
        "f": best_val.double(),
        "basis_s": t_basis,
        "matmul_s": t_mm,
    }


def run_one(L: int, n_codes: int, spec: dict) -> dict:
    global CLOCK
    if spec.get("cpu_time"):
        CLOCK = time.process_time
    torch.set_num_threads(spec["threads"])
    shdd = SHDD(L)
    codes = make_codes(shdd, n_codes)
    out: dict = {}
    if spec["kind"] == "dense":
        t0 = CLOCK()
        r = dense_search(codes, L, spec["anchors"])
        dt = CLOCK() - t0
        lat, lon, fval = r["lat"], r["lon"], r["f"]
        out.update(build_s=0.0, first_s=0.0, basis_s=r["basis_s"], matmul_s=r["matmul_s"])
        # the default decoder on the same codes in the same process, for a ratio free of load changes
        shdd.decode(codes[:8])
        t1 = CLOCK()
        shdd.decode(codes)
        out["decoder_same_process_codes_per_s"] = n_codes / (CLOCK() - t1)
    else:
        t0 = CLOCK()
        if spec["kind"] == "fibonacci":
            grid = AnchorGrid.fibonacci(spec["anchors"], L)
            grid.basis  # noqa: B018  (computes and caches the basis)
        else:
            grid = shdd.search_grid()
        t1 = CLOCK()
        shdd.decode(codes[:8], anchors=grid)  # first call: imports numba, loads its cached machine code
        t2 = CLOCK()
        d = shdd.decode(codes, anchors=grid)
        dt = CLOCK() - t2
        lat, lon, fval = d.lat_deg, d.lon_deg, d.score.double() * shdd.peak
        out.update(build_s=t1 - t0, first_s=t2 - t1, grid_points=len(grid), spacing_km=grid.spacing_km)
    out.update(
        seconds=dt,
        codes_per_s=n_codes / dt,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        lat=lat.tolist(),
        lon=lon.tolist(),
        f=fval.tolist(),
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, default=32)
    ap.add_argument("--codes", type=int, default=1000)
    ap.add_argument("--dense", type=int, default=2_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--before",
        metavar="DIR",
        help="a source tree of the previous version (e.g. `git archive COMMIT | tar -x -C DIR`): adds rows "
        "for its decoder with 10k and 100k Fibonacci anchors, run on the same codes",
    )
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time CPU seconds instead of wall time (use with --threads 1 and OMP_NUM_THREADS=1 on a machine "
        "shared with other work)",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(run_one(args.L, spec.get("codes", args.codes), spec)))
        return

    def child(kind, anchors=None, codes=args.codes, src=None):
        spec = {"kind": kind, "anchors": anchors, "threads": args.threads, "codes": codes}
        spec = json.dumps(dict(spec, cpu_time=args.cpu_time))
        cmd = [sys.executable, __file__, "--L", str(args.L), "--one", spec]
        env = dict(os.environ, PYTHONPATH=src) if src else None
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)

    ref = child("dense", args.dense)
    spacing = math.sqrt(4 * math.pi / args.dense) * EARTH_RADIUS_KM
    print(
        f"L={args.L}, {args.codes} noisy 1-3 point mixtures, {args.threads} threads, "
        f"{'CPU' if args.cpu_time else 'wall'} time; "
        f"reference: argmax over {args.dense:,} Fibonacci anchors (spacing {spacing:.1f} km)"
    )
    print(
        f"  dense search: {ref['codes_per_s']:.1f} codes/s ({ref['seconds']:.1f} s: basis "
        f"{ref['basis_s']:.1f} s, matmul {ref['matmul_s']:.1f} s), peak RSS {ref['peak_rss_mib']:.0f} MiB"
    )
    same = ref["decoder_same_process_codes_per_s"]
    print(
        f"  default decoder in the dense search's process: {same:.0f} codes/s = "
        f"{same / ref['codes_per_s']:.1f}x dense"
    )
    heads = [("coarse grid", 22), ("build s", 8), ("1st s", 6), ("codes/s", 9), ("x dense", 8)]
    heads += [("RSS MiB", 8), ("RSS 4x", 7), ("median km", 10), ("p99 km", 8), ("f>=dense", 9)]
    print(" ".join(f"{h:>{w}}" for h, w in heads))
    rlat, rlon, rf = (torch.tensor(ref[k], dtype=torch.float64) for k in ("lat", "lon", "f"))
    settings = [("regular", None, None), ("fibonacci", 10_000, None), ("fibonacci", 100_000, None)]
    if args.before:
        settings += [("fibonacci", 10_000, args.before), ("fibonacci", 100_000, args.before)]
    for kind, anchors, src in settings:
        r = child(kind, anchors, src=src)
        # peak memory at 4x the batch (skipped for the previous version: slow, and not what is measured)
        big = {"peak_rss_mib": math.nan} if src else child(kind, anchors, codes=4 * args.codes)
        lat, lon = (torch.tensor(r[k], dtype=torch.float64) for k in ("lat", "lon"))
        d = haversine_km(rlat, rlon, lat, lon)
        ge = (torch.tensor(r["f"], dtype=torch.float64) >= rf - 1e-4 * rf.abs()).double().mean()
        label = ("before: " if src else "") + f"{kind} {r['grid_points']:,}"
        label += " (default)" if kind == "regular" else ""
        med, p99 = d.median().item(), d.quantile(0.99).item()
        verdict = "meets" if med <= spacing and p99 <= 2 * spacing and ge >= 0.995 else "misses"
        print(
            f"{label:>22} {r['build_s']:>8.2f} {r['first_s']:>6.2f} {r['codes_per_s']:>9.0f} "
            f"{r['codes_per_s'] / ref['codes_per_s']:>8.1f} {r['peak_rss_mib']:>8.0f} "
            f"{big['peak_rss_mib']:>7.0f} "
            f"{med:>10.2f} {p99:>8.1f} {ge:>9.1%}  {verdict} dense precision"
        )


if __name__ == "__main__":
    main()
