"""Retrieval search, LocDiff-H over neighbours, credible radii and their calibration (pure functions)."""

import itertools

import numpy as np
import pytest
import torch

from locdiff_core.config import InferConfig
from locdiff_core.hybrid import hybrid_from_neighbours
from locdiff_core.retrieval import normalize_rows, search_inner_product
from locdiff_core.sampling import credible_radii
from locdiff_core.sphere import haversine_km


def test_search_is_exact_across_gallery_and_query_blocks():
    g = torch.Generator().manual_seed(0)
    gallery = normalize_rows(torch.randn(1000, 16, generator=g))
    queries = torch.randn(70, 16, generator=g)
    sim, idx = search_inner_product(queries, gallery.half(), 5, query_block=32, gallery_block=128)
    full = queries.float() @ gallery.half().float().T
    ref_s, ref_i = full.topk(5, dim=1)
    assert torch.equal(idx, ref_i)
    assert torch.allclose(sim, ref_s)
    # a numpy (memory-mapped) gallery gives the same answer, with a callback after each of its blocks
    calls = []
    s_np, i_np = search_inner_product(
        queries, gallery.half().numpy(), 5, query_block=32, gallery_block=128,
        after_block=lambda: calls.append(1),
    )
    assert torch.equal(i_np, ref_i) and torch.equal(s_np, sim) and len(calls) == 8  # ceil(1000 / 128)
    # k larger than the gallery is capped
    s2, i2 = search_inner_product(queries[:3], gallery[:4], 10)
    assert i2.shape == (3, 4)


def test_search_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="share E"):
        search_inner_product(torch.zeros(2, 3), torch.zeros(5, 4), 1)


def _nb(lat, lon, sim):
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    return t(sim), t(lat), t(lon)


def test_hybrid_best_takes_most_similar_neighbour_near_a_mode_else_locdiff():
    # image 0: modes at (0,0) and (30,30); neighbours sorted by similarity: far away, near mode 2, near mode 1
    sim, lat, lon = _nb([60.0, 30.5, 0.5], [60.0, 30.5, 0.5], [0.9, 0.8, 0.7])
    modes_lat = torch.tensor([[0.0, 30.0]], dtype=torch.float64)
    res = hybrid_from_neighbours(
        torch.tensor([0.0]), torch.tensor([0.0]), modes_lat, modes_lat.clone(), sim, lat, lon, radius_km=200
    )
    assert res.from_gallery.tolist() == [True]
    assert (res.lat_deg.item(), res.lon_deg.item()) == (30.5, 30.5)
    assert res.n_candidates.tolist() == [2]
    # only the first mode proposes: the neighbour near mode 2 is no longer a candidate
    res1 = hybrid_from_neighbours(
        torch.tensor([0.0]),
        torch.tensor([0.0]),
        modes_lat[:, :1],
        modes_lat[:, :1],
        sim,
        lat,
        lon,
        radius_km=200,
    )
    assert res1.lat_deg.item() == 0.5
    # a NaN mode proposes nothing; no candidate at all -> LocDiff's own prediction
    nan_modes = torch.tensor([[float("nan"), -45.0]], dtype=torch.float64)
    res2 = hybrid_from_neighbours(
        torch.tensor([-45.0]), torch.tensor([-45.0]), nan_modes, nan_modes, sim, lat, lon, radius_km=200
    )
    assert res2.from_gallery.tolist() == [False] and res2.lat_deg.item() == -45.0


def test_hybrid_mass_gate_drops_weak_modes_regions_but_never_the_first():
    # modes at (0,0) with mass 0.9 and (30,30) with mass 0.1; the most similar neighbour is near mode 2
    sim, lat, lon = _nb([30.5, 0.5], [30.5, 0.5], [0.9, 0.7])
    modes = torch.tensor([[0.0, 30.0]], dtype=torch.float64)
    mass = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    args = (torch.tensor([0.0]), torch.tensor([0.0]), modes, modes.clone(), sim, lat, lon)
    open_ = hybrid_from_neighbours(*args, radius_km=200, modes_mass=mass, min_mass=0.0)
    assert open_.n_candidates.tolist() == [2] and open_.lat_deg.item() == 30.5
    gated = hybrid_from_neighbours(*args, radius_km=200, modes_mass=mass, min_mass=0.2)
    assert gated.n_candidates.tolist() == [1] and gated.lat_deg.item() == 0.5  # mode 2 proposes nothing
    # the first mode proposes whatever its mass
    weak_first = hybrid_from_neighbours(
        *args, radius_km=200, modes_mass=torch.tensor([[0.05, 0.05]], dtype=torch.float64), min_mass=0.2
    )
    assert weak_first.n_candidates.tolist() == [1] and weak_first.lat_deg.item() == 0.5
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        hybrid_from_neighbours(*args, modes_mass=mass, min_mass=1.0)
    with pytest.raises(ValueError, match="hybrid_min_mass"):
        InferConfig(hybrid_min_mass=-0.1)


def test_hybrid_vote_prefers_the_dense_cluster():
    # one very similar isolated neighbour vs three slightly less similar ones within 25 km of each other
    sim, lat, lon = _nb([1.0, 1.1, 1.1, 1.12], [1.0, 1.1, 1.12, 1.1], [0.9, 0.8, 0.8, 0.8])
    lat[0, 0], lon[0, 0] = 0.0, 0.0  # the isolated one sits ~ 150 km away from the cluster
    modes = torch.tensor([[0.5]], dtype=torch.float64)
    kw = dict(radius_km=200.0)
    best = hybrid_from_neighbours(torch.tensor([0.5]), torch.tensor([0.5]), modes, modes, sim, lat, lon, **kw)
    vote = hybrid_from_neighbours(
        torch.tensor([0.5]), torch.tensor([0.5]), modes, modes, sim, lat, lon, rule="vote", **kw
    )
    assert best.lat_deg.item() == 0.0
    assert vote.lat_deg.item() == pytest.approx(1.1)
    with pytest.raises(ValueError, match="allowed values"):
        hybrid_from_neighbours(
            torch.tensor([0.5]), torch.tensor([0.5]), modes, modes, sim, lat, lon, rule="x"
        )


