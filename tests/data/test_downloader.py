"""The parallel downloader against a real fault-injecting HTTP server: resize on download, dead links
counted and never retried, transient failures fetched again on a re-run (and only they), webdataset-style
shards, resume after a kill with no truncated shard committed."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from locdiff.datasets.download import RetryPolicy
from locdiff.datasets.downloader import DownloadOptions
from locdiff.datasets.images import ImageError, process_image
from locdiff.datasets.prepare import DatasetBuildError, prepare_from_manifest
from locdiff.datasets.shards import iter_shard, read_image, read_manifest, shards
from locdiff.errors import UserError
from locdiff.storage import Store

FAST = RetryPolicy(retries=2, backoff_s=0.01, max_backoff_s=0.05, timeout_s=5)


def image(w: int, h: int, fmt: str = "JPEG", seed: int = 0) -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", (w, h), (seed * 37 % 256, seed * 91 % 256, 128))
    im.paste((255, 255, 255), (0, 0, w // 3, h // 3))
    im.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def store(tmp_path):
    return Store.from_uri("file://" + str(tmp_path / "store"))


def serve(http_files, n: int, dead: tuple[int, ...] = (), size=(640, 480)) -> Path:
    """``n`` images img<i>.jpg (those in ``dead`` are not there: 404) and a manifest in MP16's shape."""
    rows = ["IMG_ID,URL,LAT,LON"]
    for i in range(n):
        if i not in dead:
            (http_files.root / f"img{i}.jpg").write_bytes(image(*size, seed=i))
        rows.append(f"{i:02d}/img{i}.jpg,{http_files.url_of(f'img{i}.jpg')},{i},{-i}")
    manifest = http_files.root / "list.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def hits(http_files, *idx: int) -> list[int]:
    return [http_files.hits[f"/img{i}.jpg"] for i in idx]


# --------------------------------------------------------------------------------------------- resize
def test_resize_keeps_the_aspect_ratio_and_small_images_byte_for_byte():
    data, ext = process_image(image(800, 600), 224, 95)
    with Image.open(io.BytesIO(data)) as im:
        assert (im.size, im.format, ext) == ((299, 224), "JPEG", "jpg")
    data, ext = process_image(image(300, 1200), 224, 95)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (224, 896)
    small = image(100, 50, "PNG")
    assert process_image(small, 224, 95) == (small, "png")
    big = image(800, 600)
    assert process_image(big, None, 95) == (big, "jpg")  # keep the original when asked
    with pytest.raises(ImageError, match="undecodable"):
        process_image(big[:200], 224, 95)
    with pytest.raises(UserError, match="image_size"):
        DownloadOptions(image_size=4)


# --------------------------------------------------------------------------------------------- faults
def test_download_counts_dead_links_once_retries_transient_faults_and_writes_webdataset_shards(
    http_files, store, capsys
):
    manifest = serve(http_files, 10, dead=(3, 7))
    http_files.inject("/img1.jpg", "status", times=2, status=503)  # recovers within the run
    http_files.inject("/img2.jpg", "reset")
    http_files.inject("/img4.jpg", "truncate", keep=100)
    http_files.inject("/img5.jpg", "slow", delay=0.3)
    opts = DownloadOptions.from_policy(FAST, processes=1, concurrency=4, per_host=3)
    key = prepare_from_manifest(store, "mp16", manifest, shard_size=4, download=opts, default_split="train")
    man = store.manifest(key)
    assert (man["rows"], man["n_dead"], man["n_failed"]) == (8, 2, 0)
    assert sorted(man["dead_links"]) == [http_files.url_of("img3.jpg"), http_files.url_of("img7.jpg")]
    assert hits(http_files, 3, 7) == [1, 1]  # dead: asked once, never retried
    assert hits(http_files, 1, 2, 4) == [3, 2, 2]
    progress = capsys.readouterr().err.strip().splitlines()[-1]  # the last progress line on stderr
    assert progress.startswith("download: 10/10 images, ") and "8 ok, 2 dead, 0 failed" in progress
    assert store.verify(key) == []
    table = read_manifest(store, key).to_pylist()
    assert [r["image_id"] for r in table] == [f"{i:02d}/img{i}.jpg" for i in range(10) if i not in (3, 7)]
    for r in table:
        with Image.open(io.BytesIO(read_image(store, key, r["shard"], r["offset"], r["size"]))) as im:
            assert im.size == (299, 224)  # 640x480 brought down to a 224 shortest side
    # webdataset: each tar is a sequence of <key>.<ext> members, one key per sample
    for shard in shards(store, key):
        names = [n for n, _ in iter_shard(store, key, shard)]
        assert names and all(n.endswith(".jpg") for n in names)
        assert len({n.rsplit(".", 1)[0] for n in names}) == len(names)


def test_requests_to_one_host_stay_within_per_host(http_files, store):
    manifest = serve(http_files, 12, size=(64, 48))
    for i in range(12):
        http_files.inject(f"/img{i}.jpg", "slow", delay=0.15)
    opts = DownloadOptions.from_policy(FAST, processes=0, concurrency=12, per_host=3)
    key = prepare_from_manifest(store, "mp16", manifest, shard_size=4, download=opts)
    assert store.manifest(key)["rows"] == 12
    assert 2 <= http_files.peak_in_flight <= 3  # many shards in flight, never more than 3 to the host


