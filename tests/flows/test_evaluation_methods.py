"""Evaluation with a retrieval index: LocDiff, LocDiff-H, retrieval 1-NN and most-common-region side by
side (metrics rows, catalog, report with GeoScore), credible radii with their coverage (raw and
calibrated on `val`), and the index in the evaluation's lineage."""

from __future__ import annotations

import numpy as np
import pytest

from locdiff.flows.tasks import evaluate_task, report_task, retrieval_task, train_task
from locdiff.stages import EvalSpec, ReportSpec, RetrievalSpec, TrainSpec
from locdiff.storage import Store
from tests.flows.conftest import run_inputs, tiny_config

TINY = tiny_config(max_steps=40, log_every=20)
METHODS = ["classification", "locdiff", "locdiff-h", "most-common-region", "regression", "retrieval-1nn"]
BASELINES = ["most-common-region", "regression", "classification"]


@pytest.fixture(scope="module")
def run_key(store_uri, embeddings_key):
    return train_task.fn(
        store_uri, TrainSpec(embeddings_key, TINY, **run_inputs(store_uri, embeddings_key, TINY))
    )


def test_retrieval_index_is_the_normalised_training_split(store_uri, embeddings_key):
    from locdiff.embedstore import load_embeddings
    from locdiff.stages.retrieval import load_index
    from locdiff_core.retrieval import normalize_rows

    store = Store.from_uri(store_uri)
    key = retrieval_task.fn(store_uri, RetrievalSpec(embeddings_key))
    assert retrieval_task.fn(store_uri, RetrievalSpec(embeddings_key)) == key  # content-addressed: reused
    assert store.manifest(key)["upstream"] == [embeddings_key]
    index = load_index(store, key)
    _, emb, lat, _ = load_embeddings(store, embeddings_key, "train")
    assert len(index) == len(lat) and np.allclose(index.lat_deg.numpy(), lat.numpy())
    assert isinstance(index.emb, np.memmap)  # mapped, never loaded whole
    # streamed block by block, the gallery is exactly the whole split normalised in float32, then float16
    want = normalize_rows(emb).numpy().astype(np.float16)
    assert index.emb.dtype == np.float16 and np.array_equal(np.asarray(index.emb), want)
    # a training image finds itself first
    sim, idx = index.search(emb[:5].numpy(), 3)
    assert idx[:, 0].tolist() == list(range(5)) and (sim[:, 0] > 0.99).all()


def test_methods_side_by_side_with_credible_radii(store_uri, embeddings_key, run_key):
    from locdiff.catalog import connect

    store = Store.from_uri(store_uri)
    index_key = retrieval_task.fn(store_uri, RetrievalSpec(embeddings_key))
    spec = EvalSpec(run_key, embeddings_key, "test", "synthetic", BASELINES, index_key)
    eval_key = evaluate_task.fn(store_uri, spec)
    man = store.manifest(eval_key)
    assert index_key in man["upstream"]  # lineage: the evaluation rests on the index
    metrics = man["metrics"]
    assert sorted(metrics) == METHODS
    loc = metrics["locdiff"]
    assert 0 <= loc["coverage50"] <= loc["coverage90"] <= 1
    assert 0 <= loc["coverage50_cal"] <= loc["coverage90_cal"] <= 1
    cal = man["calibration"]
    assert cal["radius50_scale"] > 0 and cal["radius90_scale"] > 0 and cal["val_n"] == 64
    # every baseline trained from the memory-mapped split (issue 24): real predictions, not a constant
    for kind in ("regression", "classification"):
        assert metrics[kind]["n"] == 64 and metrics[kind]["median_km"] > 0
    # mode-mass reliability: bins of mode1_mass against "truth in mode 1's basin"
    rel = man["mass_reliability"]["locdiff"]
    assert sum(b["n"] for b in rel["bins"]) == 64 and rel["basin_km"] > 0
    assert all(0 <= b["mean_mass"] <= 1 and 0 <= b["hit_rate"] <= 1 for b in rel["bins"])
    assert 0 <= loc["mass_ece"] <= 1

    con = connect(store)
    rows = con.execute(
        "SELECT method, geoscore, acc_25km, median_km FROM metrics WHERE key = ? ORDER BY method", [eval_key]
    ).fetchall()
    assert [r[0] for r in rows] == METHODS and all(r[1] is not None for r in rows)
    r50, r90, d = (
        con.execute(
            "SELECT radius50_km, radius90_km, distance_km FROM predictions "
            "WHERE key = ? AND method = 'locdiff'",
            [eval_key],
        )
        .fetchnumpy()
        .values()
    )
    assert len(r50) == 64 and (r50 <= r90).all() and (r50 >= 0).all()
    assert loc["coverage90"] == pytest.approx(float(np.mean(d <= r90)))
    # LocDiff-H answers are either LocDiff's own or a training image's location
    h = con.execute(
        "SELECT h.pred_lat, l.pred_lat FROM predictions h JOIN predictions l USING (key, image_id) "
        "WHERE h.key = ? AND h.method = 'locdiff-h' AND l.method = 'locdiff'",
        [eval_key],
    ).fetchall()
    train_lats = set(
        np.round(con.execute("SELECT lat FROM embeddings WHERE split = 'train'").fetchnumpy()["lat"], 9)
    )
    assert all(a == b or round(a, 9) in train_lats for a, b in h)

    out = report_task.fn(store_uri, ReportSpec([eval_key], "methods report", []))
    assert "reliability-synthetic.png" in store.files(out["key"])
    md = store.open(out["key"], "report.md").read().decode()
    assert "GeoScore" in md and "| synthetic | locdiff-h |" in md and "calibrated" in md
    assert "Mode-mass reliability on synthetic" in md and "| mode1_mass bin |" in md
    assert [r["method"] for r in out["rows"]][:4] == [
        "locdiff",
        "locdiff-h",
        "retrieval-1nn",
        "most-common-region",
    ]
