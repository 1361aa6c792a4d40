"""SHDD codes: norms, filters, SHDD-KL and the modal-search decoder."""

import math

import pytest
import torch

from locdiff_core.anchors import AnchorGrid, from_coordinates, near_target_anchors, uniform_anchors
from locdiff_core.shdd import SHDD
from locdiff_core.sphere import haversine_km, sample_uniform


def test_clean_code_norm_and_peak():
    s = SHDD(20)
    lat, lon = sample_uniform(50, generator=torch.Generator().manual_seed(0))
    c = s.encode(lat, lon)
    assert torch.allclose(c.norm(dim=-1), torch.full((50,), 21 / math.sqrt(4 * math.pi), dtype=torch.float64))
    f_self = (c * c).sum(-1)
    assert torch.allclose(f_self, torch.full((50,), s.peak, dtype=torch.float64))
    assert s.half_width_km() == pytest.approx(14130 / 21, rel=0.05)


def test_filters():
    s = SHDD(30)
    for kind in ("heat", "cap"):
        w = s.degree_weights(kind, 300.0)
        assert w[0] == pytest.approx(1.0) and (w[1:].abs() <= 1 + 1e-12).all() and w[-1] < w[1]
        assert torch.equal(s.degree_weights(kind, 0.0), torch.ones(31, dtype=torch.float64))
    # the cap filter is the normalised raised-cosine cap (1 + cos(pi g / a)) / 2: integrate it against P_3
    a = 500.0 / 6371.0088
    g = torch.linspace(0.0, a, 200001, dtype=torch.float64)
    t = torch.cos(g)
    prof = (1 + torch.cos(math.pi * g / a)) / 2 * torch.sin(g)
    p3 = 0.5 * (5 * t**3 - 3 * t)
    assert s.degree_weights("cap", 500.0)[3].item() == pytest.approx(
        torch.trapezoid(p3 * prof, g).item() / torch.trapezoid(prof, g).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="one of \\('none', 'heat', 'cap'\\)"):
        s.degree_weights("gauss", 1.0)
    with pytest.raises(ValueError, match="radius_km must be a finite number >= 0"):
        s.degree_weights("cap", -1.0)


def test_kl_loss_properties():
    g = torch.Generator().manual_seed(0)
    for L in (8, 128):
        s = SHDD(L)
        lat, lon = sample_uniform(4, generator=g)
        true = s.encode(lat.float(), lon.float())
        alat, alon = uniform_anchors(2000, jitter=True, generator=g)
        assert s.kl_loss(true, true, alat, alon).item() == pytest.approx(0.0, abs=1e-6)
        pred = (true + 0.05 * torch.randn(true.shape, generator=g)).requires_grad_(True)
        loss = s.kl_loss(pred, true, alat, alon, tau=0.1)
        assert torch.isfinite(loss) and loss.item() > 0
        loss.backward()
        assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


@pytest.mark.parametrize("L", [32, pytest.param(64, marks=pytest.mark.slow)])
def test_clean_codes_decode_to_their_points(L):
    s = SHDD(L)
    lat, lon = sample_uniform(3_000, generator=torch.Generator().manual_seed(L))
    d = s.decode(s.encode(lat.float(), lon.float()))
    err = haversine_km(lat, lon, d.lat_deg.double(), d.lon_deg.double())
    # refinement runs on the exact function in float64: sub-kilometre (float32 codes and lat/lon output)
    assert err.median() <= 0.2
    assert err.max() <= 1.0
    assert torch.allclose(d.score, torch.ones_like(d.score), atol=1e-4)


