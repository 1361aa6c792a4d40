"""Image download: ours (``locdiff datasets prepare`` on a URL manifest) against img2dataset and two floors,
all in one run, against one local fault-injecting server.

The server (``tests.servers``, in its own process) answers ``/img/<n>.jpg`` with synthetic JPEGs of varied
sizes (about 320x240 to 1600x1200), after a latency drawn in ``--latency`` (default 50-200 ms), with 5 %
of the paths dead (404), 1 % of the requests reset and 1 % stalled for 5 s (``--p-dead``, ``--p-reset``,
``--p-stall``). Every method writes images whose shortest side is 224 (aspect kept, never enlarged),
JPEG quality 95, into 1000-image tar shards.

- network floor: a plain asyncio/aiohttp fetch of the same URLs, ``--concurrency`` in flight, bodies
  kept in memory, no decoding, no retry; also the same with a thread pool of ``requests`` sessions.
- CPU floor: decode + resize + encode + tar of the bodies the network floor fetched, by ``--processes``
  processes, no network.
- ours: ``prepare_from_manifest`` on a ``IMG_ID,URL,LAT,LON`` manifest into a fresh store.
- img2dataset: its CLI, ``--processes_count`` x ``--thread_count`` = the same concurrency, webdataset
  output, ``resize_mode=keep_ratio``, ``resize_only_if_bigger``, 2 retries, no EXIF and no hashes (work
  we do not do). It is not a dependency of this project; install it in its own environment::

      python3.11 -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset
      python benchmarks/bench_download.py --img2dataset /tmp/i2d/bin/img2dataset

Prints one table (images/s of each method, its ratio to img2dataset and to the network floor).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers import Chaos, chaos_server  # noqa: E402


def network_floor(urls: list[str], concurrency: int) -> tuple[float, list[bytes]]:
    import aiohttp

    async def run():
        conn = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=20)
        sem = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:

            async def one(u):
                async with sem:
                    try:
                        async with s.get(u) as r:
                            return await r.read() if r.status == 200 else None
                    except (aiohttp.ClientError, OSError, TimeoutError):
                        return None

            return await asyncio.gather(*(one(u) for u in urls))

    t = time.perf_counter()
    bodies = asyncio.run(run())
    return time.perf_counter() - t, [b for b in bodies if b]


def thread_floor(urls: list[str], threads: int) -> tuple[float, int]:
    import threading

    import requests

    local = threading.local()

    def one(u):
        s = getattr(local, "s", None) or requests.Session()
        local.s = s
        try:
            r = s.get(u, timeout=20)
            return r.status_code == 200
        except requests.RequestException:
            return False

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        ok = sum(pool.map(one, urls))
    return time.perf_counter() - t, ok


def _resize(data: bytes) -> bytes:
    from locdiff.datasets.images import process_image

    return process_image(data, 224, 95)[0]


def cpu_floor(bodies: list[bytes], processes: int, out: Path) -> float:
    t = time.perf_counter()
    with ProcessPoolExecutor(processes) as pool:
        resized = list(pool.map(_resize, bodies, chunksize=16))
    for s in range(0, len(resized), 1000):
        with tarfile.open(out / f"cpu-{s // 1000:05d}.tar", "w") as tar:
            for i, data in enumerate(resized[s : s + 1000]):
                info = tarfile.TarInfo(f"{s + i:09d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return time.perf_counter() - t


def ours(manifest: Path, store_dir: Path, concurrency: int, processes: int) -> tuple[float, dict]:
    from locdiff.datasets.downloader import DownloadOptions
    from locdiff.datasets.prepare import prepare_from_manifest
    from locdiff.storage import Store

    store = Store.from_uri("file://" + str(store_dir))
    opts = DownloadOptions(concurrency=concurrency, per_host=concurrency, processes=processes)
    t = time.perf_counter()
    key = prepare_from_manifest(store, "bench", manifest, download=opts, max_skip_share=1.0)
    return time.perf_counter() - t, store.manifest(key)


def img2dataset(exe: str, manifest: Path, out: Path, concurrency: int, processes: int) -> tuple[float, int]:
    args = [
        exe, "--url_list", str(manifest), "--input_format", "csv", "--url_col", "URL",
        "--output_format", "webdataset", "--output_folder", str(out), "--image_size", "224",
        "--resize_mode", "keep_ratio", "--resize_only_if_bigger", "True", "--encode_quality", "95",
        "--processes_count", str(processes), "--thread_count", str(max(1, concurrency // processes)),
        "--number_sample_per_shard", "1000", "--retries", "2", "--timeout", "20",
        "--extract_exif", "False", "--compute_hash", "None", "--enable_wandb", "False",
    ]  # fmt: skip
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    t = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"img2dataset failed ({proc.returncode}): {proc.stderr[-2000:]}")
    ok = sum(json.loads(p.read_text()).get("successes", 0) for p in out.glob("*_stats.json"))
    return wall, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="URLs")
    ap.add_argument("--latency", default="0.05,0.2", help="LO,HI seconds per answer")
    ap.add_argument("--p-dead", type=float, default=0.05)
    ap.add_argument("--p-reset", type=float, default=0.01)
    ap.add_argument("--p-stall", type=float, default=0.01)
    ap.add_argument("--stall-s", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--img2dataset", default=shutil.which("img2dataset"), help="its executable")
    ap.add_argument("--skip-img2dataset", action="store_true")
    a = ap.parse_args()
    lo, hi = (float(x) for x in a.latency.split(","))
    chaos = Chaos((lo, hi), a.p_dead, a.p_reset, a.p_stall, a.stall_s)
    if not a.skip_img2dataset and not a.img2dataset:
        raise SystemExit("img2dataset not found: pass --img2dataset PATH (see the module docstring)")
    work = Path(tempfile.mkdtemp(prefix="bench-download-"))
    rows: list[tuple[str, float, int, str]] = []
    try:
        with chaos_server(work, chaos, synthetic=64) as url:
            urls = [f"{url}/img/{i}.jpg" for i in range(a.n)]
            manifest = work / "list.csv"
            manifest.write_text(
                "IMG_ID,URL,LAT,LON\n" + "".join(f"{i},{u},{i % 90},{i % 180}\n" for i, u in enumerate(urls))
            )
            wall, bodies = network_floor(urls, a.concurrency)
            rows.append(("network floor (aiohttp)", wall, len(bodies), "no retry, no decode"))
            wall, ok = thread_floor(urls, min(a.concurrency, 128))
            rows.append(("network floor (128 threads)", wall, ok, "requests, no retry, no decode"))
            (work / "cpu").mkdir()
            wall = cpu_floor(bodies, a.processes, work / "cpu")
            rows.append(("CPU floor", wall, len(bodies), "decode+resize+encode+tar, no network"))
            wall, man = ours(manifest, work / "store", a.concurrency, a.processes)
            rows.append(("ours", wall, man["rows"], f"{man['n_dead']} dead, {man['n_failed']} failed"))
            if not a.skip_img2dataset:
                wall, ok = img2dataset(a.img2dataset, manifest, work / "i2d", a.concurrency, a.processes)
                note = f"{a.processes} processes x {a.concurrency // a.processes} threads"
                rows.append(("img2dataset", wall, ok, note))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rate = {name: n / wall for name, wall, n, _ in rows}
    print(
        f"\n{a.n} URLs, latency {lo * 1000:.0f}-{hi * 1000:.0f} ms, {a.p_dead:.0%} dead, "
        f"{a.p_reset:.0%} resets, {a.p_stall:.0%} {a.stall_s:g} s stalls; "
        f"concurrency {a.concurrency}, {a.processes} processes, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'method':<28} {'wall s':>7} {'images':>7} {'images/s':>9} {'vs i2d':>7} {'vs net':>7}  notes")
    for name, wall, n, note in rows:
        vs_i2d = f"{rate[name] / rate['img2dataset']:.2f}x" if "img2dataset" in rate else "-"
        vs_net = f"{rate[name] / rate['network floor (aiohttp)']:.2f}x"
        print(f"{name:<28} {wall:7.1f} {n:7d} {rate[name]:9.1f} {vs_i2d:>7} {vs_net:>7}  {note}")


if __name__ == "__main__":
    main()
