"""Archives are bounded before anything is written: a small archive holding a large member of zeros is
refused for its compression ratio (zip per member; tar.gz by what the headers declare so far, before
the member is inflated), and one that would not fit the free disk is refused; honest archives of
photos (which barely compress) extract as before."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest

from locdiff.datasets import archives
from locdiff.datasets.archives import MAX_COMPRESSION_RATIO, check_archive
from locdiff.datasets.download import UnsafeArchiveError
from locdiff.datasets.prepare import prepare_from_manifest
from locdiff.storage import Store
from tests.reliability.test_prepare_reliability import _manifest, jpeg

ZEROS = 64 << 20  # 64 MiB of zeros: ~64 KiB compressed


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _targz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("make", [_zip, _targz])
def test_a_small_archive_with_a_large_zero_member_is_refused_before_writing(tmp_path, make):
    photos = {f"{i}.jpg": jpeg(i) for i in range(3)}
    bomb = make(tmp_path / f"imgs.{make.__name__[1:]}", {**photos, "zeros.jpg": bytes(ZEROS)})
    assert bomb.stat().st_size * MAX_COMPRESSION_RATIO < ZEROS  # small on disk, large when expanded
    m = _manifest(tmp_path / "m.csv", ["0.jpg", "1.jpg", "2.jpg"])
    store = Store.from_uri(str(tmp_path / "store"))
    with pytest.raises(UnsafeArchiveError, match=r"'zeros.jpg'.* expands .*more than 100x"):
        prepare_from_manifest(store, "bomb", m, archive=bomb)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.endswith(".jpg")]
    assert written == [] and store.list() == []  # nothing extracted, nothing committed
    honest = make(tmp_path / f"ok.{make.__name__[1:]}", photos)  # photos barely compress
    key = prepare_from_manifest(store, "ok", m, archive=honest)
    assert store.manifest(key)["rows"] == 3


def test_an_archive_larger_than_the_free_disk_is_refused(tmp_path, monkeypatch):
    photos = {f"{i}.jpg": jpeg(i) + os.urandom(200_000) for i in range(3)}  # ~600 kB, incompressible
    arch = _zip(tmp_path / "imgs.zip", photos)
    assert check_archive(arch, tmp_path / "out") >= 600_000
    usage = namedtuple("usage", "total used free")
    free = archives.FREE_SPACE_MARGIN_BYTES + 100_000  # 100 kB beyond the margin
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * free, 9 * free, free))
    with pytest.raises(UnsafeArchiveError, match=r"expands to [\d,]+ bytes but .* free \(less a 1 GiB"):
        check_archive(arch, tmp_path / "out" / "deeper")  # the nearest existing folder is asked
