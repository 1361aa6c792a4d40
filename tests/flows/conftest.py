"""Flow and task tests: one Prefect test harness per session, a synthetic embeddings artifact."""

from __future__ import annotations

import pytest

from locdiff.storage import Store


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """Prefect's test harness (a temporary API + SQLite database) shared by the session's flow tests;
    results and task caches go to a temporary folder, not the user's ~/.prefect."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(storage)}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


def synthetic_embeddings(
    store: Store, n: int = 640, dim: int = 32, seed: int = 0, encoder: str = "synthetic"
) -> str:
    """A small synthetic embeddings artifact (``locdiff datasets synth``): a noisy, non-linear function of
    the location, so a model can learn to geolocate it; Parquet parts plus memory-mappable arrays."""
    from locdiff.datasets.synth import synth_embeddings

    return synth_embeddings(
        store, encoder, rows=n, dim=dim, seed=seed, part_rows=max(1, n // 2), encoder=encoder
    )


@pytest.fixture(scope="session")
def store_uri(tmp_path_factory) -> str:
    return "file://" + str(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="session")
def embeddings_key(store_uri) -> str:
    return synthetic_embeddings(Store.from_uri(store_uri))


def tiny_config(embed_dim: int = 32, **train):
    """The tiny preset at the synthetic embeddings' width with train overrides."""
    from locdiff.stages.runs import resolve_config

    return resolve_config("tiny", {"train": train}, embed_dim=embed_dim)


def run_inputs(store_uri: str, embeddings_key: str, config) -> dict:
    """The target cache and anchor sets a run of `config` reads, built like the pipeline does."""
    from locdiff.stages.anchors import build_anchor_set
    from locdiff.stages.runs import anchor_roles
    from locdiff.stages.targets import build_targets

    store = Store.from_uri(store_uri)
    anchors = {"uniform": build_anchor_set(store, "uniform", config.decoder_anchor_count)}
    if "data" in anchor_roles(config):
        anchors["data"] = build_anchor_set(store, "data", 2000, dataset_key=embeddings_key)
    return {"targets_key": build_targets(store, embeddings_key, config.max_degree), "anchors": anchors}
