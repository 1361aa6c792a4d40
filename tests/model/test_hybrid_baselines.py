import pytest
import torch

from locdiff_core.baselines import assign_cells, train_baseline
from locdiff_core.config import TrainConfig
from locdiff_core.hybrid import CosineGalleryScorer, candidates_within, hybrid_predict
from locdiff_core.sphere import fibonacci_lattice, haversine_km, latlon_to_xyz

from ._data import location_embeddings


def test_candidates_within_matches_haversine():
    g_lat, g_lon = fibonacci_lattice(2000)
    p_lat, p_lon = torch.tensor([10.0, -80.0, 45.0]), torch.tensor([20.0, 170.0, -179.9])
    mask = candidates_within(p_lat, p_lon, g_lat, g_lon, 700.0)
    d = haversine_km(p_lat[:, None].double(), p_lon[:, None].double(), g_lat[None], g_lon[None])
    assert torch.equal(mask, d <= 700.0)
    assert mask.sum(1).min() > 0


def test_hybrid_picks_best_scoring_candidate_within_radius_else_keeps_prediction():
    g_lat = torch.tensor([0.0, 0.5, 1.0, 40.0], dtype=torch.float64)
    g_lon = torch.tensor([0.0, 0.5, 1.0, 40.0], dtype=torch.float64)

    class Fixed:
        gallery_lat_deg, gallery_lon_deg = g_lat, g_lon

        def score(self, emb, idx):
            # prefer index 3 globally, then 1: image-independent scores
            table = torch.tensor([0.1, 0.5, 0.2, 9.0])
            return table[idx].expand(emb.shape[0], -1)

    emb = torch.zeros(2, 4)
    res = hybrid_predict(emb, torch.tensor([0.2, -60.0]), torch.tensor([0.2, -60.0]), Fixed(), radius_km=200)
    # image 0: candidates 0, 1, 2 within 200 km -> best score among them is index 1 (index 3 is far away)
    assert res.gallery_idx.tolist() == [1, -1]
    assert res.lat_deg.tolist() == pytest.approx([0.5, -60.0])
    assert res.from_gallery.tolist() == [True, False]
    assert res.n_candidates.tolist() == [3, 0]


def test_hybrid_with_cosine_scorer_recovers_gallery_match():
    data = location_embeddings(3000, seed=1)
    scorer = CosineGalleryScorer(data.emb, data.lat_deg, data.lon_deg)
    q = data.subset(torch.arange(20))
    # a coarse prediction ~100 km away: the hybrid snaps to the exact gallery point (same embedding)
    from locdiff_core.sphere import offset_km

    plat, plon = offset_km(q.lat_deg, q.lon_deg, torch.full((20,), 60.0), torch.full((20,), 60.0))
    res = hybrid_predict(q.emb, plat, plon, scorer, radius_km=200)
    assert res.from_gallery.all()
    assert torch.equal(res.gallery_idx, torch.arange(20))


def test_cells_are_nearest_centres():
    lat, lon = fibonacci_lattice(64)
    cells = assign_cells(lat, lon, latlon_to_xyz(lat, lon))
    assert torch.equal(cells, torch.arange(64))


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_baselines_learn_and_beat_most_common_cell(kind):
    train = location_embeddings(4000, seed=2)
    test = location_embeddings(300, seed=3)
    tc = TrainConfig(batch_size=128, max_steps=300, lr=3e-3, warmup_steps=20, log_every=0)
    model = train_baseline(kind, train, tc, hidden=128, n_cells=256, dropout=0.0)
    trivial = train_baseline("most_common_cell", train, tc, n_cells=256)
    lat, lon = model.predict(test.emb)
    tlat, tlon = trivial.predict(test.emb)
    assert lat.shape == (300,) and tlat.shape == (300,)
    err = haversine_km(test.lat_deg, test.lon_deg, lat, lon).median()
    err0 = haversine_km(test.lat_deg, test.lon_deg, tlat, tlon).median()
    assert err < 0.5 * err0, (float(err), float(err0))


def test_baseline_errors():
    train = location_embeddings(50)
    with pytest.raises(ValueError, match="'regression', 'classification', 'most_common_cell'"):
        train_baseline("knn", train)
    m = train_baseline("most_common_cell", train)
    with pytest.raises(ValueError, match=r"\[B, 32\]"):
        m.predict(torch.zeros(3, 5))
