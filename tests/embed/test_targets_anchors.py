"""SHDD target cache and anchor-set artifacts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from locdiff.datasets.bluemarble import build_bluemarble, gallery_coordinates, is_land
from locdiff.datasets.shards import read_manifest
from locdiff.embedstore import load_embeddings
from locdiff.encoders import load_encoder
from locdiff.stages.anchors import build_anchor_set, land_lattice, load_anchor_set
from locdiff.stages.embeddings import embed_dataset
from locdiff.stages.targets import build_targets, load_targets, targets_for
from locdiff.storage import Store
from locdiff_core.shdd import SHDD
from locdiff_core.sphere import EARTH_RADIUS_KM


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    store = Store.from_uri(str(tmp_path_factory.mktemp("targets") / "store"))
    dkey = build_bluemarble(store, n=24, seed=2, size_px=32, shard_size=10)
    ekey = embed_dataset(store, dkey, batch_size=8, num_workers=0, encoder=load_encoder(image_size=32))
    return store, dkey, ekey


def test_target_cache_matches_on_the_fly_codes_in_embedding_order(embedded):
    store, _, ekey = embedded
    key = build_targets(store, ekey, max_degree=8)
    assert store.manifest(key)["dim"] == 81 and store.manifest(key)["rows"] == 24
    ids, codes = load_targets(store, key)
    e_ids, _, lat, lon = load_embeddings(store, ekey)
    assert ids == e_ids
    want = SHDD(8).encode(lat, lon).float()
    torch.testing.assert_close(codes, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(targets_for(lat, lon, 8, torch.float64).float(), want)
    # clean codes have norm (L+1)/sqrt(4 pi)
    torch.testing.assert_close(
        codes.norm(dim=1), torch.full((24,), 9 / np.sqrt(4 * np.pi)), atol=1e-4, rtol=0
    )
    t_ids, t_codes = load_targets(store, key, split="test")
    assert set(t_ids) == set(load_embeddings(store, ekey, split="test")[0]) and t_codes.shape == (
        len(t_ids),
        81,
    )
    assert build_targets(store, ekey, max_degree=8) == key  # cached
    assert build_targets(store, ekey, max_degree=9) != key
    with pytest.raises(ValueError, match="dtype"):
        build_targets(store, ekey, max_degree=8, dtype="int8")


def test_uniform_anchor_set_is_the_fibonacci_lattice(tmp_path):
    store = Store.from_uri(str(tmp_path))
    key = build_anchor_set(store, "uniform", n=10_000)
    lat, lon = load_anchor_set(store, key)
    assert lat.shape == (10_000,) and store.manifest(key)["kind"] == "uniform"
    # equal-area: a quarter of the points lies above 30°N (sin 30° = 0.5 -> (1 - 0.5) / 2)
    assert abs((lat > 30).double().mean().item() - 0.25) < 0.01
    assert build_anchor_set(store, "uniform", n=10_000) == key
    with pytest.raises(ValueError, match="kind must be one of"):
        build_anchor_set(store, "ocean", n=10)
    with pytest.raises(ValueError, match="count"):
        build_anchor_set(store, "uniform", n=0)


def test_land_anchor_set_is_on_land_and_spread(tmp_path):
    store = Store.from_uri(str(tmp_path))
    key = build_anchor_set(store, "land", n=20_000, seed=1)
    lat, lon = load_anchor_set(store, key)
    assert lat.shape == (20_000,)
    assert is_land(lat.numpy(), lon.numpy()).all()
    assert lat.min() < -70 and lat.max() > 70  # Antarctica to the Arctic islands
    a, b = land_lattice(1000, seed=1), land_lattice(1000, seed=1)
    np.testing.assert_array_equal(a[0], b[0])


def test_data_anchor_sets_follow_the_data(tmp_path, embedded):
    store, dkey, _ = embedded
    key = build_anchor_set(store, "data", n=50, dataset_key=dkey, seed=0)
    lat, lon = load_anchor_set(store, key)
    train = read_manifest(store, dkey).to_pandas().query("split == 'train'")
    pairs = set(zip(train["lat"].round(9), train["lon"].round(9), strict=True))
    assert all((round(a, 9), round(b, 9)) in pairs for a, b in zip(lat.tolist(), lon.tolist(), strict=True))
    assert store.manifest(key)["upstream"] == [dkey]
    # without a dataset: the MP16 gallery
    gkey = build_anchor_set(store, "data", n=10_000, seed=3)
    g_lat, g_lon = load_anchor_set(store, gkey)
    all_lat, _ = gallery_coordinates()
    assert np.isin(g_lat.numpy(), all_lat).all()
    # the gallery is city-clustered: anchors sit much closer to each other than a uniform set would
    from locdiff.datasets.bluemarble import min_distance_km

    nn_km = min_distance_km(
        g_lat[:500].numpy(), g_lon[:500].numpy(), g_lat[500:].numpy(), g_lon[500:].numpy()
    )
    assert np.median(nn_km) < 0.2 * np.sqrt(4 * np.pi / 10_000) * EARTH_RADIUS_KM


def test_target_cache_built_in_blocks_equals_one_pass(embedded, monkeypatch):
    import locdiff.stages.targets as targets

    store, _, ekey = embedded
    monkeypatch.setattr(targets, "BLOCK_ROWS", 3)  # parts of 10 rows: blocks of 3, 3, 3, 1
    ids, codes = load_targets(store, build_targets(store, ekey, max_degree=7))
    _, _, lat, lon = load_embeddings(store, ekey)
    assert ids == load_embeddings(store, ekey)[0]
    torch.testing.assert_close(codes, targets_for(lat, lon, 7, torch.float64).float())
