"""`locdiff datasets download NAME`: each official source's lists, in their published formats (a few rows
made here), served by a local HTTP server as a mirror; joined, downloaded or extracted, prepared."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from locdiff.datasets.download import RetryPolicy
from locdiff.datasets.downloader import DownloadOptions
from locdiff.datasets.shards import read_manifest
from locdiff.datasets.sources import download_dataset, flickr_sized, get_source
from locdiff.errors import UserError
from locdiff.storage import Store
from tests.product.conftest import cli

FAST = RetryPolicy(retries=1, backoff_s=0.01, max_backoff_s=0.02, timeout_s=5)
OPTS = DownloadOptions.from_policy(FAST, processes=0, concurrency=8)
PLACES = "IMG_ID,AUTHOR,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban"


def jpeg(seed: int, size=(320, 240)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (seed * 40 % 256, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def store(tmp_path):
    return Store.from_uri("file://" + str(tmp_path / "store"))


def flickr_mirror(http_files, urls_name: str, meta_name: str, size: str) -> str:
    """A GeoEstimation-style URL list (no header: id, Flickr URL) and places365 metadata: 4 photos,
    one of them gone (404), one without coordinates in the metadata."""
    mirror = http_files.root / "mirror"
    mirror.mkdir()
    urls, meta = [], [PLACES]
    for i in range(4):
        photo = f"{1000 + i}_abcdef{i}"
        img_id = f"{i:02x}/{i:02x}/{photo}.jpg"
        served = f"{photo}_{size}.jpg" if size else f"{photo}.jpg"
        if i != 2:
            (http_files.root / served).write_bytes(jpeg(i))
        urls.append(f"{img_id},{http_files.url}/{photo}.jpg")
        if i != 3:
            meta.append(f"{img_id},12345@N00,{10 * i},{-20 * i},1,6,48,0.1,0.8,0.1")
    (mirror / urls_name).write_text("\n".join(urls) + "\n")
    (mirror / meta_name).write_text("\n".join(meta) + "\n")
    return f"{http_files.url}/mirror"


def test_mp16_from_its_url_list_and_metadata_at_flickr_size_z(http_files, store, tmp_path):
    mirror = flickr_mirror(http_files, "mp16_urls.csv", "mp16_places365.csv", "z")
    key = download_dataset(
        store, "mp16", mirror=mirror, downloads=tmp_path / "dl", policy=FAST, download=OPTS, max_skip_share=1.0
    )
    man = store.manifest(key)
    assert (man["rows"], man["n_dead"], man["splits"]) == (2, 1, {"train": 2})  # row 3: no coordinates
    rows = read_manifest(store, key).to_pylist()
    assert [r["image_id"] for r in rows] == ["00/00/1000_abcdef0.jpg", "01/01/1001_abcdef1.jpg"]
    assert [(r["lat"], r["lon"]) for r in rows] == [(0.0, 0.0), (10.0, -20.0)]
    assert http_files.hits["/1000_abcdef0_z.jpg"] == 1 and http_files.hits["/1000_abcdef0.jpg"] == 0
    # the lists are kept: a second run reuses the committed dataset without fetching anything
    before = sum(http_files.hits.values())
    again = download_dataset(store, "mp16", mirror=mirror, downloads=tmp_path / "dl", policy=FAST, download=OPTS)
    assert again == key and sum(http_files.hits.values()) == before


def test_the_prepare_stage_downloads_a_missing_published_dataset(http_files, store, tmp_path):
    from locdiff.stages.datasets import prepare_dataset

    mirror = flickr_mirror(http_files, "yfcc25600_urls.csv", "yfcc25600_places365.csv", "")
    options = {"mirror": mirror, "downloads": str(tmp_path / "dl"), "download": {"processes": 0}}
    key = prepare_dataset(store, "yfcc26k", options)  # as the flow passes dataset_options
    assert store.manifest(key)["rows"] == 2 and prepare_dataset(store, "yfcc26k") == key


def test_yfcc26k_by_the_cli_with_a_local_folder_as_mirror(http_files, store, tmp_path):
    flickr_mirror(http_files, "yfcc25600_urls.csv", "yfcc25600_places365.csv", "")
    code, out, err = cli(
        "datasets", "download", "yfcc26k", "--mirror", str(http_files.root / "mirror"),
        "--downloads", str(tmp_path / "dl"), "--processes", "0", "--storage", store.url,
    )  # fmt: skip
    assert code == 0, err
    key = out.strip()
    assert store.manifest(key)["rows"] == 2 and "1 dead links" in err
    assert http_files.hits["/1000_abcdef0.jpg"] == 1  # the original size


def _zip(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_im2gps3k_archive_and_its_swapped_published_header(http_files, store, tmp_path):
    mirror = http_files.root / "mirror"
    names = [f"{100 + i}_ab{i}_1_9@N00.jpg" for i in range(4)]
    _zip(mirror / "im2gps3ktest.zip", {f"im2gps3ktest/{n}": jpeg(i) for i, n in enumerate(names)})
    # as published: the column called LON holds latitudes, LAT holds longitudes
    rows = ["IMG_ID,AUTHOR,LON,LAT,S3_Label"] + [
        f"{n},9@N00,{10 + i},{100 + 20 * i},1" for i, n in enumerate(names)
    ]
    (mirror / "im2gps3k_places365.csv").write_text("\n".join(rows) + "\n")
    key = download_dataset(store, "im2gps3k", mirror=f"{http_files.url}/mirror", downloads=tmp_path / "dl")
    got = read_manifest(store, key).to_pylist()
    assert [(r["lat"], r["lon"]) for r in got] == [(10.0, 100.0), (11.0, 120.0), (12.0, 140.0), (13.0, 160.0)]


def test_yfcc4k_has_no_public_url_and_osv5m_test_zips(http_files, store, tmp_path):
    with pytest.raises(UserError, match=r"yfcc4k_places365.csv has no public direct URL.*--url meta="):
        download_dataset(store, "yfcc4k", downloads=tmp_path / "dl")
    mirror = http_files.root / "osv"
    ids = [3859149887465501 + i for i in range(5)]
    for z in range(5):  # images/test/00.zip .. 04.zip, one image each, under NN/
        _zip(mirror / f"images/test/{z:02d}.zip", {f"{z:02d}/{ids[z]}.jpg": jpeg(z)})
    rows = ["id,latitude,longitude,thumb_original_url,country"] + [
        f"{i},{-43.8 + k},{-176.6 + k},,NZ" for k, i in enumerate(ids)
    ]
    (mirror / "test.csv").write_text("\n".join(rows) + "\n")
    key = download_dataset(store, "osv5m", mirror=f"{http_files.url}/osv", downloads=tmp_path / "dl")
    got = read_manifest(store, key).to_pylist()
    assert [r["image_id"] for r in got] == [str(i) for i in ids]
    assert got[0]["lat"] == pytest.approx(-43.8) and got[0]["src_country"] == "NZ"


def test_offline_fails_at_once_with_one_line_naming_the_url(store, tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connection refused, as offline
    code, out, err = cli(
        "datasets", "download", "mp16", "--mirror", f"http://127.0.0.1:{port}/m",
        "--downloads", str(tmp_path / "dl"), "--storage", store.url,
    )  # fmt: skip
    assert code == 2 and out == ""
    lines = err.strip().splitlines()  # the error in one line, then the hint (as every UserError)
    assert len(lines) == 2 and "Traceback" not in err
    assert lines[0] == f"error: cannot reach http://127.0.0.1:{port}/m/mp16_urls.csv (ConnectionError); offline?"
    assert lines[1].startswith("hint:") and "--url urls=/path/to/mp16_urls.csv" in lines[1]
    with pytest.raises(UserError, match="gws15k was never published"):
        get_source("gws15k")


def test_flickr_sizes():
    assert flickr_sized("http://farm1.staticflickr.com/2/123_ab9f.jpg", "z") == (
        "http://farm1.staticflickr.com/2/123_ab9f_z.jpg"
    )
    assert flickr_sized("http://farm1.staticflickr.com/2/123_ab9f_b.jpg", "z").endswith("/123_ab9f_z.jpg")
    assert flickr_sized("http://example.org/x.png", "z") == "http://example.org/x.png"
