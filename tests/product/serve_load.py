"""A bounded load test of `locdiff serve` on 127.0.0.1: ``clients`` concurrent clients each POST one body
near ``--max-bytes`` (valid images, JSON of several images, JSON nested ``[`` x N, garbage, images that
decode to too many pixels), while a poller calls ``GET /health``; the server's peak RSS (``VmHWM``) is
compared with its idle RSS.

Used by ``tests/product/test_serve_load.py`` (1 MB bodies) and, for the figures at the default
``--max-bytes`` (16 MiB), run as ``python -m tests.product.serve_load [--max-bytes N] [--clients N]``
(it trains a tiny model in a temporary store first).
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _jpeg(size: int, pad_to: int, seed: int = 0) -> bytes:
    """A small valid JPEG padded with bytes after its end marker (decoders ignore them) to ``pad_to``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 37 % 256, 90, 160)).save(buf, "JPEG")
    data = buf.getvalue()
    return data + b"\0" * max(0, pad_to - len(data))


def _png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (w, h), 0).save(buf, "PNG")
    return buf.getvalue()


def payloads(max_bytes: int, max_request_pixels: int) -> list[tuple[str, bytes, str]]:
    """(kind, body, content type): each body within 2 % of ``max_bytes`` except the pixel-heavy one."""
    near = int(max_bytes * 0.98)
    per = (near * 3 // 4) // 4 - 64  # four base64 images fill the body
    images = [base64.b64encode(_jpeg(96, per, seed=i)).decode() for i in range(4)]
    big = _png(4000, 4000)  # small on the wire, 16 M pixels decoded
    heavy = [base64.b64encode(big).decode()] * (max_request_pixels // (4000 * 4000) + 1)
    return [
        ("jpeg", _jpeg(128, near), "image/jpeg"),
        ("json-4-images", ('{"images": ["' + '", "'.join(images) + '"]}').encode(), "application/json"),
        ("json-nested", b"[" * near, "application/json"),
        ("garbage", os.urandom(near), "image/png"),
        ("json-too-many-pixels", ('{"images": ["' + '", "'.join(heavy) + '"]}').encode(), "application/json"),
    ]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def start_server(store_uri: str, run_key: str, port: int, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "LOCDIFF_STORAGE": store_uri, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "locdiff.cli", "serve", "--model", run_key, "--port", str(port)]
    return subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--device", "cpu", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError("the server did not become healthy")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_load(url: str, pid: int, bodies: list, clients: int = 200, timeout: float = 300) -> dict:
    """``clients`` threads, released together, each POST one body (round-robin over ``bodies``);
    ``/health`` polled every 0.2 s throughout. Returns the figures."""
    import requests

    warm = [base64.b64encode(_jpeg(64, 0, seed=i)).decode() for i in range(16)]  # a full batch
    for _ in range(2):
        requests.post(url + "/predict", json={"images": warm}, timeout=120).raise_for_status()
    idle = rss_kib(pid)
    statuses: Counter = Counter()
    by_kind: dict[str, Counter] = {}
    errors: list[str] = []
    health = {"ok": 0, "failed": 0, "max_s": 0.0}
    done = threading.Event()
    start = threading.Barrier(clients)
    lock = threading.Lock()

    def poll() -> None:
        while not done.is_set():
            t = time.monotonic()
            try:
                ok = requests.get(url + "/health", timeout=10).status_code == 200
            except requests.RequestException:
                ok = False
            with lock:
                health["ok" if ok else "failed"] += 1
                health["max_s"] = max(health["max_s"], time.monotonic() - t)
            time.sleep(0.2)

    def client(i: int) -> None:
        kind, body, ctype = bodies[i % len(bodies)]
        start.wait()
        try:
            r = requests.post(url + "/predict", data=body, headers={"Content-Type": ctype}, timeout=timeout)
            code = r.status_code
            if code == 503 and "Retry-After" not in r.headers:
                errors.append(f"{kind}: 503 without Retry-After")
        except requests.RequestException as exc:
            code = f"error ({type(exc).__name__})"
            errors.append(f"{kind}: {exc}"[:200])
        with lock:
            statuses[code] += 1
            by_kind.setdefault(kind, Counter())[code] += 1

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.monotonic() - t0
    done.set()
    poller.join(timeout=15)
    return {
        "idle_rss_mib": idle / 1024,
        "peak_rss_mib": rss_kib(pid, "VmHWM") / 1024,
        "statuses": dict(statuses),
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "errors": errors[:10],
        "health": health,
        "wall_s": wall,
    }


def tiny_run(store_uri: str) -> str:
    """A tiny trained run on 1280-d synthetic embeddings (the offline encoder's width)."""
    from locdiff.stages.runs import train_run
    from locdiff.storage import Store
    from tests.flows.conftest import run_inputs, synthetic_embeddings, tiny_config

    store = Store.from_uri(store_uri)
    emb = synthetic_embeddings(store, n=200, dim=1280, encoder="efficientnet-lite0")
    cfg = tiny_config(embed_dim=1280, max_steps=20, checkpoint_every=0, log_every=10)
    return train_run(store, emb, cfg, **run_inputs(store_uri, emb, cfg), preset="tiny")


def main() -> None:
    import argparse
    import json
    import tempfile

    from locdiff.stack import free_port

    p = argparse.ArgumentParser()
    p.add_argument("--max-bytes", type=int, default=16 << 20)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--max-request-pixels", type=int, default=100_000_000)
    p.add_argument(
        "--reference", action="store_true", help="also run without admission limits (as before), for a ratio"
    )
    a = p.parse_args()
    runs = {"limited": []}
    if a.reference:  # effectively no limit on requests in progress or on their bodies
        runs["unlimited"] = ["--max-inflight", "1000000", "--max-inflight-bytes", str(1 << 50)]
    out = {}
    with tempfile.TemporaryDirectory(prefix="locdiff-load-") as tmp:
        uri = "file://" + tmp
        run = tiny_run(uri)
        bodies = payloads(a.max_bytes, a.max_request_pixels)
        for name, extra in runs.items():
            port = free_port(None)
            args = ["--max-bytes", str(a.max_bytes), "--max-request-pixels", str(a.max_request_pixels)]
            args += ["--max-pixels", str(min(40_000_000, a.max_request_pixels)), *extra]
            proc = start_server(uri, run, port, args)
            try:
                wait_healthy(f"http://127.0.0.1:{port}", proc)
                figs = run_load(f"http://127.0.0.1:{port}", proc.pid, bodies, clients=a.clients)
            finally:
                stop_server(proc)
            figs["growth_mib"] = figs["peak_rss_mib"] - figs["idle_rss_mib"]
            out[name] = figs
    out["max_bytes"], out["max_inflight_bytes"] = a.max_bytes, 4 * a.max_bytes
    if a.reference:
        out["growth_ratio_limited_over_unlimited"] = (
            out["limited"]["growth_mib"] / out["unlimited"]["growth_mib"]
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
