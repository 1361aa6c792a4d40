"""`locdiff predict --hybrid`: credible radii and LocDiff-H for image files, gallery = the run's training
split (the retrieval index is built once and reused)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from locdiff.storage import Store

pytestmark = pytest.mark.slow


def test_predict_images_hybrid_prints_radii_and_locdiff_h(tmp_path, monkeypatch):
    from locdiff.datasets.bluemarble import build_bluemarble, crop_tile, encode_jpeg, load_bluemarble
    from locdiff.stages.embeddings import embed_dataset
    from locdiff.stages.runs import resolve_config, train_run

    storage = "file://" + str(tmp_path / "store")
    monkeypatch.setenv("LOCDIFF_STORAGE", storage)
    store = Store.from_uri(storage)
    emb_key = embed_dataset(store, build_bluemarble(store, n=60, seed=4), "efficientnet-lite0")
    config = resolve_config(
        "tiny",
        {"train": {"max_steps": 5, "log_every": 5, "eval_every": 0, "targets": "per_batch"}},
        embed_dim=int(store.manifest(emb_key)["dim"]),
    )
    train_run(store, emb_key, config, name="predict-hybrid", preset="tiny")
    img = tmp_path / "tile.jpg"
    img.write_bytes(encode_jpeg(crop_tile(load_bluemarble(), 45.0, 7.0, 4.0, 64)))

    (r,) = _predict(img, storage, hybrid=True)
    assert 0 <= r["radius50_km"] <= r["radius90_km"]
    assert -90 <= r["hybrid_lat"] <= 90 and -180 <= r["hybrid_lon"] <= 180
    assert len(store.list("retrieval")) == 1  # the run's gallery index, built once
    (plain,) = _predict(img, storage)
    assert "hybrid_lat" not in plain and plain["radius90_km"] == r["radius90_km"]

    env = {**os.environ, "LOCDIFF_STORAGE": storage, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "locdiff.cli", "predict", str(img), "--hybrid", "--no-progress"]
    out = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "credible radii: 50 % within" in out and "LocDiff-H:" in out
    assert len(store.list("retrieval")) == 1  # reused


def _predict(img, storage: str, hybrid: bool = False) -> list[dict]:
    from locdiff.inference import Item, as_result, load_model, predict_batches

    model = load_model(None, storage, hybrid=hybrid)
    return [as_result(r) for rows in predict_batches([Item(img.name, str(img))], model) for r in rows]
