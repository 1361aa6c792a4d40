"""Task tests through `.fn()` (no Prefect run context): train, resume, evaluate, report (tiny preset)."""

from __future__ import annotations

import pytest

from locdiff.flows.tasks import evaluate_task, report_task, train_task
from locdiff.stages import EvalSpec, ReportSpec, TrainSpec
from locdiff.storage import Store
from tests.flows.conftest import run_inputs, tiny_config

TINY = tiny_config(max_steps=60, checkpoint_every=20, log_every=20)


@pytest.fixture(scope="module")
def run_key(store_uri, embeddings_key):
    return train_task.fn(
        store_uri, TrainSpec(embeddings_key, TINY, **run_inputs(store_uri, embeddings_key, TINY))
    )


def test_train_commits_run_with_checkpoint_and_curves(store_uri, run_key):
    store = Store.from_uri(store_uri)
    man = store.manifest(run_key)
    assert man["final_step"] == 60 and man["start_step"] == 0
    assert {"model.pt", "curves.parquet"} <= set(store.files(run_key))
    # the periodic checkpoints are parts of the run too
    assert [f for f in store.files(run_key) if f.startswith("checkpoints/")] == [
        "checkpoints/step-000000020.pt",
        "checkpoints/step-000000040.pt",
    ]


def test_train_reuses_committed_run(store_uri, embeddings_key, run_key):
    store = Store.from_uri(store_uri)
    created = store.manifest(run_key)["created_at"]
    assert (
        train_task.fn(
            store_uri, TrainSpec(embeddings_key, TINY, **run_inputs(store_uri, embeddings_key, TINY))
        )
        == run_key
    )
    assert store.manifest(run_key)["created_at"] == created


def test_train_resumes_from_last_checkpoint_after_a_crash(store_uri, embeddings_key):
    cfg = tiny_config(max_steps=50, checkpoint_every=10, log_every=10, seed=3)
    inputs = run_inputs(store_uri, embeddings_key, cfg)
    with pytest.raises(RuntimeError, match="stopped at step 30"):
        train_task.fn(store_uri, TrainSpec(embeddings_key, cfg, **inputs, stop_after_steps=30))
    key = train_task.fn(store_uri, TrainSpec(embeddings_key, cfg, **inputs))
    man = Store.from_uri(store_uri).manifest(key)
    assert man["start_step"] == 30  # resumed, not restarted
    assert man["final_step"] == 50


def test_bad_override_is_a_user_error():
    from locdiff.errors import UserError

    with pytest.raises(UserError, match="invalid training config"):
        tiny_config(max_stepz=1)


def test_evaluate_and_report(store_uri, embeddings_key, run_key, monkeypatch):
    from locdiff import inference
    from locdiff.catalog import connect

    devices, load = [], inference.load_predictor
    monkeypatch.setattr(inference, "load_predictor", lambda *a, **k: devices.append(a[2]) or load(*a, **k))
    spec = EvalSpec(run_key, embeddings_key, "test", "synthetic", ["most-common-region"], device="cpu")
    eval_key = evaluate_task.fn(store_uri, spec)
    assert devices == ["cpu"]  # the task's device reaches the predictor
    store = Store.from_uri(store_uri)
    metrics = store.manifest(eval_key)["metrics"]
    assert set(metrics) == {"locdiff", "most-common-region"}
    assert metrics["locdiff"]["n"] == metrics["most-common-region"]["n"] == 64
    con = connect(store)
    rows = con.execute("SELECT method, n FROM metrics WHERE key = ? ORDER BY method", [eval_key]).fetchall()
    assert [r[0] for r in rows] == ["locdiff", "most-common-region"]
    n_pred = con.execute("SELECT count(*) FROM predictions WHERE key = ?", [eval_key]).fetchone()[0]
    assert n_pred == 2 * 64

    out = report_task.fn(store_uri, ReportSpec([eval_key], "unit report", ["a note"]))
    files = store.files(out["key"])
    assert {"report.md", "metrics.json", "map-synthetic.png", "cdf-synthetic.png"} <= set(files)
    with store.open(out["key"], "map-synthetic.png") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = store.open(out["key"], "report.md").read().decode()
    assert "| synthetic | locdiff |" in md and "a note" in md
    assert "locdiff" in out["text_table"] and "most-common-region" in out["text_table"]