def _noisy_mixtures(s: SHDD, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lat, lon = sample_uniform(3 * n, generator=g)
    codes = s.encode(lat.float(), lon.float()).reshape(n, 3, -1)
    w = torch.rand(n, 3, generator=g) * (torch.rand(n, 3, generator=g) < 0.6)
    w[:, 0] = 1.0
    w = w / w.sum(1, keepdim=True)
    noise = 0.3 * torch.randn(n, s.dim, generator=g) * codes[:, 0].norm(dim=1, keepdim=True) / s.dim**0.5
    return (w[:, :, None] * codes).sum(1) + noise


@pytest.mark.parametrize("coarse", ["regular", "fibonacci"])
def test_decoder_reaches_dense_search_precision(coarse):
    """The issue's precision bar, on a small case: against the argmax over a dense anchor grid, median
    distance <= its spacing, p99 <= 2x, and a value at least the dense grid's in >= 99.5% of codes."""
    s = SHDD(16)
    codes = _noisy_mixtures(s, 300)
    dense = AnchorGrid.fibonacci(300_000, 16, max_cache_bytes=0, chunk_size=50_000)
    vals = dense.evaluate(codes)
    best_val, best = vals.max(1)
    anchors = None if coarse == "regular" else AnchorGrid.fibonacci(3_000, 16)
    d = s.decode(codes, anchors=anchors)
    dist = haversine_km(
        dense.lat_deg[best].double(), dense.lon_deg[best].double(), d.lat_deg.double(), d.lon_deg.double()
    )
    assert dist.median() <= dense.spacing_km
    assert dist.quantile(0.99) <= 2 * dense.spacing_km
    f = d.score.double() * s.peak
    assert (f >= best_val.double() * (1 - 1e-4)).double().mean() >= 0.995


def test_decoder_kernels_match_torch_fallback(monkeypatch):
    import locdiff_core.harmonics as H
    import locdiff_core.shdd as shdd_mod

    s = SHDD(12)
    codes = _noisy_mixtures(s, 40, seed=3)
    fast = s.decode(codes, top_k=3)
    monkeypatch.setattr(H, "_kernels", lambda: None)
    monkeypatch.setattr(shdd_mod, "_kernels", lambda: None)
    slow = s.decode(codes, top_k=3)
    assert haversine_km(fast.lat_deg, fast.lon_deg, slow.lat_deg, slow.lon_deg).max() < 0.5
    torch.testing.assert_close(fast.score, slow.score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.modes_mass, slow.modes_mass, rtol=1e-3, atol=1e-4)


def test_decode_is_independent_of_the_chunking():
    s = SHDD(10)
    codes = _noisy_mixtures(s, 50, seed=4)
    a, b = s.decode(codes), s.decode(codes, batch_size=7)
    for name in ("lat_deg", "lon_deg", "score", "modes_lat_deg", "modes_mass"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), equal_nan=True)


def test_mixture_decodes_to_heavier_point_and_top2_modes():
    s = SHDD(32)
    paris = (48.8566, 2.3522)
    tokyo = (35.6762, 139.6503)
    c = 0.6 * s.encode(torch.tensor([paris[0]]), torch.tensor([paris[1]])) + 0.4 * s.encode(
        torch.tensor([tokyo[0]]), torch.tensor([tokyo[1]])
    )
    d = s.decode(c.float(), top_k=3)
    assert haversine_km(paris[0], paris[1], d.lat_deg, d.lon_deg).item() < 5
    assert (
        haversine_km(tokyo[0], tokyo[1], d.modes_lat_deg[0, 1], d.modes_lon_deg[0, 1]).item()
        < s.default_grid().spacing_km
    )
    assert d.modes_mass[0, 0] > d.modes_mass[0, 1] > d.modes_mass[0, 2]
    assert d.modes_mass[0, 0].item() == pytest.approx(0.6, abs=0.02)
    assert d.modes_mass[0, 1].item() == pytest.approx(0.4, abs=0.02)
    assert d.modes_score[0, 0].item() == pytest.approx(0.6, abs=0.05)
    assert d.modes_score[0, 1].item() == pytest.approx(0.4, abs=0.05)


@pytest.mark.parametrize("L", [16, 32, 64])
def test_clean_codes_decode_to_their_point_at_every_rho_and_filter(L):
    """Issue 24: a filter sets the decoder's resolution and must not move a clean code's answer."""
    s = SHDD(L)
    lat, lon = sample_uniform(24, generator=torch.Generator().manual_seed(L))
    codes = s.encode(lat, lon)
    tol = s.decode_tolerance_km()
    assert tol <= 5.0
    for kind in ("cap", "heat"):
        for rho in (0.0, 100.0, 300.0, 1000.0, 2000.0):
            d = s.decode(codes, rho_km=rho, filter=kind, top_k=2)
            err = haversine_km(d.lat_deg.double(), d.lon_deg.double(), lat, lon)
            assert err.median() <= tol and err.quantile(0.99) <= 2 * tol, (kind, rho, err.max())
            assert d.score.double().sub(1).abs().max() < 1e-3  # the filtered peak's own height


