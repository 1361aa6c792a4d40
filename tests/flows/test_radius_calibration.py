"""The radius scales and the mode-mass map fitted on val travel with the run: training stores them in
the run's manifest, and load_predictor (what predict, serve and evaluation share) applies them."""

from __future__ import annotations

import numpy as np

from locdiff.embedstore import iter_embeddings
from locdiff.inference import load_predictor, predict_embeddings
from locdiff.stages.runs import train_run
from locdiff.storage import Store
from locdiff_core.metrics import apply_mass_calibration
from tests.flows.conftest import run_inputs, tiny_config

CFG = tiny_config(max_steps=30, log_every=10, seed=11)


def test_a_run_with_val_carries_its_radius_scales_into_predictions(store_uri, embeddings_key, monkeypatch):
    import locdiff.stages.evals as evals

    monkeypatch.setattr(evals, "MASS_CALIBRATION_MIN_ROWS", 64)  # this val split's size
    store = Store.from_uri(store_uri)
    key = train_run(store, embeddings_key, CFG, **run_inputs(store_uri, embeddings_key, CFG))
    cal = store.manifest(key)["radius_calibration"]
    s50, s90 = cal["radius50_scale"], cal["radius90_scale"]
    assert cal["val_n"] == 64 and s50 > 0 and s90 > 0 and (s50, s90) != (1.0, 1.0)
    assert 0 <= cal["val_coverage50_raw"] <= 1

    _, emb, _, _ = next(iter_embeddings(store, embeddings_key, "test", 40)[1])
    raw = predict_embeddings(load_predictor(store, key, "cpu", calibrated=False), emb, seed=5)
    cal_pred = load_predictor(store, key, "cpu")
    assert (cal_pred.config.infer.radius50_scale, cal_pred.config.infer.radius90_scale) == (s50, s90)
    out = predict_embeddings(cal_pred, emb, seed=5)
    np.testing.assert_allclose(out["radius50_km"], raw["radius50_km"] * s50, rtol=1e-5)
    # (scaled apart, a 90 % radius below its 50 % one is raised to it)
    want90 = np.maximum(raw["radius90_km"] * s90, raw["radius50_km"] * s50)
    np.testing.assert_allclose(out["radius90_km"], want90, rtol=1e-5)
    np.testing.assert_array_equal(out["pred_lat"], raw["pred_lat"])  # the point estimate does not change

    # the mode-mass map fitted on val travels the same way
    knots = cal["mass_calibration"]
    assert knots and all(0 <= x <= 1 and 0 <= y <= 1 for x, y in knots)
    assert [k[1] for k in knots] == sorted(k[1] for k in knots)  # monotone
    assert cal_pred.config.infer.mass_calibration == tuple(map(tuple, knots))
    np.testing.assert_allclose(out["modes_mass"], apply_mass_calibration(raw["modes_mass"], knots))
    assert np.nansum(out["modes_mass"], axis=1).max() <= 1 + 1e-9
    # below the minimum val size no map is fitted: the masses stay the decoder's
    monkeypatch.setattr(evals, "MASS_CALIBRATION_MIN_ROWS", 65)
    assert evals._val_calibration(store, cal_pred, embeddings_key, seed=0)["mass_calibration"] == []
