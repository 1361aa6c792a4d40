"""Decoder accuracy on clean codes across the filter radius rho: median / p99 distance (km) from the
encoded point, over L x rho x filter, and the mode masses of clean two-point mixtures.

Clean single-point codes (no noise) must decode to their own point at every rho: the filter sets the
decoder's resolution, it must not move the answer. The error is compared with the refinement tolerance
(:meth:`SHDD.decode_tolerance_km`). Mixture rows: the decoded masses of w / (1 - w) mixtures of two
points >= 2,000 km apart, against w.

    .venv/bin/python benchmarks/bench_rho.py [--codes 200] [--L 16 32 64] [--rho 0 100 300 1000 2000]
"""

from __future__ import annotations

import argparse

import torch

from locdiff_core.shdd import SHDD
from locdiff_core.sphere import haversine_km, sample_uniform


def clean_errors(shdd: SHDD, n: int, rho: float, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lat, lon = sample_uniform(n, generator=g)
    dec = shdd.decode(shdd.encode(lat, lon), rho_km=rho, filter=kind)
    return haversine_km(dec.lat_deg.double(), dec.lon_deg.double(), lat, lon)


def mixture_masses(shdd: SHDD, n: int, w: float, rho: float, kind: str, seed: int = 1) -> torch.Tensor:
    """Decoded [mass of the w point, mass of the 1 - w point] of n clean mixtures ([n, 2])."""
    g = torch.Generator().manual_seed(seed)
    lat, lon = sample_uniform(4 * n, generator=g)
    d = haversine_km(lat[:2 * n:2], lon[:2 * n:2], lat[1:2 * n:2], lon[1:2 * n:2])
    keep = torch.nonzero(d >= 2000).flatten()[:n]
    la, loa, lb, lob = lat[0::2][keep], lon[0::2][keep], lat[1::2][keep], lon[1::2][keep]
    codes = w * shdd.encode(la, loa) + (1 - w) * shdd.encode(lb, lob)
    dec = shdd.decode(codes, rho_km=rho, filter=kind, top_k=2)
    out = torch.zeros(len(keep), 2, dtype=torch.float64)
    for j in range(2):  # a missing mode (NaN, no mass) is placed at (0, 0)
        mlat = dec.modes_lat_deg[:, j].double().nan_to_num(0.0)
        mlon = dec.modes_lon_deg[:, j].double().nan_to_num(0.0)
        near_a = haversine_km(mlat, mlon, la, loa)
        near_b = haversine_km(mlat, mlon, lb, lob)
        m = dec.modes_mass[:, j].double()
        out[:, 0] += torch.where(near_a < near_b, m, 0.0)
        out[:, 1] += torch.where(near_a < near_b, 0.0, m)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codes", type=int, default=200)
    ap.add_argument("--L", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--rho", type=float, nargs="+", default=[0, 100, 300, 1000, 2000])
    ap.add_argument("--filters", nargs="+", default=["cap", "heat"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    tol = getattr(SHDD, "decode_tolerance_km", None)
    print("| L | rho km | filter | median km | p99 km | max km | tolerance km |")
    print("|---|---|---|---|---|---|---|")
    for L in args.L:
        shdd = SHDD(L)
        t = f"{tol(shdd):.2f}" if tol else "-"
        for kind in args.filters:
            for rho in args.rho:
                e = clean_errors(shdd, args.codes, rho, kind)
                print(f"| {L} | {rho:g} | {kind} | {e.median():.3f} | {e.quantile(0.99):.3f} | "
                      f"{e.max():.3f} | {t} |", flush=True)
    print("\nMixtures: masses over the pairs where the decoder found both points as modes (the weaker one")
    print("can stop being a peak under a wide filter, or fall outside the decoder's top grid candidates)")
    print("\n| L | rho km | filter | w | both found | mass of w (mean, worst) | mass of 1-w (mean, worst) |")
    print("|---|---|---|---|---|---|---|")
    for L in args.L:
        shdd = SHDD(L)
        for kind in args.filters:
            for rho in (0.0, 300.0, 1000.0):
                for w in (0.5, 0.7, 0.9):
                    m = mixture_masses(shdd, max(20, args.codes // 4), w, rho, kind)
                    n = len(m)
                    m = m[(m > 0).all(1)]
                    if not len(m):
                        print(f"| {L} | {rho:g} | {kind} | {w} | 0 / {n} | - | - |", flush=True)
                        continue
                    ea, eb = (m[:, 0] - w).abs().argmax(), (m[:, 1] - (1 - w)).abs().argmax()
                    print(f"| {L} | {rho:g} | {kind} | {w} | {len(m)} / {n} | {m[:, 0].mean():.3f}, "
                          f"{m[ea, 0]:.3f} | {m[:, 1].mean():.3f}, {m[eb, 1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
