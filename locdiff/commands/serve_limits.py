"""What `locdiff serve` lets concurrent requests hold, so that abuse costs a bounded amount of memory and
CPU and is answered, never a 500:

- **Admission** (:class:`Admission`): at most ``max_requests`` requests are in progress at once, and
  their bodies hold at most ``max_body_bytes`` in total (reserved from ``Content-Length`` before a byte
  is read, else as the chunks arrive). A request that does not fit is answered ``503`` with
  ``Retry-After`` after its body is read and dropped (at most ``--max-bytes`` of it: a client that is
  still sending then gets the answer, not a reset connection).
- **JSON shape** (:func:`check_json_containers`): a JSON body must be ``{"images": [...]}``; more than
  :data:`MAX_JSON_CONTAINERS` arrays/objects is refused before parsing, which also bounds the nesting
  depth (a ``[`` x 100,000 body would exhaust the parser's recursion).
- **Pixel work** (:func:`request_pixels`): the pixels a request's images decode to (JPEGs at the reduced
  DCT scale the decoder uses) are summed from the headers, before any image is decoded, and a request
  above ``--max-request-pixels`` is a 413.

The documented budget of peak memory above the idle (warmed-up) process is then
:func:`peak_budget_bytes`: 2 x ``--max-inflight-bytes`` (a body and its base64-decoded images) +
``decode_workers`` images of at most ``--max-pixels`` being decoded (4 bytes a pixel at worst) +
:data:`CONNECTION_BYTES` per open connection (what uvicorn and asyncio buffer before the app reads:
h11's 64 KiB high-water mark + one 256 KiB ``recv``) + 16 MiB. ``tests/product/test_serve_load.py``
checks it under 200 concurrent clients.
"""

from __future__ import annotations

import io

MAX_JSON_CONTAINERS = 8  # {"images": [...]} holds 2
RETRY_AFTER_S = 1
CONNECTION_BYTES = (64 + 256) << 10
SLACK_BYTES = 16 << 20


def peak_budget_bytes(max_inflight_bytes: int, decode_workers: int, max_pixels: int, connections: int) -> int:
    """How far the server's peak RSS may rise above its idle RSS (see the module docstring)."""
    decoding = decode_workers * max_pixels * 4
    return 2 * max_inflight_bytes + decoding + connections * CONNECTION_BYTES + SLACK_BYTES


class Admission:
    """Counts the requests in progress and the body bytes they hold (one event loop: no lock)."""

    def __init__(self, max_requests: int, max_body_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_body_bytes = max_body_bytes
        self.requests = 0
        self.body_bytes = 0
        self.refused = 0

    def enter(self) -> bool:
        if self.requests >= self.max_requests:
            self.refused += 1
            return False
        self.requests += 1
        return True

    def leave(self, body_bytes: int) -> None:
        self.requests -= 1
        self.body_bytes -= body_bytes

    def reserve(self, n: int) -> bool:
        if self.body_bytes + n > self.max_body_bytes:
            self.refused += 1
            return False
        self.body_bytes += n
        return True


def check_json_containers(body: bytes | bytearray) -> int:
    """The number of JSON arrays/objects a body opens (``[`` and ``{`` outside base64, which has none);
    ``ValueError`` when above :data:`MAX_JSON_CONTAINERS`. Counted with ``bytes.count``: linear, in C."""
    n = body.count(b"[") + body.count(b"{")
    if n > MAX_JSON_CONTAINERS:
        raise ValueError(
            f'JSON body opens {n:,} arrays/objects (at most {MAX_JSON_CONTAINERS}); send {{"images": [...]}}'
        )
    return n


def request_pixels(datas: list, draft: int | None) -> int:
    """The pixels ``datas`` (image bytes) decode to, read from their headers only (no pixel is decoded;
    an unreadable header counts 0 and is refused by the decoder later). JPEGs count at the DCT scale
    ``decode_image(..., draft=draft)`` decodes them at."""
    from PIL import Image

    total = 0
    for data in datas:
        try:
            with Image.open(io.BytesIO(bytes(data))) as im:
                if draft and im.format == "JPEG":
                    im.draft("RGB", (draft, draft))
                w, h = im.size
        except Exception:  # noqa: BLE001 - hostile bytes: the decoder names the problem
            continue
        total += max(0, w) * max(0, h)
    return total
