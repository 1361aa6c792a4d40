"""Flow tests under one shared `prefect_test_harness`: caching, artifacts, nightly skipping."""

from __future__ import annotations

import asyncio

import pytest
from prefect import flow

from locdiff.flows.tasks import train_task
from locdiff.stages import EvalSpec, ReportSpec, TrainSpec
from locdiff.storage import Store
from tests.flows.conftest import run_inputs, tiny_config

pytestmark = pytest.mark.slow

TINY = tiny_config(max_steps=40, log_every=20)


def _artifacts(flow_run_id=None):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    async def read():
        async with get_client() as c:
            return await c.read_artifacts(
                artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["table", "markdown"]))
            )

    return asyncio.run(read())


def test_same_inputs_reuse_the_finished_stage(prefect_harness, store_uri, embeddings_key):
    @flow
    def twice():
        inputs = run_inputs(store_uri, embeddings_key, TINY)
        a = train_task(store_uri, TrainSpec(embeddings_key, TINY, **inputs), return_state=True)
        b = train_task(store_uri, TrainSpec(embeddings_key, TINY, **inputs), return_state=True)
        return a, b

    a, b = twice()
    assert a.is_completed() and b.is_completed()
    assert not a.name == "Cached"
    assert b.name == "Cached"
    assert a.result() == b.result()


def test_stage_flows_publish_metrics_and_report(prefect_harness, store_uri, embeddings_key):
    from locdiff.flows.stages import evaluate_flow, report_flow, train_flow

    spec = TrainSpec(embeddings_key, TINY, **run_inputs(store_uri, embeddings_key, TINY))
    run_key = train_flow(storage=store_uri, spec=spec)
    spec = EvalSpec(run_key, embeddings_key, "test", "im2gps3k", baselines=["most-common-region"])
    eval_key = evaluate_flow(storage=store_uri, spec=spec)
    out = report_flow(storage=store_uri, spec=ReportSpec([eval_key], title="flow test"))
    # published figures sit beside ours for a standard benchmark name
    assert any(
        r["source"].startswith("as published") and r["method"] == "LocDiff (paper)" for r in out["rows"]
    )
    keys = {a.key for a in _artifacts()}
    assert {"flow-test-metrics", "flow-test-report"} <= keys
    Store.from_uri(store_uri).manifest(out["key"])  # committed


def test_nightly_skips_absent_datasets_with_a_note(prefect_harness, store_uri, embeddings_key):
    from locdiff.flows.evaluate_latest import evaluate_latest
    from locdiff.flows.stages import train_flow

    spec = TrainSpec(embeddings_key, TINY, **run_inputs(store_uri, embeddings_key, TINY))
    run_key = train_flow(storage=store_uri, spec=spec)
    out = evaluate_latest(datasets=["yfcc26k", "gws15k"], run_key=run_key, storage=store_uri)
    assert out["evaluations"] == []
    assert [n.split(":")[0] for n in out["notes"]] == ["yfcc26k", "gws15k"]
    assert all("not present locally" in n for n in out["notes"])


def test_a_cached_key_whose_artifact_is_gone_is_built_again(prefect_harness, tmp_path):
    """The Prefect result cache outlives a wiped store: the subflow must not hand on a dangling key."""
    from locdiff.flows.stages import anchors_flow
    from locdiff.flows.tasks import anchors_task
    from locdiff.stages import AnchorsSpec

    uri = "file://" + str(tmp_path / "store")
    spec = AnchorsSpec("uniform", 321)
    key = anchors_flow(storage=uri, spec=spec)
    store = Store.from_uri(uri)

    @flow
    def cached_state():
        return anchors_task(storage=uri, spec=spec, return_state=True)

    assert cached_state().name == "Cached"  # the same inputs hit Prefect's cache
    store.delete(key)
    assert not store.exists(key)
    assert anchors_flow(storage=uri, spec=spec) == key
    assert store.exists(key)  # rebuilt, not the dangling cached key
