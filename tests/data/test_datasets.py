"""Validation, downloads against a real fault-injecting HTTP server, safe extraction, prepare, catalog."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from locdiff.catalog import VIEWS, connect
from locdiff.datasets.download import (
    ChecksumError,
    RetryPolicy,
    UnsafeArchiveError,
    download_file,
    fetch_bytes,
    fetch_many,
    safe_extract,
)
from locdiff.datasets.prepare import prepare_from_manifest
from locdiff.datasets.shards import read_image, read_manifest
from locdiff.datasets.validate import DataValidationError, validate_file
from locdiff.storage import Store

FAST = RetryPolicy(retries=4, backoff_s=0.01, max_backoff_s=0.05, timeout_s=5)


def jpeg(seed: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 37 % 256, seed * 91 % 256, 128)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def store(tmp_path):
    return Store.from_uri(str(tmp_path / "store"))


# --------------------------------------------------------------------------------------------- validation
def write_csv(path, text):
    path.write_text(text)
    return path


def test_validation_errors_name_file_and_row(tmp_path):
    p = write_csv(tmp_path / "m.csv", "IMG_ID,LAT\na.jpg,1\n")
    with pytest.raises(DataValidationError, match=r"m\.csv: missing column\(s\) lon .*has: IMG_ID, LAT"):
        validate_file(p, require_image=False)
    p = write_csv(tmp_path / "m.csv", "IMG_ID,LAT,LON\na.jpg,1,2\nb.jpg,north,3\n")
    with pytest.raises(DataValidationError, match=r"m\.csv, line 3: lat value 'north' is not a number"):
        validate_file(p)
    p = write_csv(tmp_path / "m.csv", "IMG_ID,LAT,LON\na.jpg,1,2\nb.jpg,10,200\n")
    with pytest.raises(DataValidationError, match=r"line 3: lon = 200.0 is out of range \[-180, 180\]"):
        validate_file(p)
    p = write_csv(tmp_path / "m.csv", "IMG_ID,LAT,LON\na.jpg,1,2\nb.jpg,3,4\na.jpg,5,6\n")
    with pytest.raises(DataValidationError, match=r"duplicate image id 'a.jpg' at line 2 and line 4"):
        validate_file(p)
    bad = pa.table({"id": ["x"], "lat": [95.0], "lon": [170.0], "path": ["x.jpg"]})
    pq.write_table(bad, tmp_path / "m.pq")
    with pytest.raises(DataValidationError, match=r"m\.pq, row 0: lat = 95.0 is out of range"):
        validate_file(tmp_path / "m.pq")


def test_swapped_lat_lon_header_is_detected_and_fixable(tmp_path):
    # header says LAT,LON but the columns hold lon,lat (the old Im2GPS3k CSV)
    # (evidence from the whole columns: 3 of 6 LAT values are longitudes beyond ±90, every LON is within ±90)
    text = (
        "IMG_ID,LAT,LON\na.jpg,-74.0,40.7\nb.jpg,139.7,35.7\nc.jpg,2.35,48.9\n"
        "d.jpg,151.2,-33.9\ne.jpg,-118.2,34.1\nf.jpg,13.4,52.5\n"
    )
    p = write_csv(tmp_path / "im2gps3k.csv", text)
    with pytest.raises(DataValidationError, match=r"look swapped: 'LAT' has 139.7 at line 3") as ei:
        validate_file(p)
    assert "--fix-swapped" in ei.value.hint
    v = validate_file(p, fix_swapped=True)
    assert v.table["lat"].tolist() == [40.7, 35.7, 48.9, -33.9, 34.1, 52.5]
    assert v.table["lon"].tolist() == [-74.0, 139.7, 2.35, 151.2, -118.2, 13.4]
    assert any("swapped" in n for n in v.notes)


def test_rows_without_coordinates_are_dropped_and_listed(tmp_path):
    p = write_csv(tmp_path / "m.csv", "IMG_ID,LAT,LON,AUTHOR\na.jpg,1,2,x\nb.jpg,,,y\n")
    v = validate_file(p)
    assert v.table["image_id"].tolist() == ["a.jpg"] and v.table["src_AUTHOR"].tolist() == ["x"]
    assert v.dropped == [{"image_id": "b.jpg", "source": "b.jpg", "reason": "missing coordinates (line 3)"}]


# --------------------------------------------------------------------------------------------- downloads
@pytest.mark.e2e
def test_fetch_retries_transient_faults_and_resumes_truncated_bodies(http_files):
    data = jpeg(1, 64)
    (http_files.root / "a.jpg").write_bytes(data)
    http_files.inject("/a.jpg", "status", times=2, status=503)
    res = fetch_bytes(http_files.url_of("a.jpg"), FAST)
    assert res.ok and res.data == data and res.attempts == 3 and http_files.hits["/a.jpg"] == 3

    big = bytes(range(256)) * 1000  # 256 kB, the body is cut after 100 kB
    (http_files.root / "big.bin").write_bytes(big)
    http_files.inject("/big.bin", "truncate", keep=100_000)
    res = fetch_bytes(http_files.url_of("big.bin"), FAST)
    assert res.ok and res.data == big and res.resumed and res.attempts == 2
    ((path, rng),) = http_files.ranges
    assert path == "/big.bin" and 0 < int(rng[len("bytes=") : -1]) <= 100_000

    http_files.inject("/a.jpg", "reset")
    http_files.inject("/a.jpg", "slow", delay=0.2)
    res = fetch_bytes(http_files.url_of("a.jpg"), FAST)
    assert res.ok and res.data == data and res.attempts == 2

    dead = fetch_bytes(http_files.url_of("missing.jpg"), FAST)
    assert dead.status == "dead" and dead.http_status == 404 and dead.attempts == 1

    http_files.inject("/a.jpg", "status", times=-1, status=500)
    failed = fetch_bytes(http_files.url_of("a.jpg"), FAST)
    assert failed.status == "failed" and failed.attempts == FAST.retries + 1 and "HTTP 500" in failed.error

    wrong = fetch_bytes(http_files.url_of("missing.jpg"), FAST, sha256="0" * 64)
    assert wrong.status == "dead"


@pytest.mark.e2e
def test_fetch_many_bounded_and_ordered(http_files):
    blobs = {f"{i}.bin": bytes([i]) * (100 + i) for i in range(12)}
    for n, b in blobs.items():
        (http_files.root / n).write_bytes(b)
    urls = [http_files.url_of(n) for n in blobs] + [http_files.url_of("gone.bin")]
    out = fetch_many(urls, max_workers=4, policy=FAST)
    assert [r.data for r in out[:-1]] == list(blobs.values()) and out[-1].status == "dead"


@pytest.mark.e2e
def test_download_file_resumes_a_partial_file_and_checks_sha256(http_files, tmp_path):
    data = bytes(range(256)) * 400
    (http_files.root / "big.tar").write_bytes(data)
    dest = tmp_path / "dl" / "big.tar"
    dest.parent.mkdir()
    (tmp_path / "dl" / "big.tar.part").write_bytes(data[:5000])  # left by an earlier, killed run
    res = download_file(http_files.url_of("big.tar"), dest, FAST, sha256=hashlib.sha256(data).hexdigest())
    assert res.ok and res.resumed and dest.read_bytes() == data
    assert ("/big.tar", "bytes=5000-") in http_files.ranges
    with pytest.raises(ChecksumError, match="does not match the expected"):
        download_file(http_files.url_of("big.tar"), tmp_path / "other.tar", FAST, sha256="ab" * 32)
    assert not (tmp_path / "other.tar").exists() and not (tmp_path / "other.tar.part").exists()


# --------------------------------------------------------------------------------------------- archives
def _tar(path, members):
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name, size=0, kind=tarfile.REGTYPE, link=""):
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.linkname = size, kind, link
    return ti


@pytest.mark.parametrize(
    "member, message",
    [
        ((_info("../evil.txt", 4), b"evil"), "'../evil.txt' would be written outside"),
        ((_info("/etc/evil", 4), b"evil"), "'/etc/evil' would be written outside"),
        ((_info("link", kind=tarfile.SYMTYPE, link="/etc/passwd"), None), "'link' is a symbolic link"),
        ((_info("hard", kind=tarfile.LNKTYPE, link="ok.txt"), None), "'hard' is a hard link"),
        ((_info("dev", kind=tarfile.CHRTYPE), None), "'dev' is a device"),
    ],
)
def test_hostile_tar_is_refused_before_anything_is_written(tmp_path, member, message):
    arc = _tar(tmp_path / "a.tar.gz", [(_info("ok.txt", 2), b"ok"), member])
    target = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match=message):
        safe_extract(arc, target)
    assert not (tmp_path / "evil.txt").exists() and list(target.iterdir()) == []


def test_safe_extract_limits_and_zip(tmp_path):
    arc = _tar(tmp_path / "a.tar.gz", [(_info("d/x.jpg", 3), b"abc"), (_info("d/y.jpg", 5), b"defgh")])
    with pytest.raises(UnsafeArchiveError, match=r"'d/y.jpg' is 5 bytes \(limit 4\)"):
        safe_extract(arc, tmp_path / "o1", max_member_bytes=4)
    files = safe_extract(arc, tmp_path / "o2")
    assert sorted(p.rsplit("/", 1)[1] for p in files) == ["x.jpg", "y.jpg"]
    assert (tmp_path / "o2" / "d" / "y.jpg").read_bytes() == b"defgh"
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("good.txt", "g")
        zf.writestr("../../escape.txt", "e")
    with pytest.raises(UnsafeArchiveError, match="'../../escape.txt' would be written outside"):
        safe_extract(z, tmp_path / "o3")


# --------------------------------------------------------------------------------------------- prepare
@pytest.mark.e2e
def test_prepare_over_http_skips_dead_and_corrupt_images_and_reuses_the_result(http_files, store):
    root = http_files.root
    rows = ["IMG_ID,URL,LAT,LON"]
    images = {}
    for i in range(7):
        data = jpeg(i)
        images[f"img{i}"] = data
        (root / f"img{i}.jpg").write_bytes(data)
        rows.append(f"img{i},{http_files.url_of(f'img{i}.jpg')},{i * 10 - 30},{i * 20 - 60}")
    (root / "corrupt.jpg").write_bytes(jpeg(9)[:60])  # truncated JPEG: undecodable
    rows.append(f"corrupt,{http_files.url_of('corrupt.jpg')},1,1")
    rows.append(f"dead,{http_files.url_of('gone.jpg')},2,2")
    rows.append(f"nocoord,{http_files.url_of('img0.jpg')},,")
    manifest = root / "yfcc.csv"
    manifest.write_text("\n".join(rows) + "\n")
    http_files.inject("/img2.jpg", "status", times=2, status=500)
    http_files.inject("/img4.jpg", "truncate", keep=50)
    http_files.inject("/img5.jpg", "reset")

    key = prepare_from_manifest(store, "yfcc26k", manifest, shard_size=3, max_workers=4, policy=FAST)
    man = store.manifest(key)
    assert man["rows"] == 7 and man["n_skipped"] == 2 and man["n_dead"] == 1
    assert man["n_dropped_rows"] == 1 and man["dropped_rows"][0]["image_id"] == "nocoord"
    reasons = {s["image_id"]: s["reason"] for s in man["skipped"]}
    assert reasons["dead"].startswith("dead link (HTTP 404)") and "undecodable" in reasons["corrupt"]
    assert man["dead_links"] == [http_files.url_of("gone.jpg")]
    assert store.verify(key) == []
    table = read_manifest(store, key).to_pylist()
    assert [r["image_id"] for r in table] == [f"img{i}" for i in range(7)]
    for r in table:
        assert read_image(store, key, r["shard"], r["offset"], r["size"]) == images[r["image_id"]]
        assert r["split"] == "test"
    # a second prepare of the same manifest reuses the committed artifact: no request at all
    before = sum(http_files.hits.values())
    assert prepare_from_manifest(store, "yfcc26k", manifest, shard_size=3, policy=FAST) == key
    assert sum(http_files.hits.values()) == before
    con = connect(store)
    got = con.execute("SELECT count(*), count(DISTINCT shard), min(lat), max(lat) FROM datasets").fetchall()
    assert got == [(7, 3, -30.0, 30.0)]


def test_prepare_local_files_resumes_after_a_failure(tmp_path, store):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = ["image_id,path,lat,lon,split"]
    for i in range(5):
        (imgs / f"{i}.jpg").write_bytes(jpeg(i))
        rows.append(f"i{i},{i}.jpg,{i},{i},{'train' if i < 3 else 'val'}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    (imgs / "3.jpg").rename(imgs / "3.bak")
    calls = []

    def boom(shards, n):
        calls.append(shards)
        if shards == 2:
            raise KeyboardInterrupt  # the process dies after two shards

    with pytest.raises(KeyboardInterrupt):
        prepare_from_manifest(store, "mine", manifest, images_root=imgs, shard_size=2, progress=boom)
    assert store.list() == []
    key = prepare_from_manifest(store, "mine", manifest, images_root=imgs, shard_size=2)
    man = store.manifest(key)
    assert man["shards_reused"] == 2 and man["n_shards"] == 3 and man["rows"] == 4
    assert man["skipped"][0]["image_id"] == "i3" and "file not found" in man["skipped"][0]["reason"]
    assert man["splits"] == {"train": 3, "val": 1}
    # the key covers the images (sizes, mtimes): the restored file is a new input, so a new build
    (imgs / "3.bak").rename(imgs / "3.jpg")
    key2 = prepare_from_manifest(store, "mine", manifest, images_root=imgs, shard_size=2)
    assert key2 != key and store.manifest(key2)["rows"] == 5


# --------------------------------------------------------------------------------------------- catalog
def test_catalog_views_exist_on_a_fresh_store(store):
    con = connect(store)
    for view in VIEWS:
        assert con.execute(f"SELECT count(*) FROM {view}").fetchall() == [(0,)]
    cols = [r[0] for r in con.execute("DESCRIBE metrics").fetchall()]
    assert cols[:2] == ["key", "name"] and "acc_25km" in cols and "median_km" in cols


def _eval_artifact(store, run, acc):
    key = store.key("eval", f"{run}/im2gps3k", "1", {"run": run})
    with store.writer(key, version="1", config={"run": run}) as w:
        w.write_table(
            "predictions.parquet",
            pa.table({"method": ["locdiff"] * 2, "image_id": ["a", "b"], "distance_km": [1.0, 3000.0]}),
        )
        w.write_table("metrics.parquet", pa.table({"method": ["locdiff"], "acc_25km": [acc], "n": [2]}))
    return key


@pytest.mark.e2e
def test_catalog_and_sql_over_s3(s3_store, tmp_path):
    store = s3_store
    k1, k2 = _eval_artifact(store, "r1", 0.5), _eval_artifact(store, "r2", 0.25)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(jpeg(1))
    (tmp_path / "m.csv").write_text("id,path,lat,lon\na,a.jpg,10,20\n")
    dkey = prepare_from_manifest(store, "tiny", tmp_path / "m.csv", images_root=imgs)
    assert store.uri(dkey, "manifest.parquet").startswith("s3://")
    con = connect(store)
    got = con.execute("SELECT key, acc_25km FROM metrics ORDER BY acc_25km").fetchall()
    assert got == [(k2, 0.25), (k1, 0.5)]
    assert con.execute("SELECT count(*) FROM predictions WHERE distance_km <= 25").fetchall() == [(2,)]
    assert con.execute("SELECT image_id, lat, lon FROM datasets").fetchall() == [("a", 10.0, 20.0)]
    stages = con.execute("SELECT stage, count(*) FROM artifacts GROUP BY 1 ORDER BY 1").fetchall()
    assert stages == [("datasets", 1), ("eval", 2)]


def test_sql_and_datasets_cli(store, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from locdiff import cli

    monkeypatch.setenv("LOCDIFF_STORAGE", store.url)
    k = _eval_artifact(store, "r1", 0.5)
    runner = CliRunner()
    res = runner.invoke(cli.app, ["sql", "SELECT key, acc_25km FROM metrics", "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == ["key,acc_25km", f"{k},0.5"]
    res = runner.invoke(cli.app, ["sql", "SELECT method, n FROM metrics", "--format", "json"])
    assert json.loads(res.output) == [{"method": "locdiff", "n": 2}]
    out = tmp_path / "m.parquet"
    res = runner.invoke(cli.app, ["sql", "SELECT * FROM predictions", "--format", "parquet", "-o", str(out)])
    assert res.exit_code == 0 and pq.read_table(out).num_rows == 2
    res = runner.invoke(cli.app, ["sql", "SELECT nope FROM metrics"])
    assert res.exit_code != 0 and "nope" in str(res.exception)
    res = runner.invoke(cli.app, ["datasets", "list"])
    assert res.exit_code == 0 and "im2gps3k" in res.output and "gws15k" in res.output and "how:" in res.output
