"""`locdiff predict` never hangs on what a folder holds: a named pipe with an image name becomes a row
with its reason (it is never opened blocking), and so does one named on the command line."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from locdiff.datasets.images import ImageError, read_user_file
from tests.product.conftest import cli, write_image


@pytest.mark.timeout(300)  # the bug this guards against is a hang: fail instead of waiting forever
def test_a_fifo_is_a_reason_row_not_a_hang(tmp_path, tiny_store, run_key):
    root = tmp_path / "photos"
    write_image(root / "a.jpg")
    os.mkfifo(root / "x.jpg")  # nothing ever writes to it
    os.mkfifo(tmp_path / "y.png")
    out_csv = tmp_path / "out.csv"
    code, out, err = cli(
        "predict", str(root), str(tmp_path / "y.png"), "--out", str(out_csv), "--device", "cpu",
        "--model", run_key, store=tiny_store,
    )  # fmt: skip
    assert code == 0, err
    by_id = pd.read_csv(out_csv).set_index("id")
    assert set(by_id.index) == {"a.jpg", "x.jpg", "y.png"}
    assert pd.isna(by_id.loc["a.jpg", "error"])
    for name in ("x.jpg", "y.png"):
        assert by_id.loc[name, "error"] == "not a regular file (a named pipe)"


def test_read_user_file_is_bounded(tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 2048)
    assert len(read_user_file(big, max_bytes=2048)) == 2048
    with pytest.raises(ImageError, match="larger than") as info:
        read_user_file(big, max_bytes=1024)
    assert info.value.too_large
    with pytest.raises(ImageError, match=r"not a regular file \(a folder\)"):
        read_user_file(tmp_path)
    with pytest.raises(ImageError, match=r"not a regular file \(a device\)"):
        read_user_file("/dev/zero")  # endless: never read
    with pytest.raises(FileNotFoundError):
        read_user_file(tmp_path / "absent.jpg")


def test_a_dripping_server_cannot_hold_a_download():
    """Each read arrives within the per-read timeout, but the whole download has a bound too."""
    import socket
    import threading
    import time

    from locdiff.inference import read_source

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    stop = threading.Event()

    def drip() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nContent-Type: image/jpeg\r\n\r\n")
            while not stop.is_set():
                try:
                    conn.sendall(b"x")
                except OSError:
                    return
                time.sleep(0.05)

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    try:
        with pytest.raises(ImageError, match=r"download took longer than 0.8 s"):
            read_source(f"http://127.0.0.1:{srv.getsockname()[1]}/x.jpg", timeout=0.2)
    finally:
        stop.set()
        srv.close()
        t.join(timeout=5)


@pytest.mark.timeout(120)
def test_a_checkpoint_file_is_read_bounded(tmp_path, tiny_store, monkeypatch):
    """--checkpoint FILE is read with the same bound as an image (MAX_CHECKPOINT_BYTES), never whole
    whatever its size; a named pipe is never opened (it is not a file, so it is taken as a run key)."""
    import locdiff.datasets.images as images

    write_image(tmp_path / "a.jpg")
    (tmp_path / "model.pt").write_bytes(b"\0" * 4096)
    monkeypatch.setattr(images, "MAX_CHECKPOINT_BYTES", 1024)
    args = ["predict", str(tmp_path / "a.jpg"), "--encoder", "efficientnet-lite0", "--checkpoint"]
    code, out, err = cli(*args, str(tmp_path / "model.pt"), store=tiny_store)
    assert code != 0 and "Traceback" not in err and "file larger than" in err
    os.mkfifo(tmp_path / "pipe.pt")
    code, out, err = cli(*args, str(tmp_path / "pipe.pt"), store=tiny_store)
    assert code != 0 and "Traceback" not in err and "is not a run key" in err
