"""Load test of `locdiff serve` on loopback: dynamic batching vs one request at a time.

The server (FastAPI + uvicorn, ``locdiff.commands.serve.create_app``) runs in a child process with the
``cpu`` preset (random weights: throughput does not depend on training) and the offline
EfficientNet-Lite0 encoder, or ``--model`` from the store. ``--clients`` concurrent clients (aiohttp)
each POST a 256 px Blue Marble JPEG tile, wait for the answer, and repeat for ``--seconds``. Reported:
requests/s, p50/p99 latency, errors — first with dynamic batching (``--max-batch``), then the same with
``max_batch=1`` (each request its own forward pass) as the reference, and the ratio.

Run: ``.venv/bin/python benchmarks/bench_serve.py [--clients 16] [--seconds 20] [--max-batch 16]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def serve_child(args) -> None:
    import torch
    import uvicorn

    from benchmarks.bench_predict import _model
    from locdiff.commands.serve import ServeConfig, create_app

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", str(min(2, os.cpu_count() or 1)))))
    m = _model(args)
    cfg = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    uvicorn.run(create_app(m, cfg), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


async def load(url: str, body: bytes, clients: int, seconds: float) -> dict:
    import aiohttp

    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(session) -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"Content-Type": "image/jpeg"}) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                lat.append(time.perf_counter() - t)
            else:
                errors += 1

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        await asyncio.gather(*(client(s) for _ in range(clients)))
    wall = time.perf_counter() - t0
    lat.sort()
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else float("nan")  # noqa: E731
    return {"rps": len(lat) / wall, "n": len(lat), "errors": errors, "p50": pick(0.5), "p99": pick(0.99)}


def run_one(args, max_batch: int, body: bytes) -> tuple[dict, dict]:
    import requests

    from locdiff.stack import free_port

    port = free_port(None)
    cmd = [sys.executable, __file__, "--child", "--port", str(port), "--max-batch", str(max_batch)]
    cmd += ["--max-wait-ms", str(args.max_wait_ms), "--device", args.device]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(url + "/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.3)
        asyncio.run(load(url + "/predict", body, args.clients, 2.0))  # warm-up
        res = asyncio.run(load(url + "/predict", body, args.clients, args.seconds))
        health = requests.get(url + "/health", timeout=5).json()
        return res, health
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--storage", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        serve_child(args)
        return

    from locdiff.datasets.bluemarble import crop_tiles, encode_jpeg

    body = encode_jpeg(crop_tiles([48.85], [2.35], tile_deg=4.0, size_px=256)[0])
    print(
        f"{args.clients} concurrent clients x {args.seconds:.0f} s on 127.0.0.1, one {len(body):,}-byte JPEG "
        f"per request; model {args.model or 'cpu preset (random weights)'} on {args.device}"
    )
    results = {}
    for label, mb in (("batched", args.max_batch), ("single", 1)):
        res, health = run_one(args, mb, body)
        results[label] = res
        per_batch = health["images"] / max(1, health["batches"])
        print(
            f"{label:<8} (max_batch {mb:>2}): {res['rps']:7.1f} req/s  p50 {res['p50']:7.1f} ms  "
            f"p99 {res['p99']:7.1f} ms  errors {res['errors']}  ({res['n']} ok; "
            f"{per_batch:.1f} images per forward pass)"
        )
    print(f"ratio batched / single throughput: {results['batched']['rps'] / results['single']['rps']:.2f}x")


if __name__ == "__main__":
    main()
