"""Real spherical harmonics throughput: ours vs sphericart (C++) vs scipy, and vs the memory-write limit.

Prints points/s at L in {16, 32, 64, 128} (float32, 2 threads) and, measured in the same run, the
time to merely write an output tensor of the same size (the hardware floor for any implementation that
materialises the [N, (L+1)^2] result).

    .venv/bin/python benchmarks/bench_harmonics.py [--points 100000] [--degrees 16 32 64 128]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import sphericart
import torch
from scipy.special import sph_harm_y

from locdiff_core.harmonics import real_sph_harm
from locdiff_core.sphere import latlon_to_xyz, sample_uniform


def best_of(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def scipy_real(lat: np.ndarray, lon: np.ndarray, L: int) -> np.ndarray:
    theta, phi = np.deg2rad(90 - lat), np.deg2rad(lon)
    out = np.empty((lat.size, (L + 1) ** 2), dtype=np.float32)
    for l in range(L + 1):
        m = np.arange(l + 1)[:, None]
        y = sph_harm_y(l, m, theta[None], phi[None])
        out[:, l * l + l : l * l + 2 * l + 1] = (np.sqrt(2) * y.real).T
        out[:, l * l + l] = y[0].real
        out[:, l * l : l * l + l] = (np.sqrt(2) * y[1:].imag)[::-1].T
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--scipy-points", type=int, default=2_000)
    ap.add_argument("--degrees", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.points
    lat, lon = sample_uniform(n, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    xyz = latlon_to_xyz(lat, lon).numpy()
    print(f"{n:,} points, float32, {args.threads} threads (points/s; ratio = ours / other)")
    cols = ["ours", "sphericart", "scipy", "write-limit", "ours/sph", "ours/scipy", "ours/limit"]
    print(f"{'L':>4} " + " ".join(f"{c:>12}" for c in cols))
    for L in args.degrees:
        real_sph_harm(lat[:64], lon[:64], L)
        t_ours = best_of(lambda L=L: real_sph_harm(lat, lon, L))
        calc = sphericart.SphericalHarmonics(L)
        calc.compute(xyz[:64])
        t_sph = best_of(lambda calc=calc: calc.compute(xyz))
        ns = min(args.scipy_points, n)
        lat_np, lon_np = lat[:ns].double().numpy(), lon[:ns].double().numpy()
        t_sci = best_of(lambda L=L, a=lat_np, b=lon_np: scipy_real(a, b, L), 1)
        t_write = best_of(lambda L=L: torch.empty((n, (L + 1) ** 2), dtype=torch.float32).fill_(1.0))
        r_ours, r_sph, r_sci, r_w = n / t_ours, n / t_sph, ns / t_sci, n / t_write
        print(
            f"{L:>4} {r_ours:>12,.0f} {r_sph:>12,.0f} {r_sci:>12,.0f} {r_w:>12,.0f} "
            f"{r_ours / r_sph:>12.2f} {r_ours / r_sci:>12.1f} {r_ours / r_w:>12.2f}"
        )
    # correctness guard: sphericart's real basis (with its own ordering/sign) has the same norms per degree
    y = real_sph_harm(lat[:1000], lon[:1000], 16)
    ys = torch.from_numpy(sphericart.SphericalHarmonics(16).compute(xyz[:1000]))
    assert torch.allclose((y**2).sum(1), (ys**2).sum(1), rtol=1e-4), "basis norms disagree with sphericart"


if __name__ == "__main__":
    main()