def test_credible_radii_are_sample_distance_quantiles():
    # samples due north of the point at 0..9 degrees of latitude: distances 0, 111, ..., 1000 km
    s_lat = torch.arange(10, dtype=torch.float64)[None]
    s_lon = torch.zeros(1, 10, dtype=torch.float64)
    r = credible_radii(torch.tensor([0.0]), torch.tensor([0.0]), s_lat, s_lon)
    d = haversine_km(torch.zeros(1, 1), torch.zeros(1, 1), s_lat, s_lon)[0].numpy()
    assert r[0].numpy() == pytest.approx([np.quantile(d, 0.5), np.quantile(d, 0.9)])
    r2 = credible_radii(torch.tensor([0.0]), torch.tensor([0.0]), s_lat, s_lon, scales=(2.0, 0.5))
    assert r2[0].numpy() == pytest.approx(r[0].numpy() * [2.0, 0.5])
    with pytest.raises(ValueError):
        credible_radii(torch.tensor([0.0]), torch.tensor([0.0]), s_lat, s_lon, levels=(1.5,))


def test_radius_scales_fitted_on_val_reach_nominal_coverage():
    from locdiff.stages.evals import coverage, fit_radius_scales

    rng = np.random.default_rng(0)
    raw = rng.uniform(50, 500, (2000, 2)) * [1.0, 2.0]
    dist = raw[:, 0] * rng.exponential(4.0, 2000)  # radii are 4x too small on average
    s50, s90 = fit_radius_scales(dist, raw)
    assert coverage(dist, raw[:, 0] * s50) == pytest.approx(0.5, abs=0.01)
    assert coverage(dist, raw[:, 1] * s90) == pytest.approx(0.9, abs=0.01)
    assert coverage(dist, raw[:, 0]) < 0.3


def test_hybrid_with_a_scorer_searches_around_every_mode():
    from locdiff_core.hybrid import hybrid_modes_with_scorer, hybrid_predict

    g_lat = torch.tensor([0.0, 0.5, 30.2, 60.0], dtype=torch.float64)
    g_lon = torch.tensor([0.0, 0.5, 30.2, 60.0], dtype=torch.float64)

    class Fixed:  # image-independent scores: index 3 best, then 2, then 1, then 0
        gallery_lat_deg, gallery_lon_deg = g_lat, g_lon

        def score(self, emb, idx):
            return torch.tensor([0.1, 0.2, 0.5, 9.0])[idx].expand(emb.shape[0], -1)

    emb = torch.zeros(2, 4)
    pred = torch.tensor([0.2, -40.0], dtype=torch.float64)
    modes = torch.tensor([[0.2, 30.0], [-40.0, float("nan")]], dtype=torch.float64)
    res = hybrid_modes_with_scorer(emb, pred, pred, modes, modes, Fixed(), radius_km=200)
    assert res.gallery_idx.tolist() == [2, -1]  # the second mode's candidate outscores the first's
    assert res.lat_deg.tolist() == [30.2, -40.0]
    # with the point prediction as its only mode it is hybrid_predict
    one = hybrid_modes_with_scorer(emb, pred, pred, pred[:, None], pred[:, None], Fixed(), radius_km=200)
    ref = hybrid_predict(emb, pred, pred, Fixed(), radius_km=200)
    assert torch.equal(one.gallery_idx, ref.gallery_idx)


def test_mass_calibration_is_monotone_and_calibrates_fresh_predictions():
    from locdiff_core.metrics import apply_mass_calibration, fit_mass_calibration, mass_reliability

    rng = np.random.default_rng(0)

    def draw(n):  # an over-confident first-mode mass: the truth is in its basin with p = 0.3 + 0.6 m
        m = rng.uniform(0, 1, n)
        return m, rng.uniform(0, 1, n) < 0.3 + 0.6 * m

    m, hit = draw(20_000)
    knots = fit_mass_calibration(np.append(m, np.nan), np.append(hit, False))  # NaN (no mode) ignored
    assert len(knots) <= 20 and all(b[0] >= a[0] and b[1] >= a[1] for a, b in itertools.pairwise(knots))
    m2, hit2 = draw(20_000)
    raw = np.stack([m2, 0.5 * (1 - m2), np.full_like(m2, np.nan)], 1)
    cal = apply_mass_calibration(raw, knots)

    def worst(mass, h):
        return max(abs(r["mean_mass"] - r["hit_rate"]) for r in mass_reliability(mass, h) if r["n"] >= 50)

    assert worst(m2, hit2) > 0.2 and worst(cal[:, 0], hit2) < 0.03
    assert np.isnan(cal[:, 2]).all() and (cal[:, 1] >= 0).all()
    assert np.nansum(cal, axis=1).max() <= 1 + 1e-9  # still probabilities of disjoint basins
    # the other modes keep their proportions of what the first leaves
    up = cal[:, 0] > m2
    np.testing.assert_allclose(cal[up, 1] / (1 - cal[up, 0]), raw[up, 1] / (1 - m2[up]), rtol=1e-9)
