"""Geolocation metrics.

Conventions (peers differ; ours are stated here and in the README):
- distance: haversine great-circle distance on a sphere of radius 6371.0088 km (mean Earth radius);
- accuracy at r km: the fraction of predictions with distance <= r (a prediction exactly at the threshold
  counts as correct), for r in 1, 25, 200, 750, 2500 km (street, city, region, country, continent);
- GeoScore: the mean of 5000 * exp(-d / 1492.7) (the GeoGuessr-style score used by OSV-5M/PIGEON);
- median and mean distance in km.
"""

from __future__ import annotations

import torch

from locdiff_core._checks import as_float_tensor
from locdiff_core.sphere import haversine_km

THRESHOLDS_KM = (1, 25, 200, 750, 2500)
GEOSCORE_SCALE_KM = 1492.7


def geolocation_metrics(true_lat, true_lon, pred_lat, pred_lon) -> dict[str, float]:
    """Accuracy at each threshold, median/mean error and GeoScore for paired predictions ``[N]``."""
    args = [
        as_float_tensor(x, name).to(torch.float64)
        for x, name in zip(
            (true_lat, true_lon, pred_lat, pred_lon),
            ("true_lat", "true_lon", "pred_lat", "pred_lon"),
            strict=True,
        )
    ]
    d = haversine_km(*args).reshape(-1)  # in float64 whatever the inputs' precision
    if d.numel() == 0:
        raise ValueError("geolocation_metrics needs at least one prediction, got none")
    out: dict[str, float] = {f"acc_{r}km": float((d <= r).to(torch.float64).mean()) for r in THRESHOLDS_KM}
    out["median_km"] = float(d.median()) if d.numel() % 2 else float(d.quantile(0.5))
    out["mean_km"] = float(d.mean())
    out["geoscore"] = float((5000.0 * torch.exp(-d / GEOSCORE_SCALE_KM)).mean())
    out["n"] = int(d.numel())
    return out


def in_first_basin(true_lat, true_lon, modes_lat, modes_lon, basin_km: float) -> torch.Tensor:
    """Whether each truth ``[N]`` lies in the basin of its first mode: nearer to mode 0 of ``modes_lat/lon
    [N, k]`` (NaN = no mode) than to any other mode, and within ``basin_km`` of it. ``[N]`` bool."""
    t_lat = as_float_tensor(true_lat, "true_lat").to(torch.float64).reshape(-1, 1)
    t_lon = as_float_tensor(true_lon, "true_lon").to(torch.float64).reshape(-1, 1)
    m_lat = torch.as_tensor(modes_lat, dtype=torch.float64)
    m_lon = torch.as_tensor(modes_lon, dtype=torch.float64)
    found = torch.isfinite(m_lat) & torch.isfinite(m_lon)
    d = haversine_km(
        t_lat.expand_as(m_lat), t_lon.expand_as(m_lon), m_lat.nan_to_num(0.0), m_lon.nan_to_num(0.0)
    )
    d = torch.where(found, d, torch.inf)
    return found[:, 0] & (d[:, 0] <= basin_km) & (d[:, 0] <= d.min(1).values)


def mass_reliability(mass, hit, n_bins: int = 10) -> list[dict]:
    """Reliability of a predicted probability ``mass [N]`` against outcomes ``hit [N]``: per bin of equal
    width on [0, 1] (the last closed), the count, mean predicted mass and observed hit rate (empty bins
    are left out)."""
    mass = torch.as_tensor(mass, dtype=torch.float64).reshape(-1)
    hit = torch.as_tensor(hit, dtype=torch.float64).reshape(-1)
    idx = (mass.clamp(0.0, 1.0) * n_bins).long().clamp_max(n_bins - 1)
    rows = []
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        if n:
            rows.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": n,
                         "mean_mass": float(mass[sel].mean()), "hit_rate": float(hit[sel].mean())})
    return rows


def reliability_summary(rows: list[dict], min_n: int = 50) -> dict[str, float]:
    """``mass_ece``: count-weighted mean |mean mass - hit rate| over the bins; ``mass_max_gap``: the largest
    gap among bins with at least ``min_n`` items (NaN when there is none)."""
    total = sum(r["n"] for r in rows)
    ece = sum(r["n"] * abs(r["mean_mass"] - r["hit_rate"]) for r in rows) / max(total, 1)
    gaps = [abs(r["mean_mass"] - r["hit_rate"]) for r in rows if r["n"] >= min_n]
    return {"mass_ece": float(ece), "mass_max_gap": float(max(gaps)) if gaps else float("nan")}
