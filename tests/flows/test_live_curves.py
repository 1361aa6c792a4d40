"""Training progress while it runs: the curves so far answer `locdiff sql ... FROM curves` (in_flight),
and the train task keeps one Prefect markdown artifact with the chart, refreshed in place."""

from __future__ import annotations

import asyncio
import copy

import pytest
from prefect import flow

from locdiff.catalog import connect
from locdiff.curves import LIVE_CURVES, chart_png, live_every
from locdiff.stages.runs import LiveWatcher, run_key, train_run
from locdiff.storage import Store
from tests.flows.conftest import run_inputs, tiny_config

# validation every 10 steps, a logged row every 5: the in-flight curves are refreshed every 10 steps
LIVE = tiny_config(
    max_steps=40, log_every=5, eval_every=10, eval_size=32, eval_samples=4, checkpoint_every=20
)


def _in_flight(store: Store) -> list[tuple]:
    sql = (
        "SELECT key, max(step), count(DISTINCT metric), bool_and(in_flight) FROM curves "
        "WHERE in_flight GROUP BY key"
    )
    return connect(store).execute(sql).fetchall()


def test_live_every_follows_the_log_and_eval_cadence():
    assert live_every(LIVE.train) == 10  # validation comes first
    assert live_every(tiny_config(log_every=20, eval_every=0).train) == 200  # every 10th logged row
    assert live_every(tiny_config(log_every=100, eval_every=5000).train) == 1000
    assert live_every(tiny_config(log_every=0).train) == 0


def test_curves_view_answers_for_a_run_in_flight(tmp_path, embeddings_key, store_uri):
    store = Store.from_uri(store_uri)
    seen: list[tuple[int, list]] = []

    seen_curves: list[dict] = []

    def on_curves(key, curves):  # while training: query the catalog as `locdiff sql` would
        seen.append((curves["train"][-1]["step"], _in_flight(store)))
        seen_curves.append(copy.deepcopy(curves))

    inputs = run_inputs(store_uri, embeddings_key, LIVE)
    with pytest.raises(RuntimeError, match="stopped at step 20"):
        train_run(store, embeddings_key, LIVE, **inputs, stop_after_steps=20, on_curves=on_curves)
    # refreshed at steps 10 and 20 (after the train row and again after the validation of each)
    assert [s for s, _ in seen] == [10, 10, 20, 20]
    key = seen[-1][1][0][0]
    assert not store.exists(key)
    (k0, step0, n0, flying), (_, _, n1, _) = seen[0][1][0], seen[1][1][0]
    assert (k0, step0, flying) == (key, 10, True) and n1 > n0  # then the validation's metrics join
    assert seen[-1][1][0][1] == 20
    # the killed attempt's curves stay queryable; their metrics are those of a committed run
    metrics = {
        m for (m,) in connect(store).execute("SELECT DISTINCT metric FROM curves WHERE in_flight").fetchall()
    }
    assert {"train/loss", "train/lr", "train/samples_per_s", "val/median_km"} <= metrics

    # a launcher (locdiff.ddp) reads the same curves back from the store, once per change
    assert run_key(store, embeddings_key, LIVE, **inputs) == key
    got = []
    watcher = LiveWatcher(store, key, lambda k, c: got.append(c))
    assert watcher.poll(force=True) and not watcher.poll(force=True)
    assert got == [seen_curves[-1]]

    # resumed to the end and committed: the curves are the committed ones, nothing in flight
    seen.clear()
    assert train_run(store, embeddings_key, LIVE, **inputs, on_curves=on_curves) == key
    assert [s for s, _ in seen] == [30, 30, 40, 40]
    assert seen[0][1][0][1] == 30  # the resumed attempt's curves start from the checkpoint's
    con = connect(store)
    rows = con.execute(
        "SELECT in_flight, max(step), count(*) FROM curves WHERE key = ? GROUP BY in_flight", [key]
    ).fetchall()
    assert len(rows) == 1 and rows[0][0] is False and rows[0][1] == 40
    assert _in_flight(store) == [] and store.read_live(key, LIVE_CURVES) is None


def test_chart_is_a_png_with_four_panels():
    curves = {
        "train": [
            {"step": s, "loss": 2.0 / s, "mse": 1.0 / s, "kl": 1.0 / s, "lr": 1e-3, "samples_per_s": 900.0}
            for s in range(5, 45, 5)
        ],
        "val": [{"step": 20, "median_km": 900.0}, {"step": 40, "median_km": 700.0}],
    }
    png = chart_png(curves, "runs/x/0123456789abcdef")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _markdown_artifacts(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as c:
            return await c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    return asyncio.run(read())


@pytest.mark.slow
def test_train_task_refreshes_one_chart_artifact_in_place(prefect_harness, store_uri, embeddings_key):
    from locdiff.flows.tasks import train_task
    from locdiff.stages import TrainSpec

    cfg = tiny_config(max_steps=40, log_every=5, eval_every=20, eval_size=32, eval_samples=4, seed=7)

    @flow
    def train_flow():
        inputs = run_inputs(store_uri, embeddings_key, cfg)
        return train_task(store_uri, TrainSpec(embeddings_key, cfg, **inputs, name="live"))

    train_flow()
    found = _markdown_artifacts("training-live")
    assert len(found) == 1, "one artifact, updated in place (not one version per refresh)"
    md = found[0].data
    assert "step **40 / 40**" in md and "val median" in md and "ETA 0m00s" in md
    assert "![training curves](data:image/png;base64," in md
