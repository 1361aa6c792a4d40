"""Embedding extraction: parts per shard, DuckDB-readable float16, skipped images, SIGKILL + resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from locdiff import faults
from locdiff.datasets import shards as ds
from locdiff.datasets.bluemarble import build_bluemarble
from locdiff.embedstore import embedding_parts, load_embeddings
from locdiff.encoders import load_encoder
from locdiff.stages.embeddings import embed_dataset, embedding_key
from locdiff.storage import Store

TINY = {"n": 40, "seed": 5, "size_px": 64, "shard_size": 10}  # 4 shards of 10 tiles


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("efficientnet-lite0", image_size=64)


def _tiny(root: Path) -> tuple[Store, str]:
    store = Store.from_uri(str(root))
    return store, build_bluemarble(store, **TINY)


def test_embed_dataset_parts_and_loading(tmp_path, encoder):
    store, dkey = _tiny(tmp_path / "s")
    seen = []
    key = embed_dataset(
        store, dkey, batch_size=4, num_workers=1, encoder=encoder, progress=lambda a, b: seen.append((a, b))
    )
    man = store.manifest(key)
    assert man["rows"] == 40 and man["dim"] == 1280 and man["n_skipped"] == 0 and man["parts_reused"] == 0
    assert len(embedding_parts(store, key)) == 4 and seen[-1] == (40, 40)
    ids, emb, lat, lon = load_embeddings(store, key)
    manifest = ds.read_manifest(store, dkey).to_pandas().set_index("image_id")
    assert ids == list(manifest.index)  # shard order, manifest order within
    assert emb.shape == (40, 1280) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    np.testing.assert_allclose(lat.numpy(), manifest.loc[ids, "lat"].to_numpy())
    np.testing.assert_allclose(lon.numpy(), manifest.loc[ids, "lon"].to_numpy())
    # the stored values are the encoder's output rounded to float16
    first = ds.read_manifest(store, dkey).slice(0, 1).to_pylist()[0]
    import io

    from PIL import Image

    data = ds.read_image(store, dkey, first["shard"], first["offset"], first["size"])
    with Image.open(io.BytesIO(data)) as im:
        want = encoder(encoder.preprocess(im)[None])[0].half().float()
    torch.testing.assert_close(emb[0], want, atol=2e-3, rtol=2e-3)
    # one split
    t_ids, t_emb, _, _ = load_embeddings(store, key, split="test")
    assert set(t_ids) == set(manifest.index[manifest["split"] == "test"]) and t_emb.shape[0] == len(t_ids)
    with pytest.raises(LookupError, match="no embeddings of split"):
        load_embeddings(store, key, split="nope")
    # DuckDB reads the float16 list column in place, with the same values
    uri = store.uri(key, embedding_parts(store, key)[0])
    rows = duckdb.sql(f"SELECT image_id, embedding FROM read_parquet('{uri}')").fetchall()
    assert [r[0] for r in rows] == ids[:10]
    np.testing.assert_array_equal(np.array([r[1] for r in rows], dtype=np.float32), emb[:10].numpy())
    # the same call again is a cache hit
    assert embed_dataset(store, dkey, encoder=encoder) == key


def test_undecodable_image_is_skipped_and_listed(tmp_path, encoder):
    store = Store.from_uri(str(tmp_path / "s"))
    good = build_bluemarble(store, **{**TINY, "n": 4})
    rows = ds.read_manifest(store, good).to_pylist()
    images = [ds.read_image(store, good, r["shard"], r["offset"], r["size"]) for r in rows]
    images[2] = images[2][: len(images[2]) // 3]  # truncated JPEG
    images[3] = b"definitely not an image"
    key = store.key("datasets", "broken", "1", {"case": "corrupt"}, [])
    with store.writer(key, version="1", config={"case": "corrupt"}) as w:
        recs = [
            ds.ImageRecord(r["image_id"], r["lat"], r["lon"], d, r["split"])
            for r, d in zip(rows, images, strict=True)
        ]
        ds.write_dataset(w, recs, shard_size=2, verify=False)  # let bad bytes through to the embedder
    ekey = embed_dataset(store, key, batch_size=2, num_workers=0, encoder=encoder)
    man = store.manifest(ekey)
    assert man["rows"] == 2 and man["n_skipped"] == 2
    assert sorted(s["image_id"] for s in man["skipped"]) == sorted([rows[2]["image_id"], rows[3]["image_id"]])
    assert all("undecodable" in s["reason"] for s in man["skipped"])
    ids, emb, _, _ = load_embeddings(store, ekey)
    assert ids == [rows[0]["image_id"], rows[1]["image_id"]] and emb.shape == (2, 1280)


_CHILD = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(int(sys.argv[3]))
    from locdiff.storage import Store
    from locdiff.stages.embeddings import embed_dataset
    from locdiff.encoders import load_encoder
    store = Store.from_uri(sys.argv[1])
    embed_dataset(store, sys.argv[2], batch_size=4, num_workers=1,
                  encoder=load_encoder("efficientnet-lite0", image_size=64))
    """
)


