"""`locdiff serve`: predictions over HTTP (FastAPI + uvicorn) with dynamic batching.

Endpoints:

- ``GET /`` -> a page to drop or choose photos on; it calls ``POST /predict`` for each and shows the
  answers on an offline interactive map (``locdiff.mapview.serve_page``).
- ``GET /health`` -> ``{"status": "ok", "model": RUN_KEY, "device": ..., "max_batch": ..., ...}``
- ``POST /predict`` with one image as the raw body (``Content-Type: image/*`` or
  ``application/octet-stream``; ``curl --data-binary @photo.jpg``), or a JSON body
  ``{"images": ["<base64>", ...]}`` for several -> ``{"model": RUN_KEY, "predictions": [{"lat", "lon",
  "score", "modes": [{"lat", "lon", "mass"}, ...], + every further column the model returns (e.g.
  LocDiff-H, credible radii)}]}``.

Bad input is a 4xx with a reason (``{"detail": ...}``), never a 500: an empty body or a non-image is 400,
a body above ``--max-bytes``, an image above ``--max-pixels`` or a request whose images decode to more
than ``--max-request-pixels`` is 413, a JSON body of the wrong shape (or nested: more than a few
arrays/objects) is 422. A request that would take the server past ``--max-inflight`` requests or
``--max-inflight-bytes`` of bodies is a 503 with ``Retry-After`` (``locdiff.commands.serve_limits``).
Images are decoded on a thread pool per request; the encoder + diffusion run in one inference thread
that takes every image waiting (up to ``--max-batch``, after waiting at most ``--max-wait-ms`` for more
to arrive), so concurrent requests share one forward pass. ``--max-batch 1`` turns batching
off (the reference for the load test, ``benchmarks/bench_serve.py``).
"""

import asyncio
import base64
import binascii
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import typer

from locdiff.errors import UserError

DEFAULT_MAX_BYTES = 16 << 20
DEFAULT_MAX_PIXELS = 40_000_000
MAX_IMAGES_PER_REQUEST = 64
DEFAULT_MAX_INFLIGHT = 32  # requests in progress at once
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000  # decoded pixels per request (~2-3 s of decoding)


@dataclass
class ServeConfig:
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_workers: int = 2
    seed: int = 0
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    max_inflight_bytes: int = 4 * DEFAULT_MAX_BYTES  # bodies of the requests in progress, together
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    body_timeout_s: float = 60.0  # a body not received within this is a 408 (a slow client holds a slot)


class Batcher:
    """Collects preprocessed images from concurrent requests and predicts them together."""

    def __init__(self, model, cfg: ServeConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.queue: asyncio.Queue = asyncio.Queue()
        self.infer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="locdiff-infer")
        self.batches = 0
        self.images = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self.infer_pool.shutdown(wait=False, cancel_futures=True)

    async def submit(self, tensors: list) -> list[dict]:
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in tensors]
        for t, f in zip(tensors, futs, strict=True):
            self.queue.put_nowait((t, f))
        return list(await asyncio.gather(*futs))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch = [first]
            deadline = loop.time() + self.cfg.max_wait_ms / 1000.0
            while len(batch) < self.cfg.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            try:
                rows = await loop.run_in_executor(self.infer_pool, self._infer, [t for t, _ in batch])
            except Exception as exc:  # a bug: report it on each waiting request, keep serving
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(batch)
            for (_, f), row in zip(batch, rows, strict=True):
                if not f.done():
                    f.set_result(row)

    def _infer(self, tensors: list) -> list[dict]:
        import torch

        from locdiff.inference import flatten_predictions, predict_rows

        with torch.inference_mode():
            emb = self.model.encoder(torch.stack(tensors)).cpu().numpy()
        return flatten_predictions(predict_rows(self.model, emb, self.cfg.seed), len(tensors))


def to_json(row: dict) -> dict:
    """A flat prediction row -> the response's object (modes nested)."""
    out: dict = {}
    modes: dict[int, dict] = {}
    for k, v in row.items():
        if k.startswith("mode") and "_" in k and k[4 : k.index("_")].isdigit():
            j = int(k[4 : k.index("_")])
            modes.setdefault(j, {})[k[k.index("_") + 1 :]] = v
        else:
            out[k] = v
    out["modes"] = [
        modes[j] for j in sorted(modes) if modes[j].get("lat") is not None and (modes[j].get("mass") or 0) > 0
    ]
    return out


