"""Flow and task tests: one Prefect test harness per session, a synthetic embeddings artifact."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
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
    """An embeddings artifact whose embeddings are a noisy, non-linear function of the location, so a
    model can learn to geolocate them: Fourier features of the unit vector plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    # photo-like clustering: half the points around a few "cities", half uniform on the sphere
    centres = np.array([[48.9, 2.3], [40.7, -74.0], [35.7, 139.7], [-33.9, 151.2], [-23.5, -46.6]])
    k = n // 2
    c = centres[rng.integers(0, len(centres), k)]
    lat = np.concatenate([c[:, 0] + rng.normal(0, 2, k), np.degrees(np.arcsin(rng.uniform(-1, 1, n - k)))])
    lon = np.concatenate([c[:, 1] + rng.normal(0, 2, k), rng.uniform(-180, 180, n - k)])
    lat = np.clip(lat, -89.9, 89.9)
    lon = (lon + 180) % 360 - 180
    la, lo = np.radians(lat), np.radians(lon)
    xyz = np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], 1)
    proj = rng.normal(0, 2.0, (3, dim // 2))
    feats = np.concatenate([np.sin(xyz @ proj), np.cos(xyz @ proj)], 1)
    emb = (feats + rng.normal(0, 0.05, feats.shape)).astype(np.float32)
    split = np.array(["train"] * n, dtype=object)
    idx = rng.permutation(n)
    split[idx[: n // 10]] = "val"
    split[idx[n // 10 : n // 5]] = "test"
    table = pa.table(
        {
            "image_id": [f"syn-{i:05d}" for i in range(n)],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.astype(np.float16).reshape(-1)), dim),
            "lat": lat,
            "lon": lon,
            "split": split.tolist(),
        }
    )
    cfg = {"n": n, "dim": dim, "seed": seed, "encoder": encoder}
    key = store.key("embeddings", f"synthetic/{encoder}", "1", cfg)
    if not store.exists(key):
        with store.writer(key, config=cfg) as w:
            w.write_table("parts/part-00000.parquet", table)
            w.set(encoder=encoder, rows=n, dim=dim)
    return key


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
