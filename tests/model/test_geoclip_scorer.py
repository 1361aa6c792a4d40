"""GeoCLIP scorer from the wheel's shipped weights, offline, on random 768-d features."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("geoclip")

from locdiff.geoclip_scorer import GeoCLIPScorer, load_geoclip_gallery  # noqa: E402
from locdiff_core.hybrid import hybrid_predict  # noqa: E402
from locdiff_core.sphere import haversine_km  # noqa: E402


@pytest.fixture(scope="module")
def scorer():
    lat, lon = load_geoclip_gallery()
    assert lat.shape == (100_000,) and lat.abs().max() <= 90 and lon.abs().max() <= 180
    idx = torch.arange(0, 100_000, 50)  # a 2,000-point subset keeps the test fast
    return GeoCLIPScorer(lat[idx], lon[idx])


def test_shapes_determinism_and_cache(scorer, tmp_path):
    feats = torch.randn(4, 768, generator=torch.Generator().manual_seed(0))
    s1 = scorer.score(feats)
    assert s1.shape == (4, 2000) and torch.isfinite(s1).all()
    assert torch.equal(s1, scorer.score(feats))
    # a subset of gallery indices gives the matching columns
    idx = torch.tensor([5, 17, 1999])
    assert torch.allclose(scorer.score(feats, idx), s1[:, idx])
    # logits are a scaled cosine: bounded by the logit scale
    assert s1.abs().max() <= scorer.logit_scale + 1e-4
    # different images rank the gallery differently (the head and encoder are really loaded)
    assert not torch.equal(s1.argmax(1)[0:1].expand(4), s1.argmax(1))
    path = tmp_path / "gallery.pt"
    scorer.save_cache(path)
    again = GeoCLIPScorer(scorer.gallery_lat_deg, scorer.gallery_lon_deg)
    again.load_cache(path)
    assert torch.equal(again.score(feats), s1)


def test_hybrid_with_geoclip_picks_gallery_point_within_radius(scorer):
    feats = torch.randn(3, 768, generator=torch.Generator().manual_seed(1))
    pred_lat = scorer.gallery_lat_deg[[10, 500, 1500]] + 0.3
    pred_lon = scorer.gallery_lon_deg[[10, 500, 1500]] - 0.3
    res = hybrid_predict(feats, pred_lat, pred_lon, scorer, radius_km=200)
    assert res.from_gallery.all()
    d = haversine_km(pred_lat, pred_lon, res.lat_deg, res.lon_deg)
    assert (d <= 200).all()


def test_bad_features_rejected(scorer):
    with pytest.raises(ValueError, match=r"\[B, 768\]"):
        scorer.score(torch.randn(2, 512))
    with pytest.raises(ValueError, match="NaN"):
        scorer.score(torch.full((1, 768), float("nan")))
