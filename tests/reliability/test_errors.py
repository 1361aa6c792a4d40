"""Errors are named correctly: access denied, a missing bucket, an unreachable endpoint, a full or
read-only disk and a truncated or corrupt archive each give one line saying which (exit 1 or 2, no
traceback), and "not committed" is said only when the artifact is truly absent."""

from __future__ import annotations

import errno
import io
import os
import socket
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from locdiff.datasets.download import CorruptArchiveError, safe_extract
from locdiff.errors import StoreAccessError, environment_error
from locdiff.storage import ArtifactNotFoundError, Store


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (seed * 40 % 256, 90, 128)).save(buf, "JPEG")
    return buf.getvalue()


def _cli(args: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "locdiff.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=180,
    )


def _one_line_error(res: subprocess.CompletedProcess, code: int, words: str) -> None:
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "Aborted" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0], res.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_s3_faults_are_named_and_not_read_as_not_committed(s3_server, monkeypatch, tmp_path):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.make_bucket()
    store = Store.from_uri(f"s3://{bucket}/store")
    key = store.key("datasets", "x", "1", {})
    with pytest.raises(ArtifactNotFoundError, match="is not committed"):  # truly absent: said so
        store.manifest(key)
    with store.writer(key, version="1", config={}) as w:
        w.write_bytes("a.bin", b"a")
    wrong = "wrong" + s3_server.secret_key[5:]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(StoreAccessError, match=r"access denied \(s3://") as info:
        Store.from_uri(f"s3://{bucket}/store").exists(key)
    assert wrong not in str(info.value) and "not committed" not in str(info.value)
    res = _cli(["datasets", "list", "--storage", f"s3://{bucket}/store"])
    _one_line_error(res, 1, "access denied")
    assert wrong not in res.stderr + res.stdout and s3_server.secret_key not in res.stderr + res.stdout
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    with pytest.raises(StoreAccessError, match="bucket does not exist"):
        Store.from_uri("s3://no-such-bucket-locdiff/store").exists(key)
    res = _cli(["sql", "SELECT count(*) FROM artifacts", "--storage", "s3://no-such-bucket-locdiff/store"])
    _one_line_error(res, 1, "bucket does not exist")
    monkeypatch.setenv("LOCDIFF_S3_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(StoreAccessError, match="cannot reach the storage endpoint"):
        Store.from_uri(f"s3://{bucket}/store").exists(key)


def test_disk_full_is_one_line(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    store = Store.from_uri(str(tmp_path / "store"))
    env = {"LOCDIFF_STORAGE": store.url}
    res = _cli(["sql", "SELECT 1 AS one", "--format", "csv", "--output", "/dev/full"], env)
    _one_line_error(res, 1, "no space left on device")


def test_read_only_and_full_disk_errors_are_named():
    # No read-only mount can be made without privileges here: the mapping is checked on the OSError
    # the kernel raises (errno EROFS), and on pyarrow's wording of ENOSPC.
    ro = OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/store/x")
    assert environment_error(ro).message.startswith("read-only file system")
    full = OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert environment_error(full).message.startswith("no space left on device")
    assert environment_error(ValueError("a bug")) is None


def _truncated_targz(path: Path) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(20):
            data = os.urandom(20_000)
            info = tarfile.TarInfo(f"{i}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _zip_with_false_size(path: Path) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("0.jpg", jpeg(0))
    data = bytearray(path.read_bytes())
    cd = data.rfind(b"PK\x01\x02")  # central directory entry: claim 1000 more bytes than stored
    for off in (20, 24):  # compressed size, uncompressed size
        (size,) = struct.unpack_from("<I", data, cd + off)
        struct.pack_into("<I", data, cd + off, size + 1000)
    path.write_bytes(bytes(data))
    return path


def test_truncated_or_corrupt_archives_are_named(tmp_path):
    with pytest.raises(CorruptArchiveError, match="truncated or corrupt archive"):
        safe_extract(_truncated_targz(tmp_path / "t.tar.gz"), tmp_path / "out1")
    with pytest.raises(CorruptArchiveError, match="truncated or corrupt archive"):
        safe_extract(_zip_with_false_size(tmp_path / "z.zip"), tmp_path / "out2")
    (tmp_path / "m.csv").write_text("id,path,lat,lon\na,0.jpg,1,2\n")
    store = Store.from_uri(str(tmp_path / "store"))
    res = _cli(
        [
            "datasets",
            "prepare",
            "mine",
            "--manifest",
            str(tmp_path / "m.csv"),
            "--archive",
            str(tmp_path / "t.tar.gz"),
        ],
        {"LOCDIFF_STORAGE": store.url},
    )
    _one_line_error(res, 2, "truncated or corrupt archive")
    assert store.list() == []


def test_prepare_with_nothing_usable_exits_nonzero_with_counts(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (tmp_path / "m.csv").write_text("id,path,lat,lon\na,0.jpg,1,2\nb,1.jpg,3,4\n")
    store = Store.from_uri(str(tmp_path / "store"))
    res = _cli(
        ["datasets", "prepare", "mine", "--manifest", str(tmp_path / "m.csv"), "--images-root", str(imgs)],
        {"LOCDIFF_STORAGE": store.url},
    )
    _one_line_error(res, 2, "not committed: 0 of 2 rows usable; left out: 2 file not found")
    assert store.list() == []
