"""Lineage: every artifact a pipeline run builds lies in the transitive upstream of that run's report,
checked through the DuckDB catalog (the `artifacts` view), for train-mp16 and evaluate-latest."""

from __future__ import annotations

import json

import pytest

from locdiff.storage import Store

pytestmark = pytest.mark.slow


def _closure(con, root: str) -> set[str]:
    """`root` and every key reachable through `upstream` in the catalog."""
    up = {
        k: json.loads(u) if isinstance(u, str) else list(u or [])
        for k, u in con.execute("SELECT key, upstream FROM artifacts").fetchall()
    }
    seen, todo = set(), [root]
    while todo:
        k = todo.pop()
        if k not in seen:
            seen.add(k)
            todo.extend(up.get(k, []))
    return seen


def _stages(keys) -> set[str]:
    return {k.split("/", 1)[0] for k in keys}


def test_every_built_artifact_is_in_the_reports_lineage(prefect_harness, tmp_path):
    from locdiff.catalog import connect
    from locdiff.flows.evaluate_latest import evaluate_latest
    from locdiff.flows.train_mp16 import train_mp16

    storage = "file://" + str(tmp_path / "store")
    out = train_mp16(
        dataset="bluemarble",
        encoder="efficientnet-lite0",
        preset="tiny",
        # SHDD-KL on, so the run reads both anchor sets (uniform for the decoder and the loss, data
        # for the loss); the target cache is the default x0 source
        overrides={"loss": {"kind": "mse+kl"}, "train": {"max_steps": 30, "log_every": 10}},
        dataset_options={"n": 160, "shard_size": 80},
        eval_datasets=[],
        baselines=["most-common-region"],
        storage=storage,
    )
    store = Store.from_uri(storage)
    con = connect(store)
    built = {k for (k,) in con.execute("SELECT key FROM artifacts").fetchall()}
    assert _stages(built) == {"datasets", "embeddings", "targets", "anchors", "runs", "eval", "reports"}
    assert built == _closure(con, out["report"]["key"])  # nothing built that the report does not rest on

    run = store.manifest(out["run"])
    assert set(run["upstream"]) == {out["embeddings"], out["targets"], *out["anchors"].values()}
    assert set(out["anchors"]) == {"uniform", "data"}
    assert run["anchors"] == out["anchors"] and run["targets"] == out["targets"]
    (eval_key,) = out["evaluations"]
    assert out["anchors"]["uniform"] in store.manifest(eval_key)["upstream"]  # the decoder's grid

    # the nightly flow on the same store: its report's lineage covers what it added
    nightly = evaluate_latest(datasets=["bluemarble"], run_key=out["run"], storage=storage)
    con = connect(store)
    after = {k for (k,) in con.execute("SELECT key FROM artifacts").fetchall()}
    added = after - built
    assert _stages(added) == {"eval", "reports"}
    assert added <= _closure(con, nightly["report"]["key"])
    assert out["run"] in _closure(con, nightly["report"]["key"])


def test_per_batch_targets_build_no_cache(prefect_harness, tmp_path):
    from locdiff.flows.train_mp16 import train_mp16

    storage = "file://" + str(tmp_path / "store")
    out = train_mp16(
        dataset="bluemarble",
        encoder="efficientnet-lite0",
        preset="tiny",
        overrides={"train": {"max_steps": 10, "log_every": 10, "targets": "per_batch"}},
        dataset_options={"n": 160, "shard_size": 80},
        eval_datasets=[],
        baselines=[],
        storage=storage,
    )
    store = Store.from_uri(storage)
    assert out["targets"] is None and store.list("targets") == []
    assert set(out["anchors"]) == {"uniform"}  # plain MSE: the data anchor set is not built either
    assert not any(k.startswith("targets/") for k in store.manifest(out["run"])["upstream"])