@pytest.mark.slow
def test_sigkill_mid_way_then_resume_equals_uninterrupted(tmp_path, encoder):
    store, dkey = _tiny(tmp_path / "killed")
    key = embedding_key(store, dkey, encoder)
    marker_dir = Path(store.root) / key / "_parts"
    # the child sleeps 30 s once its first shard is committed (5 parts: skipped list, 3 arrays, part)
    env = {**os.environ, faults.ENV: "embeddings:part-committed@5=sleep:30", "HF_HUB_OFFLINE": "1"}
    repo = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, store.root, dkey, str(torch.get_num_threads())],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        # one finished shard = 5 markers (skipped list, emb/lat/lon arrays, part); the child then sleeps 30 s
        while not (marker_dir.is_dir() and len(list(marker_dir.glob("*.json"))) >= 5):
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never committed a part"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not store.exists(key)  # nothing committed by the killed run
    done_before = {p.name for p in marker_dir.glob("*.json")}
    attempt_files = sorted((Path(store.root) / key / "_attempts").rglob("part-*.parquet"))
    mtimes = {p: p.stat().st_mtime_ns for p in attempt_files}

    resumed = embed_dataset(store, dkey, batch_size=4, num_workers=1, encoder=encoder)
    assert resumed == key
    man = store.manifest(key)
    assert man["parts_reused"] == 1 and man["parts_total"] == 4 and man["rows"] == 40
    assert done_before <= {p.name for p in marker_dir.glob("*.json")}
    for p, t in mtimes.items():  # the killed run's finished part was taken as it was, not rewritten
        assert p.stat().st_mtime_ns == t
    reused = [f for f in man["files"] if f["relpath"] == "parts/part-00000.parquet"]
    assert reused and Path(store.root, key, reused[0]["path"]) in mtimes

    fresh_store, fresh_dkey = _tiny(tmp_path / "fresh")
    assert fresh_dkey == dkey  # deterministic dataset
    fresh = embed_dataset(fresh_store, dkey, batch_size=4, num_workers=1, encoder=encoder)
    a = load_embeddings(store, key)
    b = load_embeddings(fresh_store, fresh)
    assert a[0] == b[0]
    torch.testing.assert_close(a[1], b[1], atol=0, rtol=0)
    torch.testing.assert_close(a[2], b[2], atol=0, rtol=0)


@pytest.mark.e2e
def test_embed_on_s3_with_a_loader_worker(s3_store, encoder):
    dkey = build_bluemarble(s3_store, **{**TINY, "n": 12, "shard_size": 6})
    key = embed_dataset(s3_store, dkey, batch_size=4, num_workers=1, encoder=encoder)
    ids, emb, lat, _ = load_embeddings(s3_store, key, split="train")
    want = ds.read_manifest(s3_store, dkey).to_pandas().query("split == 'train'")
    assert ids == list(want["image_id"]) and emb.shape == (len(ids), 1280)
    np.testing.assert_allclose(lat.numpy(), want["lat"].to_numpy())
