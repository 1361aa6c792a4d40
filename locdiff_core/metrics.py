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
