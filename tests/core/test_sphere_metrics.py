"""Sphere geometry and metrics: known distances, thresholds, date line, antipodes, sampling."""

import math

import pytest
import torch

from locdiff_core.metrics import geolocation_metrics
from locdiff_core.sphere import (
    EARTH_RADIUS_KM,
    fibonacci_lattice,
    haversine_km,
    latlon_to_xyz,
    offset_km,
    sample_cap,
    sample_uniform,
    xyz_to_latlon,
)


def test_paris_new_york_distance():
    # published great-circle distance Paris (48.8566, 2.3522) - New York (40.7128, -74.0060): ~5837 km
    d = haversine_km(48.8566, 2.3522, 40.7128, -74.0060).item()
    assert abs(d - 5837) / 5837 < 0.005


def test_date_line_and_antipodes():
    assert haversine_km(0.0, 179.5, 0.0, -179.5).item() == pytest.approx(111.19, rel=1e-3)
    assert haversine_km(10.0, 20.0, -10.0, -160.0).item() == pytest.approx(
        math.pi * EARTH_RADIUS_KM, rel=1e-9
    )
    assert haversine_km(90.0, 0.0, 90.0, 123.0).item() == pytest.approx(0.0, abs=1e-9)


def test_xyz_round_trip():
    lat, lon = sample_uniform(1000, generator=torch.Generator().manual_seed(0))
    lat2, lon2 = xyz_to_latlon(latlon_to_xyz(lat, lon))
    assert haversine_km(lat, lon, lat2, lon2).max() < 1e-6


def test_fibonacci_is_equal_area():
    lat, _ = fibonacci_lattice(20000)
    # fraction of points with lat > 30 deg should equal the cap's area fraction (1 - sin 30)/2 = 0.25
    assert (lat > 30).double().mean().item() == pytest.approx(0.25, abs=1e-3)


def test_cap_sampling_stays_in_cap_and_offset_is_exact():
    g = torch.Generator().manual_seed(0)
    lat, lon = sample_cap(torch.tensor([89.0, 0.0]), torch.tensor([0.0, 179.9]), 300.0, 500, generator=g)
    d = haversine_km(
        torch.tensor([89.0, 0.0])[:, None].expand(-1, 500),
        torch.tensor([0.0, 179.9])[:, None].expand(-1, 500),
        lat,
        lon,
    )
    assert d.max() <= 300.0 + 1e-6 and d.mean() > 150  # uniform by area: mean distance 2/3 of the radius
    f64 = torch.float64
    la, lo = offset_km(torch.tensor(10.0, dtype=f64), torch.tensor(20.0, dtype=f64), 300.0, 400.0)
    assert haversine_km(10.0, 20.0, la, lo).item() == pytest.approx(500.0, rel=1e-9)


def test_metrics_threshold_inclusive_and_values():
    # a prediction exactly 25 km north counts at 25 km
    lat_at_25km = math.degrees(25.0 / EARTH_RADIUS_KM)
    m = geolocation_metrics(
        torch.tensor([0.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 0.0], dtype=torch.float64),
        torch.tensor([lat_at_25km, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 180.0], dtype=torch.float64),
    )
    assert m["acc_25km"] == 0.5 and m["acc_1km"] == 0.0 and m["acc_2500km"] == 0.5
    half = math.pi * EARTH_RADIUS_KM
    assert m["median_km"] == pytest.approx((25.0 + half) / 2, rel=1e-9)
    assert m["geoscore"] == pytest.approx(
        (5000 * math.exp(-25 / 1492.7) + 5000 * math.exp(-half / 1492.7)) / 2, rel=1e-9
    )
    assert m["n"] == 2


def test_metrics_bad_input():
    with pytest.raises(ValueError, match="lat_deg must lie in"):
        geolocation_metrics(
            torch.tensor([95.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0])
        )
    with pytest.raises(ValueError, match="at least one"):
        geolocation_metrics(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="same shape"):
        geolocation_metrics(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))
