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
    assert _stages(built) == {
        "datasets",
        "embeddings",
        "targets",
        "anchors",
        "runs",
        "retrieval",
        "eval",
        "reports",
    }
    assert built == _closure(con, out["report"]["key"])  # nothing built that the report does not rest on

    run = store.manifest(out["run"])
    assert set(run["upstream"]) == {out["embeddings"], out["targets"], *out["anchors"].values()}
    assert set(out["anchors"]) == {"uniform", "data"}
    assert run["anchors"] == out["anchors"] and run["targets"] == out["targets"]
    (eval_key,) = out["evaluations"]
    assert out["anchors"]["uniform"] in store.manifest(eval_key)["upstream"]  # the decoder's grid
    assert out["retrieval"] in store.manifest(eval_key)["upstream"]  # the gallery LocDiff-H searched
    assert store.manifest(out["retrieval"])["upstream"] == [out["embeddings"]]
    assert set(store.manifest(eval_key)["metrics"]) == {
        "locdiff",
        "locdiff-h",
        "retrieval-1nn",
        "most-common-region",
    }

    # the nightly flow on the same store: its report's lineage covers what it added
    nightly = evaluate_latest(datasets=["bluemarble"], run_key=out["run"], storage=storage)
    con = connect(store)
    after = {k for (k,) in con.execute("SELECT key FROM artifacts").fetchall()}
    added = after - built
    assert _stages(added) == {"eval", "reports"}  # the run's retrieval index is reused
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


def test_own_training_set_without_test_split_evaluates_on_present_benchmarks(prefect_harness, tmp_path):
    """A bring-your-own training set (CSV of image paths + coordinates, train/val only) trains, then is
    evaluated on the evaluation datasets present in the store (here the Blue Marble sample)."""
    import numpy as np

    from locdiff.datasets.bluemarble import build_bluemarble, crop_tile, encode_jpeg, load_bluemarble
    from locdiff.flows.train_mp16 import train_mp16

    storage = "file://" + str(tmp_path / "store")
    store = Store.from_uri(storage)
    build_bluemarble(store, n=60, seed=1)  # an evaluation benchmark present locally
    rng = np.random.default_rng(0)
    image = load_bluemarble()
    lines = ["image_id,lat,lon,image,split"]
    for i in range(80):
        lat, lon = float(rng.uniform(-60, 70)), float(rng.uniform(-180, 180))
        (tmp_path / f"own-{i}.jpg").write_bytes(encode_jpeg(crop_tile(image, lat, lon, 4.0, 64)))
        lines.append(f"own-{i},{lat:.5f},{lon:.5f},own-{i}.jpg,{'val' if i % 8 == 0 else 'train'}")
    (tmp_path / "own.csv").write_text("\n".join(lines) + "\n")

    out = train_mp16(
        dataset="myphotos",
        encoder="efficientnet-lite0",
        preset="tiny",
        overrides={"train": {"max_steps": 10, "log_every": 10, "eval_every": 0}},
        dataset_options={"manifest": str(tmp_path / "own.csv"), "images_root": str(tmp_path)},
        eval_datasets=["bluemarble", "yfcc26k"],
        baselines=["most-common-region"],
        storage=storage,
    )
    assert out["notes"][0].startswith("myphotos: no test split")
    assert any(n.startswith("yfcc26k: skipped") for n in out["notes"])
    (eval_key,) = out["evaluations"]
    man = store.manifest(eval_key)
    assert next(iter(man["metrics"].values()))["dataset"] == "bluemarble"
    assert {"locdiff", "locdiff-h", "retrieval-1nn", "most-common-region"} == set(man["metrics"])
    con = __import__("locdiff.catalog", fromlist=["connect"]).connect(store)
    assert set(_closure(con, out["report"]["key"])) >= {
        out["run"],
        out["retrieval"],
        out["embeddings"],
        out["dataset"],
        eval_key,
    }
