"""The embedded Blue Marble sample: land mask, cropping (antimeridian, poles), splits, the artifact."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from locdiff.datasets import bluemarble as bm
from locdiff.datasets.shards import read_image, read_manifest
from locdiff.storage import Store


def test_land_mask_knows_continents_and_oceans():
    # Sahara, Amazon, Siberia, Antarctic plateau vs mid-Atlantic, mid-Pacific, Southern Ocean, North Pole
    land = bm.is_land([23.0, -5.0, 62.0, -80.0], [10.0, -62.0, 100.0, 30.0])
    sea = bm.is_land([0.0, 0.0, -55.0, 89.9], [-30.0, -150.0, 100.0, 0.0])
    assert land.all() and not sea.any()
    # longitudes outside [-180, 180) wrap
    assert bm.is_land([23.0], [370.0])[0] == bm.is_land([23.0], [10.0])[0]
    # about 29 % of the Earth's surface is land
    assert 0.26 < bm.land_mask().land_fraction() < 0.31
    with pytest.raises(ValueError, match="lat_deg"):
        bm.is_land([91.0], [0.0])


def test_crop_matches_direct_pixels_away_from_edges():
    img = bm.load_bluemarble()
    # a tile of exactly 30 x 30 source pixels resampled to 30 px is the source block itself
    lat0, lon0 = 45.0, 10.0  # 2° box -> rows (90-46)*15 .. +30, cols (190-1)*15 .. +30
    tile = bm.crop_tile(img, lat0, lon0, 2.0, 30)
    r, c = int((90 - 46) * 15), int((180 + 9) * 15)
    np.testing.assert_array_equal(tile, img[r : r + 30, c : c + 30])


def test_crop_wraps_the_antimeridian():
    img = bm.load_bluemarble()
    a = bm.crop_tile(img, -17.0, 180.0, 4.0, 64)
    b = bm.crop_tile(img, -17.0, -180.0, 4.0, 64)
    np.testing.assert_array_equal(a, b)
    # the western half of a tile centred on 180° is the eastern edge of the image
    half = bm.crop_tile(img, -17.0, 179.0, 2.0, 30)
    r = int((90 - (-16.0)) * 15)
    np.testing.assert_array_equal(half, img[r : r + 30, -30:])


def test_crop_continues_over_the_pole():
    img = bm.load_bluemarble()
    a = bm.crop_tile(img, 89.0, 0.0, 4.0, 64)  # covers lat 87..91: the top quarter lies beyond the pole
    b = bm.crop_tile(img, 89.0, 180.0, 4.0, 64)  # lat 89..90 at lon 180 is what lies beyond it
    np.testing.assert_array_equal(a[:16], b[16:32][::-1])
    assert np.abs(a[:16].astype(int) - b[:16].astype(int)).mean() > 0  # not trivially equal
    assert bm.crop_tile(img, -90.0, 0.0, 4.0, 32).shape == (32, 32, 3)


def test_splits_are_deterministic_and_honest():
    s1 = bm.make_splits(n=400, seed=3)
    s2 = bm.make_splits(n=400, seed=3)
    s3 = bm.make_splits(n=400, seed=4)
    for k in s1:
        np.testing.assert_array_equal(s1[k][0], s2[k][0])
    assert not np.array_equal(s1["train"][0], s3["train"][0])
    counts = {k: len(v[0]) for k, v in s1.items()}
    assert counts == bm.split_counts(400, bm.DEFAULT_SPLITS) and sum(counts.values()) == 400
    tr_lat, tr_lon = s1["train"][0], s1["train"][1]
    for held in ("test", "val", "test_uniform"):
        assert bm.min_distance_km(s1[held][0], s1[held][1], tr_lat, tr_lon).min() >= 100.0
    assert bm.is_land(s1["test_uniform"][0], s1["test_uniform"][1]).all()
    # the random split is drawn from the train pool and is NOT buffered: it sits close to train points
    d_random = bm.min_distance_km(s1["test_random"][0], s1["test_random"][1], tr_lat, tr_lon)
    assert np.median(d_random) < 100.0
    with pytest.raises(ValueError, match="unknown split"):
        bm.make_splits(n=10, splits={"train": 1.0, "holdout": 0.1})


def test_build_bluemarble_artifact(tmp_path):
    store = Store.from_uri(str(tmp_path / "store"))
    key = bm.build_bluemarble(store, n=40, seed=1, size_px=64, shard_size=16)
    assert store.exists(key)
    man = store.manifest(key)
    assert man["rows"] == 40 and man["n_shards"] == 3 and man["n_skipped"] == 0
    table = read_manifest(store, key).to_pandas()
    assert set(table["split"]) == set(bm.KNOWN_SPLITS)
    assert table["image_id"].is_unique
    row = table.iloc[7]
    data = read_image(store, key, row["shard"], row["offset"], row["size"])
    with Image.open(io.BytesIO(data)) as im:
        got = np.asarray(im.convert("RGB")).astype(int)
    want = bm.crop_tile(bm.load_bluemarble(), row["lat"], row["lon"], 4.0, 64).astype(int)
    assert got.shape == (64, 64, 3) and np.abs(got - want).mean() < 4  # JPEG q=90 of the same tile
    # same config -> same key, reused; another seed -> another key
    assert bm.build_bluemarble(store, n=40, seed=1, size_px=64, shard_size=16) == key
    assert bm.bluemarble_key(store, n=40, seed=2, size_px=64, shard_size=16) != key