def _two_point_mixtures(s: SHDD, w: float, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lat, lon = sample_uniform(6 * n, generator=g)
    la, loa, lb, lob = lat[0::2], lon[0::2], lat[1::2], lon[1::2]
    far = torch.nonzero(haversine_km(la, loa, lb, lob) >= 2000).flatten()[:n]
    la, loa, lb, lob = la[far], loa[far], lb[far], lob[far]
    return (la, loa, lb, lob), w * s.encode(la, loa) + (1 - w) * s.encode(lb, lob)


@pytest.mark.parametrize("w", [0.5, 0.7, 0.9])
def test_mode_mass_of_clean_two_point_mixtures_is_their_weight(w):
    s = SHDD(32)
    (la, loa, lb, lob), codes = _two_point_mixtures(s, w, 30, seed=int(10 * w))
    for kind, rho in (("cap", 0.0), ("cap", 300.0), ("heat", 300.0), ("cap", 1000.0)):
        d = s.decode(codes, rho_km=rho, filter=kind, top_k=3)
        total = d.modes_mass.double().sum(1)
        assert (total <= 1 + 1e-6).all() and (total >= 0.95).all() and (d.modes_mass >= 0).all()
        for j, (plat, plon, want) in enumerate(((la, loa, w), (lb, lob, 1 - w))):
            # the mode nearest each point, and its mass
            dist = torch.stack([
                haversine_km(d.modes_lat_deg[:, i].double().nan_to_num(0.0),
                             d.modes_lon_deg[:, i].double().nan_to_num(0.0), plat, plon)
                for i in range(3)
            ], 1)
            near, idx = dist.min(1)
            assert near.max() < 0.5 * s.half_width_km(), (kind, rho, j)
            mass = d.modes_mass.double().gather(1, idx[:, None])[:, 0]
            assert (mass - want).abs().max() <= 0.05, (kind, rho, j, mass)


def test_decoder_with_custom_uncached_grid_matches_cached():
    s = SHDD(16)
    lat, lon = sample_uniform(20, generator=torch.Generator().manual_seed(3))
    codes = s.encode(lat.float(), lon.float())
    cached = AnchorGrid.fibonacci(12_000, 16)
    chunked = AnchorGrid.fibonacci(12_000, 16, max_cache_bytes=0, chunk_size=1000)
    assert chunked.basis is None
    torch.testing.assert_close(cached.evaluate(codes), chunked.evaluate(codes), rtol=1e-4, atol=1e-4)
    a, b = s.decode(codes, anchors=cached), s.decode(codes, anchors=chunked)
    assert haversine_km(a.lat_deg, a.lon_deg, b.lat_deg, b.lon_deg).max() < 0.1


def test_anchor_sets():
    g = torch.Generator().manual_seed(0)
    lat, lon = uniform_anchors(1000, jitter=True, generator=g)
    assert lat.shape == (1000,) and (lat.abs() <= 90).all()
    src_lat, src_lon = torch.tensor([10.0, 20.0]), torch.tensor([30.0, 40.0])
    la, lo = from_coordinates(src_lat, src_lon, 5, generator=g)
    assert set(la.tolist()) <= {10.0, 20.0}
    la, lo = near_target_anchors(src_lat, src_lon, 100.0, 7, generator=g)
    assert la.shape == (14,)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        uniform_anchors(0)


def test_decode_bad_input():
    s = SHDD(8)
    with pytest.raises(ValueError, match="coeffs must have shape \\[B, 81\\]"):
        s.decode(torch.zeros(2, 80))
    with pytest.raises(ValueError, match="NaN"):
        s.decode(torch.full((1, 81), float("nan")))
    with pytest.raises(ValueError, match="empty batch"):
        s.decode(torch.zeros(0, 81))
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        s.decode(torch.zeros(1, 81), top_k=0)
    with pytest.raises(ValueError, match="built for L=16"):
        s.decode(torch.zeros(1, 81), anchors=AnchorGrid.fibonacci(100, 16))