def create_app(model, cfg: ServeConfig | None = None):
    """The FastAPI app serving ``model`` (a ``locdiff.inference.Model``)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException, Request

    from locdiff.commands.serve_limits import RETRY_AFTER_S, Admission, request_pixels
    from locdiff.datasets.images import ImageError
    from locdiff.inference import image_tensor

    cfg = cfg or ServeConfig()
    admission = Admission(cfg.max_inflight, cfg.max_inflight_bytes)
    decode_pool = ThreadPoolExecutor(
        max_workers=max(1, cfg.decode_workers), thread_name_prefix="locdiff-decode"
    )
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        batcher = Batcher(model, cfg)
        batcher.start()
        state["batcher"] = batcher
        state["started"] = time.time()
        yield
        await batcher.stop()
        decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="locdiff", lifespan=lifespan)

    def decode(data: bytes, index: int | None):
        where = "" if index is None else f"image {index}: "
        try:
            return image_tensor(data, model.encoder.preprocess, cfg.max_pixels)
        except ImageError as exc:  # the shared safe decoder: every failure is one of these
            hint = "" if exc.too_large else " (send JPEG, PNG or WebP bytes)"
            raise HTTPException(413 if exc.too_large else 400, where + exc.reason + hint) from None

    def busy(what: str) -> HTTPException:
        return HTTPException(
            503, f"busy: {what}; retry in {RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)}
        )

    async def read_body(request: Request, held: list[int], admitted: bool) -> bytearray:
        """The body, streamed against ``--max-bytes`` within ``body_timeout_s``; its bytes are reserved
        from the in-flight budget (``held[0]``), and a request that is not admitted or does not fit is
        read to the end, dropped, and answered 503."""
        length = request.headers.get("content-length")
        refused = None if admitted else f"{cfg.max_inflight} requests in progress"
        full = "the bodies of the requests in progress fill the memory budget"
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise HTTPException(400, "bad Content-Length header") from None
            if n > cfg.max_bytes:
                raise HTTPException(413, f"request body is {n:,} bytes, above the limit of {cfg.max_bytes:,}")
            if refused is None and admission.reserve(n):
                held[0] = n
            elif refused is None:
                refused = full
        body, size = bytearray(), 0
        try:
            async with asyncio.timeout(cfg.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > cfg.max_bytes:
                        raise HTTPException(413, f"request body is above the limit of {cfg.max_bytes:,} B")
                    if refused is None and size > held[0]:
                        if admission.reserve(size - held[0]):
                            held[0] = size
                        else:
                            refused, body = full, bytearray()
                    if refused is None:
                        body += chunk  # else read and dropped: the client gets the 503, not a reset
        except TimeoutError:
            raise HTTPException(408, f"the body did not arrive within {cfg.body_timeout_s:g} s") from None
        if refused is not None:
            raise busy(refused)
        return body

    @app.get("/", include_in_schema=False)
    async def page():
        from fastapi.responses import HTMLResponse

        from locdiff.mapview import serve_page

        return HTMLResponse(serve_page())

    @app.get("/health")
    async def health() -> dict:
        b = state.get("batcher")
        return {
            "status": "ok",
            "model": model.run_key,
            "device": model.device,
            "max_batch": cfg.max_batch,
            "max_wait_ms": cfg.max_wait_ms,
            "max_bytes": cfg.max_bytes,
            "max_pixels": cfg.max_pixels,
            "batches": b.batches if b else 0,
            "images": b.images if b else 0,
        }

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        admitted, held = admission.enter(), [0]
        try:
            body = await read_body(request, held, admitted)
            if not body:
                raise HTTPException(400, 'empty body: POST image bytes, or JSON {"images": [base64, ...]}')
            ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
            loop = asyncio.get_running_loop()
            if ctype == "application/json":  # parsed off the event loop: /health keeps answering
                datas = await loop.run_in_executor(decode_pool, _json_images, body)
                indexed = list(enumerate(datas))
            else:
                datas, indexed = [body], [(None, body)]
            draft = getattr(model.encoder.preprocess, "size", None)
            pixels = await loop.run_in_executor(decode_pool, request_pixels, [d for _, d in indexed], draft)
            if pixels > cfg.max_request_pixels:
                limit = cfg.max_request_pixels
                raise HTTPException(
                    413, f"the images decode to {pixels:,} pixels, above the limit of {limit:,} per request"
                )
            tensors = await asyncio.gather(
                *(loop.run_in_executor(decode_pool, decode, d, i) for i, d in indexed)
            )
            del body, datas, indexed  # from here on only the tensors are held
            rows = await state["batcher"].submit(list(tensors))
            return {"model": model.run_key, "predictions": [to_json(r) for r in rows]}
        finally:
            if admitted:
                admission.leave(held[0])

    return app


def _json_images(body: bytes) -> list[bytes]:
    import json

    from fastapi import HTTPException

    from locdiff.commands.serve_limits import check_json_containers

    try:
        check_json_containers(body)  # also bounds the nesting depth, before the parser recurses
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(400, "body is not valid JSON") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not images or not all(isinstance(x, str) for x in images):
        raise HTTPException(
            422, 'JSON body must be {"images": ["<base64 image>", ...]} with at least one image'
        )
    if len(images) > MAX_IMAGES_PER_REQUEST:
        raise HTTPException(
            413, f"{len(images)} images in one request, above the limit of {MAX_IMAGES_PER_REQUEST}"
        )
    out = []
    for i, s in enumerate(images):
        try:
            out.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise HTTPException(400, f"image {i}: not valid base64") from None
    return out


def serve_command(
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Run key or name (`locdiff runs list`); default: prod, else the newest run.",
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, help="Port."),
    device: str = typer.Option("auto", help="cpu | cuda | auto."),
    max_batch: int = typer.Option(16, help="Most images per forward pass (1 = no batching)."),
    max_wait_ms: float = typer.Option(5.0, help="How long the first image of a batch waits for others."),
    max_bytes: int = typer.Option(DEFAULT_MAX_BYTES, help="Largest request body (bytes)."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, help="Largest image (width x height)."),
    max_request_pixels: int = typer.Option(
        DEFAULT_MAX_REQUEST_PIXELS, help="Most decoded pixels of one request's images together."
    ),
    max_inflight: int = typer.Option(DEFAULT_MAX_INFLIGHT, help="Most requests in progress (else 503)."),
    max_inflight_bytes: int = typer.Option(
        None, help="Most body bytes of the requests in progress together (else 503); default 4 x --max-bytes."
    ),
    storage: str = typer.Option(
        None, "--storage", help="Store URI (default: $LOCDIFF_STORAGE or data/store)."
    ),
) -> None:
    """Serve predictions over HTTP: POST /predict (image bytes, or JSON of base64 images), GET /health,
    and GET / (a page to drop photos on, with the answers on a map)."""
    import uvicorn

    from locdiff.inference import load_model

    if max_batch < 1 or max_wait_ms < 0 or max_bytes < 1 or max_pixels < 1:
        raise UserError("--max-batch, --max-bytes and --max-pixels must be >= 1, --max-wait-ms >= 0")
    max_inflight_bytes = 4 * max_bytes if max_inflight_bytes is None else max_inflight_bytes
    if max_inflight < 1 or max_inflight_bytes < max_bytes or max_request_pixels < max_pixels:
        raise UserError(
            "--max-inflight must be >= 1, --max-inflight-bytes >= --max-bytes, "
            "--max-request-pixels >= --max-pixels",
            "the defaults: 32 requests, 4 x --max-bytes, 100,000,000 pixels",
        )
    if not 0 < port < 65536:
        raise UserError(f"--port {port} is not a TCP port", "e.g. --port 8000")
    _check_bind(host, port)
    m = load_model(model, storage, None, device)
    cfg = ServeConfig(
        max_batch=max_batch, max_wait_ms=max_wait_ms, max_bytes=max_bytes, max_pixels=max_pixels,
        max_inflight=max_inflight, max_inflight_bytes=max_inflight_bytes,
        max_request_pixels=max_request_pixels,
    )  # fmt: skip
    app = create_app(m, cfg)
    print(
        f"serving {m.run_key} on http://{host}:{port} (device {m.device}, max batch {max_batch})", flush=True
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def _check_bind(host: str, port: int) -> None:
    """Fail in one line, before loading the model, when the address cannot be bound (port taken)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"cannot resolve --host {host!r}: {exc}", "e.g. --host 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            msg = f"cannot listen on {host}:{port}: {exc.strerror}"
            raise UserError(msg, "pick another --port") from None


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
