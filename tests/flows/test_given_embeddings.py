"""train-mp16 on features committed already (`embeddings=`, e.g. computed elsewhere or synthetic) and
evaluated on embeddings keys given as eval_datasets: no prepare or embed stage runs."""

from __future__ import annotations

import pytest

from locdiff.errors import UserError
from locdiff.storage import Store
from tests.flows.conftest import synthetic_embeddings


def test_train_on_given_embeddings_and_evaluate_an_embeddings_key(prefect_harness, tmp_path):
    from locdiff.flows.train_mp16 import train_mp16

    storage = "file://" + str(tmp_path / "store")
    store = Store.from_uri(storage)
    train_key = synthetic_embeddings(store, n=400, dim=32, seed=0, encoder="trainset")
    bench_key = synthetic_embeddings(store, n=60, dim=32, seed=5, encoder="benchset")
    out = train_mp16(
        embeddings=train_key,
        preset="tiny",
        overrides={"train": {"max_steps": 10, "log_every": 10, "eval_every": 0}},
        eval_datasets=[bench_key, "yfcc26k"],
        storage=storage,
    )
    assert out["dataset"] is None and out["embeddings"] == train_key
    assert store.list("datasets") == [] and {m["key"] for m in store.list("embeddings")} == {
        train_key,
        bench_key,
    }  # nothing prepared, nothing embedded
    assert store.manifest(out["run"])["embeddings"] == train_key
    assert out["notes"][0] == "trainset: given as embeddings; evaluated on the benchmarks present only"
    assert any(n.startswith("yfcc26k: skipped") for n in out["notes"])
    (eval_key,) = out["evaluations"]
    man = store.manifest(eval_key)
    assert bench_key in man["upstream"] and out["retrieval"] in man["upstream"]
    metrics = man["metrics"]["locdiff-h"]
    assert metrics["dataset"] == "benchset" and metrics["split"] == "" and metrics["n"] == 60  # every row
    assert out["report"] is not None

    for bad in ("embeddings/nope/0123456789abcdef", out["run"], "not a key"):
        with pytest.raises(UserError, match="is not a committed embeddings artifact") as e:
            train_mp16(embeddings=bad, preset="tiny", eval_datasets=[], storage=storage)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="eval_datasets: 'embeddings/x/0123456789abcdef'"):
        train_mp16(
            embeddings=train_key,
            preset="tiny",
            overrides={"train": {"max_steps": 10, "log_every": 10, "eval_every": 0}},
            eval_datasets=["embeddings/x/0123456789abcdef"],
            storage=storage,
        )
