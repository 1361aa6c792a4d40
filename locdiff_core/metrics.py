"""Geolocation metrics.

Conventions (peers differ; ours are stated here and in the README):
- distance: haversine great-circle distance on a sphere of radius 6371.0088 km (mean Earth radius);
- accuracy at r km: the fraction of predictions with distance <= r (a prediction exactly at the threshold
  counts as correct), for r in 1, 25, 200, 750, 2500 km (street, city, region, country, continent);
- GeoScore: the mean of 5000 * exp(-d / 1492.7) (the GeoGuessr-style score used by OSV-5M/PIGEON);
- median and mean distance in km.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# The one definition of the accuracy thresholds and their column names (reports, the catalog's views).
# torch is imported inside the functions, so reading these does not import it (`locdiff sql` stays fast).
THRESHOLDS_KM = (1, 25, 200, 750, 2500)
ACC_KEYS = tuple(f"acc_{r}km" for r in THRESHOLDS_KM)
GEOSCORE_SCALE_KM = 1492.7


def geolocation_metrics(true_lat, true_lon, pred_lat, pred_lon) -> dict[str, float]:
    """Accuracy at each threshold, median/mean error and GeoScore for paired predictions ``[N]``."""
    import torch

    from locdiff_core._checks import as_float_tensor
    from locdiff_core.sphere import haversine_km

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
    out = {k: float((d <= r).to(torch.float64).mean()) for k, r in zip(ACC_KEYS, THRESHOLDS_KM, strict=True)}
    out["median_km"] = float(d.median()) if d.numel() % 2 else float(d.quantile(0.5))
    out["mean_km"] = float(d.mean())
    out["geoscore"] = float((5000.0 * torch.exp(-d / GEOSCORE_SCALE_KM)).mean())
    out["n"] = int(d.numel())
    return out


def in_first_basin(true_lat, true_lon, modes_lat, modes_lon, basin_km: float) -> torch.Tensor:
    """Whether each truth ``[N]`` lies in the basin of its first mode: nearer to mode 0 of ``modes_lat/lon
    [N, k]`` (NaN = no mode) than to any other mode, and within ``basin_km`` of it. ``[N]`` bool."""
    import torch

    from locdiff_core._checks import as_float_tensor
    from locdiff_core.sphere import haversine_km

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
    import torch

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


def fit_mass_calibration(mass, hit, n_bins: int = 20) -> tuple[tuple[float, float], ...]:
    """A monotone map from predicted mass to observed hit rate, fitted on held-out (val) predictions:
    the predictions sorted by mass and cut into ``n_bins`` bins of equal count, then the bins' hit rates
    made non-decreasing by pooling adjacent violators (isotonic regression, weighted by count). Returns
    the knots ``((mean mass, hit rate), ...)`` in increasing mass; :func:`apply_mass_calibration`
    interpolates between them (constant beyond the ends)."""
    import torch

    mass = torch.as_tensor(mass, dtype=torch.float64).reshape(-1)
    hit = torch.as_tensor(hit, dtype=torch.float64).reshape(-1)
    if mass.shape != hit.shape:
        raise ValueError(f"mass and hit must have one length, got {mass.shape} and {hit.shape}")
    found = torch.isfinite(mass)  # an image without a mode has no mass to calibrate
    mass, hit = mass[found].clamp(0.0, 1.0), hit[found]
    if mass.numel() == 0:
        raise ValueError("no finite mass to fit a calibration on")
    order = torch.argsort(mass)
    blocks = []  # [sum of mass, sum of hits, count], pooled while the hit rates decrease
    for part in torch.tensor_split(order, min(n_bins, mass.numel())):
        blocks.append([float(mass[part].sum()), float(hit[part].sum()), part.numel()])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] > blocks[-1][1] / blocks[-1][2]:
            m, h, n = blocks.pop()
            blocks[-1] = [blocks[-1][0] + m, blocks[-1][1] + h, blocks[-1][2] + n]
    return tuple((m / n, h / n) for m, h, n in blocks)


def apply_mass_calibration(modes_mass, knots) -> np.ndarray:
    """Mode masses ``[N, k]`` with the first mode's through the fitted map (:func:`fit_mass_calibration`,
    which was fitted on first modes) and the others rescaled to share what is left in the same
    proportions as before, so each row still sums to at most 1. NaN (no mode) stays NaN."""
    mass = np.array(modes_mass, dtype=np.float64, ndmin=2)
    kx, ky = (np.asarray(v, dtype=np.float64) for v in zip(*knots, strict=True))
    first = mass[:, 0]
    cal = np.where(np.isfinite(first), np.interp(np.nan_to_num(first), kx, ky), np.nan)
    rest = np.nansum(mass[:, 1:], axis=1)
    # the other modes keep their shares of the rest: scaled by (1 - new first) / (1 - old first) at most
    scale = np.where(rest > 0, np.minimum(1.0, (1.0 - cal) / np.maximum(1.0 - first, 1e-12)), 1.0)
    scale = np.minimum(scale, np.where(rest > 0, (1.0 - cal) / np.maximum(rest, 1e-300), np.inf))
    out = mass.copy()
    out[:, 0] = cal
    out[:, 1:] *= np.nan_to_num(scale, nan=1.0)[:, None]
    return out


def reliability_summary(rows: list[dict], min_n: int = 50) -> dict[str, float]:
    """``mass_ece``: count-weighted mean |mean mass - hit rate| over the bins; ``mass_max_gap``: the largest
    gap among bins with at least ``min_n`` items (NaN when there is none)."""
    total = sum(r["n"] for r in rows)
    ece = sum(r["n"] * abs(r["mean_mass"] - r["hit_rate"]) for r in rows) / max(total, 1)
    gaps = [abs(r["mean_mass"] - r["hit_rate"]) for r in rows if r["n"] >= min_n]
    return {"mass_ece": float(ece), "mass_max_gap": float(max(gaps)) if gaps else float("nan")}
