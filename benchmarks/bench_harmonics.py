"""Real spherical harmonics throughput: ours vs sphericart (C++, float64 and float32) vs scipy vs the
memory-write limit, all measured in the same run.

For every degree L (default 16/32/64/128) and N points (default 100,000) it first checks every reference
for finiteness and agreement with ours (per-degree sums of squares, which do not depend on a library's
ordering or sign convention, on the first 2,000 points), then times (best of 3, after a warm-up call):

* ours: ``real_sph_harm`` with float32 output (what the decoder, the KL loss and the anchor sets use),
  called again and again as the KL loss does: from the second call on, the freed result's mapping is
  reused (its pages are already faulted in);
* ours-fresh: the same with ``LOCDIFF_SH_REUSE_BYTES=0``, so every call writes fresh pages that the OS
  must zero-fill first (what a single call pays, and what sphericart and write-new pay on every call);
* ours-torch: the torch degree loop that still serves autograd and CUDA (the implementation before the
  fused kernel), with ``--torch-loop``;
* sphericart-f64 and sphericart-f32: ``sphericart.SphericalHarmonics(L).compute`` on float64 / float32
  xyz; a reference that is non-finite or disagrees is printed as such and not timed;
* scipy: ``scipy.special.sph_harm_y`` converted to the real basis, on ``--scipy-points`` points;
* write-limit: filling a tensor of the result's size, once freshly allocated (what any function returning
  a new result pays) and once pre-allocated (the bandwidth floor).

The numba kernel's one-time compile (cached per machine afterwards) is timed in a child process with an
empty cache directory, and the cached import in another child. Columns are points/s; ratios are
ours / other (> 1: ours faster).

    .venv/bin/python benchmarks/bench_harmonics.py [--points 100000] [--degrees 16 32 64 128] [--threads 2]
        [--torch-loop] [--cpu-time]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import sphericart
import torch
from scipy.special import sph_harm_y

import locdiff_core.harmonics as harmonics
from locdiff_core.harmonics import real_sph_harm
from locdiff_core.sphere import latlon_to_xyz, sample_uniform

CLOCK = time.perf_counter  # --cpu-time: time.process_time (user + system CPU of this process)


def best_of(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = CLOCK()
        out = fn()
        best = min(best, CLOCK() - t0)
        del out
    return best


def scipy_real(lat: np.ndarray, lon: np.ndarray, L: int) -> np.ndarray:
    theta, phi = np.deg2rad(90 - lat), np.deg2rad(lon)
    out = np.empty((lat.size, (L + 1) ** 2), dtype=np.float64)
    for l in range(L + 1):
        m = np.arange(l + 1)[:, None]
        y = sph_harm_y(l, m, theta[None], phi[None]) * ((-1.0) ** m)  # undo the Condon-Shortley phase
        out[:, l * l + l : l * l + 2 * l + 1] = (np.sqrt(2) * y.real).T
        out[:, l * l + l] = y[0].real
        out[:, l * l : l * l + l] = (np.sqrt(2) * y[1:].imag)[::-1].T
    return out


def degree_norms(y: np.ndarray, L: int) -> np.ndarray:
    """Sum of squares per degree ``[N, L+1]``: convention-free (ordering, signs, normalisation checked)."""
    y = np.asarray(y, dtype=np.float64)
    return np.stack([(y[:, l * l : (l + 1) ** 2] ** 2).sum(1) for l in range(L + 1)], 1)


def check(name: str, y, ref_norms: np.ndarray, L: int, rtol: float) -> str:
    """'' when ``y`` is finite and agrees with ours, else why not."""
    y = np.asarray(y)
    if not np.isfinite(y).all():
        return f"non-finite ({np.mean(~np.isfinite(y).all(1)):.0%} of points)"
    n = degree_norms(y, L)
    err = np.abs(n - ref_norms).max() / np.abs(ref_norms).max()
    return "" if err <= rtol else f"disagrees (rel. error {err:.1e})"


def compile_cost() -> tuple[float, float]:
    """Seconds for the first harmonic call in a fresh process: with an empty numba cache, then cached."""
    code = (
        "import time, torch; t = time.perf_counter(); from locdiff_core.harmonics import real_sph_harm; "
        "real_sph_harm(torch.zeros(8), torch.zeros(8), 8); print(time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = [
            float(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                 text=True).stdout)
            for _ in range(2)
        ]
    return runs[0], runs[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--scipy-points", type=int, default=2_000)
    ap.add_argument("--degrees", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--max-gib",
        type=float,
        default=1.0,
        help="cap on one float64 result (sphericart-f64 returns float64): fewer points at high L (GiB)",
    )
    ap.add_argument("--torch-loop", action="store_true", help="also time the torch degree loop (slow)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time CPU seconds of the process instead of wall time (with --threads 1 and OMP_NUM_THREADS=1: "
        "figures that hold on a machine shared with other work)",
    )
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    torch.set_num_threads(args.threads)
    n = args.points
    lat, lon = sample_uniform(n, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    xyz64 = latlon_to_xyz(lat.double(), lon.double()).numpy()
    ns = min(args.scipy_points, n)
    lat_np, lon_np = lat[:ns].double().numpy(), lon[:ns].double().numpy()

    first, cached = compile_cost()
    print(
        f"numba kernel: first call in a fresh process {first:.1f} s with an empty cache (one-time "
        f"compile), {cached:.2f} s with the cache"
    )
    clock = "CPU time" if args.cpu_time else "wall time"
    print(f"up to {n:,} points, float32 output, {args.threads} threads, {clock}; points/s (ours / other)")
    cols = ["ours", "ours-fresh", "ours-torch", "sph-f64", "sph-f32", "scipy", "write-new", "write-reuse"]
    cols += ["/torch", "/sph-f64", "fresh/sph64", "/scipy", "/write-new", "/reuse"]
    print(f"{'L':>4} {'points':>8} " + " ".join(f"{c:>11}" for c in cols))
    notes = []
    lat_all, lon_all, xyz64_all = lat, lon, xyz64
    for L in args.degrees:
        D = (L + 1) ** 2
        # at most --max-gib per float64 result: 100k points at L = 128 would be 13 GiB in float64
        n = min(args.points, max(ns, int(args.max_gib * 2**30) // (8 * D)))
        lat, lon, xyz64 = lat_all[:n], lon_all[:n], xyz64_all[:n]
        xyz32 = xyz64.astype(np.float32)
        ours = real_sph_harm(lat[:ns], lon[:ns], L)
        ref = scipy_real(lat_np, lon_np, L)
        ref_norms = degree_norms(ref, L)
        # ours against the oracle, elementwise (same convention)
        err = np.abs(ours.double().numpy() - ref).max() / np.abs(ref).max()
        assert err < 1e-5, f"L={L}: ours disagrees with scipy (rel. error {err:.1e})"
        t_ours = best_of(lambda L=L, a=lat, b=lon: real_sph_harm(a, b, L))
        rates = {"ours": n / t_ours}
        os.environ["LOCDIFF_SH_REUSE_BYTES"] = "0"
        try:
            rates["ours-fresh"] = n / best_of(lambda L=L, a=lat, b=lon: real_sph_harm(a, b, L))
        finally:
            del os.environ["LOCDIFF_SH_REUSE_BYTES"]
        if args.torch_loop:
            os.environ["LOCDIFF_SH_BACKEND"] = "torch"
            saved, harmonics._kernels_module = harmonics._kernels_module, None
            try:
                y = real_sph_harm(lat[:ns], lon[:ns], L)
                assert np.abs(y.double().numpy() - ref).max() / np.abs(ref).max() < 1e-3
                rates["ours-torch"] = n / best_of(lambda L=L, a=lat, b=lon: real_sph_harm(a, b, L), 2)
            finally:
                del os.environ["LOCDIFF_SH_BACKEND"]
                harmonics._kernels_module = saved
        for name, x, rtol in (("sph-f64", xyz64, 1e-9), ("sph-f32", xyz32, 1e-3)):
            calc = sphericart.SphericalHarmonics(L)
            why = check(name, calc.compute(x[:ns]), ref_norms, L, rtol)
            if why:
                notes.append(f"L={L} {name}: {why}, not timed")
                rates[name] = None
            else:
                rates[name] = n / best_of(lambda c=calc, x=x: c.compute(x))
        rates["scipy"] = ns / best_of(lambda L=L: scipy_real(lat_np, lon_np, L), 1)
        rates["write-new"] = n / best_of(lambda D=D, n=n: torch.empty((n, D)).fill_(1.0))
        buf = torch.empty((n, D)).fill_(0.0)
        rates["write-reuse"] = n / best_of(lambda b=buf: b.fill_(1.0))
        buf = None

        def fmt(v, ratio=False):
            if v is None:
                return f"{'-':>11}"
            return f"{v:>11.2f}" if ratio else f"{v:>11,.0f}"

        row = [fmt(rates.get(c)) for c in cols[:8]]
        pairs = [("ours", "ours-torch"), ("ours", "sph-f64"), ("ours-fresh", "sph-f64"), ("ours", "scipy"),
                 ("ours", "write-new"), ("ours", "write-reuse")]
        for mine, c in pairs:
            other = rates.get(c)
            row.append(fmt(rates[mine] / other if other else None, ratio=True))
        print(f"{L:>4} {n:>8,} " + " ".join(row))
    for line in notes:
        print("  " + line)


if __name__ == "__main__":
    main()