def test_transient_failures_are_fetched_again_on_a_rerun_and_dead_links_are_not(http_files, store):
    """Issue 25 item 3: a minority of failures commits, and a re-run fetches only those again (under a
    new key: the committed one is never rewritten); an outage commits nothing, and the re-run fetches."""
    manifest = serve(http_files, 6, dead=(5,))
    opts = DownloadOptions.from_policy(FAST, processes=0, concurrency=4)
    http_files.inject("/img2.jpg", "status", times=-1, status=500)
    first = prepare_from_manifest(store, "yfcc26k", manifest, shard_size=2, download=opts)
    man = store.manifest(first)
    assert (man["rows"], man["n_failed"], man["n_dead"]) == (4, 1, 1)
    assert hits(http_files, 2) == [FAST.retries + 1]
    # still failing: the re-run asks again for the failed sample only, and keeps the build as it is
    before = hits(http_files, 0, 1, 2, 3, 4, 5)
    assert prepare_from_manifest(store, "yfcc26k", manifest, shard_size=2, download=opts) == first
    after = hits(http_files, 0, 1, 2, 3, 4, 5)
    assert [a - b for a, b in zip(after, before, strict=True)] == [0, 0, FAST.retries + 1, 0, 0, 0]
    # the outage is over: only img2 is fetched again; the result is a new key that names its content
    http_files.faults.clear()
    second = prepare_from_manifest(store, "yfcc26k", manifest, shard_size=2, download=opts)
    man2 = store.manifest(second)
    assert second != first and man2["retry_of"] == first
    assert (man2["rows"], man2["n_failed"], man2["n_dead"]) == (5, 0, 1)
    again = [a - b for a, b in zip(hits(http_files, 0, 1, 2, 3, 4, 5), after, strict=True)]
    assert again == [0, 0, 1, 0, 0, 0]
    assert store.verify(second) == [] and store.manifest(first)["rows"] == 4  # the first is unchanged
    assert [r["image_id"] for r in read_manifest(store, second).to_pylist()] == [
        f"{i:02d}/img{i}.jpg" for i in range(5)
    ]
    total = sum(http_files.hits.values())  # and a third run has nothing left to do
    assert prepare_from_manifest(store, "yfcc26k", manifest, shard_size=2, download=opts) == second
    assert sum(http_files.hits.values()) == total


def test_an_outage_commits_nothing_and_the_rerun_does_not_reuse_the_failed_parts(http_files, store):
    manifest = serve(http_files, 4)
    opts = DownloadOptions.from_policy(FAST, processes=0, concurrency=4)
    for i in range(4):
        http_files.inject(f"/img{i}.jpg", "reset", times=-1)
    with pytest.raises(DatasetBuildError, match="0 of 4 rows usable; left out: 4 download failed"):
        prepare_from_manifest(store, "yfcc26k", manifest, shard_size=2, download=opts)
    assert store.list("datasets") == []
    http_files.faults.clear()
    before = hits(http_files, 0, 1, 2, 3)
    key = prepare_from_manifest(store, "yfcc26k", manifest, shard_size=2, download=opts)
    assert store.manifest(key)["rows"] == 4 and store.manifest(key)["n_failed"] == 0
    assert [a - b for a, b in zip(hits(http_files, 0, 1, 2, 3), before, strict=True)] == [1] * 4


def test_a_killed_download_resumes_shard_by_shard(http_files, store, tmp_path):
    """SIGKILL after the second shard's tar is written (its part not yet committed): the re-run reuses
    the first shard without a request, and the committed artifact checks out whole."""
    manifest = serve(http_files, 8)
    code = (
        "import sys; from locdiff.datasets.prepare import prepare_from_manifest;"
        "from locdiff.datasets.downloader import DownloadOptions; from locdiff.storage import Store;"
        "prepare_from_manifest(Store.from_uri(sys.argv[1]), 'mp16', sys.argv[2], shard_size=2,"
        " download=DownloadOptions(processes=0, concurrency=1, shards_in_flight=1))"
    )
    env = {**os.environ, "LOCDIFF_FAULT": "datasets:part-written@3", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [sys.executable, "-c", code, store.url, str(manifest)], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert store.list("datasets") == [] and hits(http_files, 0, 1, 2, 3) == [1, 1, 1, 1]
    opts = DownloadOptions(processes=0, concurrency=1, shards_in_flight=1)
    key = prepare_from_manifest(store, "mp16", manifest, shard_size=2, download=opts)
    man = store.manifest(key)
    assert man["rows"] == 8 and man["shards_reused"] == 1
    assert hits(http_files, 0, 1) == [1, 1] and hits(http_files, 2, 3, 4, 5, 6, 7) == [2, 2, 1, 1, 1, 1]
    assert store.verify(key) == []
    for shard in shards(store, key):  # every committed tar reads to its end
        with store.open(key, shard) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            assert len([m for m in tar if m.isfile()]) == 2
