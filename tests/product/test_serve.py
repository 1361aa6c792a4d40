"""`locdiff serve`: a real server on a free loopback port (stopped by the test): a round trip of one
and of several images, and every bad input answered with a 4xx and a reason while the server keeps
serving."""

from __future__ import annotations

import base64
import io
import os

import pytest
import requests
from PIL import Image

from locdiff.stack import free_port
from tests.product import serve_load


def _png(size=(64, 48), color=(20, 90, 160), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tiny_store, run_key):
    port = free_port(None)
    args = ["--max-bytes", "300000", "--max-pixels", "1000000", "--max-wait-ms", "20"]
    proc = serve_load.start_server(tiny_store, run_key, port, args)
    url = f"http://127.0.0.1:{port}"
    try:
        serve_load.wait_healthy(url, proc)
        yield url
    finally:
        serve_load.stop_server(proc)


def test_round_trip_one_and_several_images(server, run_key):
    h = requests.get(server + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["model"] == run_key and h["max_batch"] == 16
    r = requests.post(server + "/predict", data=_png(), headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    (p,) = r.json()["predictions"]
    assert -90 <= p["lat"] <= 90 and -180 <= p["lon"] <= 180
    assert p["modes"] and all({"lat", "lon", "mass"} <= set(m) for m in p["modes"])
    imgs = [base64.b64encode(_png(color=c)).decode() for c in [(200, 10, 10), (10, 200, 10), (20, 90, 160)]]
    r = requests.post(server + "/predict", json={"images": imgs}, timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3 and all(-90 <= q["lat"] <= 90 for q in preds)


def test_concurrent_requests_share_forward_passes(server):
    """Dynamic batching, asserted (issue 24): 12 requests sent at once are answered in fewer forward
    passes than requests, read from the server's own counters in /health (``batches`` = forward passes
    of the encoder + diffusion, ``images`` = images through them)."""
    from concurrent.futures import ThreadPoolExecutor

    n = 12
    before = requests.get(server + "/health", timeout=10).json()
    body = _png(color=(120, 60, 30))

    def one(_):
        headers = {"Content-Type": "image/png"}
        return requests.post(server + "/predict", data=body, headers=headers, timeout=120)

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(one, range(n)))
    assert all(r.status_code == 200 and len(r.json()["predictions"]) == 1 for r in answers)
    after = requests.get(server + "/health", timeout=10).json()
    assert after["images"] - before["images"] == n
    assert 1 <= after["batches"] - before["batches"] < n


def test_bad_inputs_are_4xx_with_a_reason(server):
    png = {"Content-Type": "image/png"}
    cases = [
        (dict(data=b"", headers=png), 400, "empty body"),
        (dict(data=b"GIF89a? not really", headers=png), 400, "not a decodable image"),
        (dict(data=_png((300, 300))[:200], headers=png), 400, "undecodable image"),  # truncated
        (dict(data=_png((1200, 1000)), headers=png), 413, "decompression bomb"),  # 1.2 M px > --max-pixels
        (dict(data=os.urandom(400_000), headers=png), 413, "above the limit"),  # body > --max-bytes
        (dict(data=b"{not json", headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
        (dict(json={"images": []}), 422, "at least one image"),
        (dict(json={"images": ["@@@"]}), 400, "base64"),
        (dict(json={"images": [base64.b64encode(b"text").decode()]}), 400, "image 0: not a decodable image"),
    ]
    for kwargs, status, reason in cases:
        r = requests.post(server + "/predict", timeout=60, **kwargs)
        assert r.status_code == status, (reason, r.status_code, r.text)
        assert reason in r.json()["detail"], (reason, r.text)
    assert requests.get(server + "/health", timeout=10).json()["status"] == "ok"
    assert requests.post(server + "/predict", data=_png(), headers=png, timeout=60).status_code == 200


def test_port_in_use_is_one_line_exit_2(tiny_store):
    import socket

    from tests.product.conftest import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        code, _, err = cli("serve", "--port", str(s.getsockname()[1]), store=tiny_store)
    assert code == 2 and "cannot listen on 127.0.0.1" in err and "Traceback" not in err, err
