"""Dataset builds never cache a failure, one bad image never stops a batch, paths are confined, and
the swapped-header check needs evidence from the whole column."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import fsspec
import pytest
from PIL import Image

from locdiff.datasets.images import ImageError, decode_image
from locdiff.datasets.prepare import DatasetBuildError, prepare_from_manifest
from locdiff.datasets.shards import read_image, read_manifest
from locdiff.datasets.validate import DataValidationError, validate_file
from locdiff.errors import UserError
from locdiff.storage import Store


def jpeg(seed: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 37 % 256, seed * 91 % 256, 128)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def store(tmp_path):
    return Store.from_uri("file://" + str(tmp_path / "store"))


def _images(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"{i}.jpg").write_bytes(jpeg(i))
    return root


def _manifest(path: Path, refs: list[str]) -> Path:
    rows = ["id,path,lat,lon"] + [f"i{k},{ref},{k},{k}" for k, ref in enumerate(refs)]
    path.write_text("\n".join(rows) + "\n")
    return path


pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


# --------------------------------------------------------------------------------------------- item 5
def test_decode_image_turns_every_failure_into_a_reason():
    with decode_image(jpeg(1)) as im:
        assert im.size == (16, 16)
    cases = {
        "decompression bomb": png_claiming(60000, 60000),  # Pillow's own error (over twice its limit)
        "decompression bomb (10000x10000": png_claiming(10000, 10000),  # Pillow only warns; we refuse
        "not a decodable image": b"this is no image at all",
        "undecodable image": jpeg(3)[:60],  # truncated
        "empty file": b"",
    }
    for reason, data in cases.items():
        with pytest.raises(ImageError) as info:
            decode_image(data)
        assert info.value.reason.startswith(reason), (reason, info.value.reason)
        assert isinstance(info.value, ValueError)


def test_a_bomb_and_broken_images_are_skipped_rows_not_a_crash(tmp_path, store):
    imgs = _images(tmp_path / "imgs", 4)
    (imgs / "bomb.png").write_bytes(png_claiming(60000, 60000))
    (imgs / "big.png").write_bytes(png_claiming(10000, 10000))
    (imgs / "junk.jpg").write_bytes(b"\xff\xd8 not really")
    refs = ["0.jpg", "bomb.png", "1.jpg", "big.png", "2.jpg", "junk.jpg", "3.jpg"]
    m = _manifest(tmp_path / "m.csv", refs)
    key = prepare_from_manifest(store, "bombs", m, images_root=imgs, shard_size=3)
    man = store.manifest(key)
    assert man["rows"] == 4 and man["n_skipped"] == 3
    reasons = {s["image_id"]: s["reason"] for s in man["skipped"]}
    assert reasons["i1"].startswith("decompression bomb") and reasons["i3"].startswith("decompression bomb")
    assert man["skip_reasons"]["decompression bomb"] == 2
    rows = read_manifest(store, key).to_pylist()
    assert [r["image_id"] for r in rows] == ["i0", "i2", "i4", "i6"]
    assert read_image(store, key, rows[1]["shard"], rows[1]["offset"], rows[1]["size"]) == jpeg(1)


# --------------------------------------------------------------------------------------------- item 4, 9
def test_zero_usable_images_is_not_committed_and_says_why(tmp_path, store):
    _images(tmp_path / "imgs", 3)
    m = _manifest(tmp_path / "m.csv", ["0.jpg", "1.jpg", "2.jpg"])
    wrong_root = tmp_path / "imags"  # a typo: an existing but wrong folder
    wrong_root.mkdir()
    with pytest.raises(
        DatasetBuildError, match=r"not committed: 0 of 3 rows usable; left out: 3 file not found"
    ):
        prepare_from_manifest(store, "typo", m, images_root=wrong_root)
    assert store.list() == []
    with pytest.raises(UserError, match=r"--images-root .* is not a folder"):
        prepare_from_manifest(store, "typo", m, images_root=tmp_path / "nope")
    # after the fix, the same manifest builds (the failure was not cached)
    key = prepare_from_manifest(store, "typo", m, images_root=tmp_path / "imgs")
    assert store.manifest(key)["rows"] == 3


def test_empty_manifests_commit_nothing(tmp_path, store):
    imgs = _images(tmp_path / "imgs", 2)
    header_only = tmp_path / "h.csv"
    header_only.write_text("id,path,lat,lon\n")
    all_nan = tmp_path / "n.csv"
    all_nan.write_text("id,path,lat,lon\na,0.jpg,,\nb,1.jpg,nan,nan\n")
    all_skipped = _manifest(tmp_path / "s.csv", ["x.jpg", "y.jpg"])
    with pytest.raises(DatasetBuildError, match="0 of 0 rows usable"):
        prepare_from_manifest(store, "h", header_only, images_root=imgs)
    with pytest.raises(DatasetBuildError, match=r"0 of 2 rows usable \(2 without coordinates\)"):
        prepare_from_manifest(store, "n", all_nan, images_root=imgs)
    with pytest.raises(DatasetBuildError, match="0 of 2 rows usable; left out: 2 file not found"):
        prepare_from_manifest(store, "s", all_skipped, images_root=imgs)
    assert store.list() == []


def test_skip_share_over_the_threshold_is_refused_unless_asked(tmp_path, store):
    imgs = _images(tmp_path / "imgs", 2)
    m = _manifest(tmp_path / "m.csv", ["0.jpg", "1.jpg", "gone1.jpg", "gone2.jpg", "gone3.jpg"])
    with pytest.raises(
        DatasetBuildError, match=r"2 of 5 rows usable, 60% left out \(more than --max-skip-share"
    ):
        prepare_from_manifest(store, "half", m, images_root=imgs)
    assert store.list() == []
    key = prepare_from_manifest(store, "half", m, images_root=imgs, max_skip_share=1.0)
    assert store.manifest(key)["rows"] == 2 and store.manifest(key)["n_skipped"] == 3


def test_key_covers_images_root_and_images_and_force_rebuilds(tmp_path, store):
    a, b = _images(tmp_path / "a", 2), _images(tmp_path / "b", 2)
    m = _manifest(tmp_path / "m.csv", ["0.jpg", "1.jpg"])
    ka = prepare_from_manifest(store, "d", m, images_root=a)
    kb = prepare_from_manifest(store, "d", m, images_root=b)
    assert ka != kb
    assert prepare_from_manifest(store, "d", m, images_root=a) == ka  # unchanged inputs: reused
    (a / "1.jpg").write_bytes(jpeg(7, size=24))  # an image changed in place
    ka2 = prepare_from_manifest(store, "d", m, images_root=a)
    assert ka2 != ka
    row = read_manifest(store, ka2).to_pylist()[1]
    assert read_image(store, ka2, row["shard"], row["offset"], row["size"]) == jpeg(7, size=24)
    attempt = store.manifest(ka2)["attempt"]
    ka3 = prepare_from_manifest(store, "d", m, images_root=a, force=True)
    assert ka3 != ka2 and store.manifest(ka3)["config"]["rebuild_of"] == ka2  # never rewritten in place
    assert store.manifest(ka2)["attempt"] == attempt and store.verify(ka2) == store.verify(ka3) == []


def test_force_with_one_more_image_gives_new_dataset_and_embeddings_keys(tmp_path, store):
    """A URL that was dead at the first build answers now: ``--force`` picks the image up under a new
    dataset key, so the embeddings keyed on the dataset are built anew with the new row count."""
    from locdiff.embedstore import load_embeddings
    from locdiff.encoders import load_encoder
    from locdiff.stages.embeddings import embed_dataset
    from tests.servers import http_server

    srv_root = _images(tmp_path / "srv", 2)
    encoder = load_encoder("efficientnet-lite0", image_size=64)
    with http_server(srv_root) as srv:
        m = _manifest(tmp_path / "m.csv", [srv.url_of(f"{i}.jpg") for i in range(3)])
        k1 = prepare_from_manifest(store, "web", m, max_skip_share=1.0)
        e1 = embed_dataset(store, k1, batch_size=4, num_workers=0, encoder=encoder)
        assert store.manifest(k1)["rows"] == 2 and len(load_embeddings(store, e1)[0]) == 2
        (srv_root / "2.jpg").write_bytes(jpeg(2))  # the link answers now
        k2 = prepare_from_manifest(store, "web", m, max_skip_share=1.0, force=True)
    e2 = embed_dataset(store, k2, batch_size=4, num_workers=0, encoder=encoder)
    assert k2 != k1 and e2 != e1
    assert store.manifest(k2)["rows"] == 3 and len(load_embeddings(store, e2)[0]) == 3
    assert store.manifest(k1)["rows"] == 2 and len(load_embeddings(store, e1)[0]) == 2  # untouched
    from locdiff.stages.datasets import latest_dataset

    assert latest_dataset(store, "web") == k2


def test_a_changed_archive_is_re_extracted(tmp_path, store):
    def make_archive(path: Path, seed: int) -> None:
        with tarfile.open(path, "w:gz") as tar:
            data = jpeg(seed)
            info = tarfile.TarInfo("0.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    archive = tmp_path / "imgs.tar.gz"
    make_archive(archive, 1)
    m = _manifest(tmp_path / "m.csv", ["0.jpg"])
    k1 = prepare_from_manifest(store, "arch", m, archive=archive)
    make_archive(archive, 2)  # replaced at the same path
    k2 = prepare_from_manifest(store, "arch", m, archive=archive)
    assert k1 != k2
    row = read_manifest(store, k2).to_pylist()[0]
    assert read_image(store, k2, row["shard"], row["offset"], row["size"]) == jpeg(2)
    assert store.manifest(k2)["config"]["archive_sha256"] != store.manifest(k1)["config"]["archive_sha256"]


# --------------------------------------------------------------------------------------------- item 7
def test_paths_are_confined_to_the_images_root(tmp_path, store):
    imgs = _images(tmp_path / "root" / "imgs", 2)
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(jpeg(9))
    mem = fsspec.filesystem("memory")
    mem.pipe_file("/locdiff-test/m.jpg", jpeg(8))
    refs = [
        "0.jpg",
        "1.jpg",
        "../../secret.jpg",
        str(outside),
        "file://" + str(outside),
        "memory://locdiff-test/m.jpg",
    ]
    m = _manifest(tmp_path / "m.csv", refs)
    key = prepare_from_manifest(store, "conf", m, images_root=imgs, max_skip_share=1.0)
    man = store.manifest(key)
    assert man["rows"] == 2
    reasons = {s["image_id"]: s["reason"] for s in man["skipped"]}
    assert reasons["i2"].startswith("refused: path outside --images-root")
    assert reasons["i3"].startswith("refused: absolute path")
    assert reasons["i4"].startswith("refused: file:// URL")
    assert reasons["i5"].startswith("refused: protocol 'memory'")
    for r in read_manifest(store, key).to_pylist():  # nothing from outside the root was stored
        assert read_image(store, key, r["shard"], r["offset"], r["size"]) in (jpeg(0), jpeg(1))
    key2 = prepare_from_manifest(
        store, "conf", m, images_root=imgs, allow_outside_root=True, allow_protocols=("memory",)
    )
    assert key2 != key and store.manifest(key2)["rows"] == 6


# --------------------------------------------------------------------------------------------- item 6
def test_one_bad_latitude_is_that_rows_error_not_a_swapped_header(tmp_path):
    p = tmp_path / "cities.csv"
    p.write_text(
        "id,path,lat,lon\nparis,p.jpg,48.8566,2.3522\nberlin,b.jpg,52.52,13.405\n"
        "madrid,m.jpg,40.4168,-3.7038\nrome,r.jpg,95.2,12.4964\n"
    )
    with pytest.raises(
        DataValidationError, match=r"line 5: lat = 95.2 is out of range \[-90, 90\] \(1 such row"
    ):
        validate_file(p)
    with pytest.raises(DataValidationError, match=r"--fix-swapped refused: .* weak \(only 1 of 4 row"):
        validate_file(p, fix_swapped=True)
    good = tmp_path / "good.csv"
    good.write_text("id,path,lat,lon\nparis,p.jpg,48.8566,2.3522\n")
    with pytest.raises(DataValidationError, match="--fix-swapped refused"):
        validate_file(good, fix_swapped=True)  # nothing suggests a swap: never swap every row
    assert validate_file(good).table["lat"].tolist() == [48.8566]


def test_embed_skips_a_bomb_with_a_reason(tmp_path, store):
    from locdiff.datasets.shards import ImageRecord, write_dataset
    from locdiff.encoders import load_encoder
    from locdiff.stages.embeddings import embed_dataset

    key = store.key("datasets", "hostile", "1", {})
    recs = [ImageRecord(f"g{i}", 1.0, 2.0, jpeg(i, size=64), split="test") for i in range(3)]
    recs.insert(1, ImageRecord("bomb", 1.0, 2.0, png_claiming(60000, 60000), split="test", ext="png"))
    recs.append(ImageRecord("big", 1.0, 2.0, png_claiming(10000, 10000), split="test", ext="png"))
    # written unchecked, as an older or foreign dataset might be
    with store.writer(key, version="1", config={}) as w:
        write_dataset(w, recs, shard_size=10, verify=False)
    encoder = load_encoder("efficientnet-lite0", image_size=64)
    ekey = embed_dataset(store, key, batch_size=2, num_workers=0, encoder=encoder)
    man = store.manifest(ekey)
    assert man["rows"] == 3 and man["n_skipped"] == 2
    reasons = {s["image_id"]: s["reason"] for s in man["skipped"]}
    assert set(reasons) == {"bomb", "big"} and all("decompression bomb" in r for r in reasons.values())


@pytest.mark.timeout(120)  # guards against a hang
def test_prepare_skips_a_fifo_with_a_reason_and_refuses_a_fifo_manifest(tmp_path, store):
    import os

    imgs = _images(tmp_path / "imgs", 2)
    os.mkfifo(imgs / "pipe.jpg")
    m = _manifest(tmp_path / "m.csv", ["0.jpg", "pipe.jpg", "1.jpg"])
    key = prepare_from_manifest(store, "fifo", m, images_root=imgs)
    man = store.manifest(key)
    assert man["rows"] == 2 and man["n_skipped"] == 1
    assert man["skipped"][0]["reason"] == "not a regular file (a named pipe) (pipe.jpg)"
    os.mkfifo(tmp_path / "pipe.csv")
    with pytest.raises(UserError, match=r"--manifest .*pipe.csv is not a regular file"):
        prepare_from_manifest(store, "fifo", tmp_path / "pipe.csv", images_root=imgs)


def test_a_manifest_prepare_loads_whole_is_bounded(tmp_path, store, monkeypatch):
    import locdiff.datasets.prepare as prepare

    imgs = _images(tmp_path / "imgs", 2)
    m = _manifest(tmp_path / "m.csv", ["0.jpg", "1.jpg"])
    monkeypatch.setattr(prepare, "MAX_MANIFEST_BYTES", m.stat().st_size - 1)
    with pytest.raises(UserError, match=r"--manifest .*m.csv is over"):
        prepare_from_manifest(store, "big", m, images_root=imgs)
