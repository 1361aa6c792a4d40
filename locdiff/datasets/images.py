"""Decode one untrusted image safely: every failure becomes an :class:`ImageError` with a reason.

Used wherever user-supplied image bytes are decoded (``prepare``'s check, ``embed``, ``predict``), so
that one hostile or broken image is a skipped row with a reason, never a crash of the batch:
decompression bombs (Pillow's own limit, and ours: more than :data:`MAX_PIXELS` pixels is refused
before any pixel is decoded), truncated or corrupt files, unknown formats, and any other exception
Pillow raises while decoding.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS (warned there, refused here)
MAX_IMAGE_BYTES = 64 << 20  # one image file read from a user path (prepare, predict)
MAX_CHECKPOINT_BYTES = 8 << 30  # a checkpoint file handed to predict/serve (an mp16 run's is ~0.5 GB)
MAX_MANIFEST_BYTES = 4 << 30  # a local manifest prepare loads whole (MP16's joined CSV is ~0.5 GB)


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is short and fit for a skipped-row listing;
    ``too_large`` tells a size refusal (a server answers 413) from a broken file (400)."""

    def __init__(self, reason: str, too_large: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.too_large = too_large


def read_user_file(path: str | os.PathLike, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a local file a user named (an image, a checkpoint), bounded: a FIFO, device, socket
    or folder is an :class:`ImageError` at once (opened non-blocking and checked with ``fstat``, so a
    named pipe never blocks the reader), and so is a file over ``max_bytes`` (never read past it).
    OSErrors of the open itself (not found, permission) pass through."""
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kinds = {stat.S_ISFIFO: "a named pipe", stat.S_ISDIR: "a folder", stat.S_ISSOCK: "a socket"}
        kind = next((k for test, k in kinds.items() if test(mode)), "a device")
        raise ImageError(f"not a regular file ({kind})")
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageError(f"file larger than {max_bytes >> 20} MiB", too_large=True)
    return data


def decode_image(
    src: bytes | bytearray | memoryview | str | os.PathLike,
    *,
    max_pixels: int = MAX_PIXELS,
    draft: int | None = None,
):
    """Open and fully decode an image from bytes or a local path; returns a loaded ``PIL.Image``.

    Raises :class:`ImageError` (a ``ValueError``) for anything that is not a usable image. The caller
    owns the returned image (``with decode_image(b) as im: ...``). ``draft``: a JPEG is decoded at the
    smallest DCT scale still at least ``draft`` pixels on each side (much faster for large photos that
    the encoder shrinks anyway).
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(src, bytes | bytearray | memoryview):
        if not len(src):
            raise ImageError("empty file")
        fp = io.BytesIO(bytes(src))
    else:
        fp = Path(src)
        if not fp.is_file():
            raise ImageError(f"file not found: {fp}")
    try:
        im = Image.open(fp)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb ({exc})", too_large=True) from None
    except UnidentifiedImageError:
        raise ImageError("not a decodable image") from None
    except Exception as exc:  # noqa: BLE001 - hostile input: any failure is this image's problem
        raise ImageError(f"undecodable image ({type(exc).__name__}: {exc})"[:300]) from None
    try:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise ImageError(f"undecodable image (size {width}x{height})")
        if width * height > max_pixels:
            raise ImageError(
                f"decompression bomb ({width}x{height} pixels; the limit is {max_pixels})", too_large=True
            )
        if draft and im.format == "JPEG":
            im.draft("RGB", (draft, draft))
        im.load()  # a full decode: catches truncated files that verify() lets through
    except ImageError:
        im.close()
        raise
    except Exception as exc:  # noqa: BLE001
        im.close()
        if isinstance(exc, Image.DecompressionBombError):
            raise ImageError(f"decompression bomb ({exc})", too_large=True) from None
        raise ImageError(f"undecodable image ({type(exc).__name__}: {exc})"[:300]) from None
    return im


# formats a download small enough is stored in as fetched (and their file extensions)
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def process_image(data: bytes, size: int | None, quality: int) -> tuple[bytes, str]:
    """Check (full decode, bomb limits) and resize one downloaded image; returns (bytes, extension).

    Raises :class:`ImageError` with the reason for anything unusable (the downloader's worker processes
    run it on every fetched image)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as head:  # header only: the original size and format
            w, h, fmt = head.size[0], head.size[1], head.format
    except Exception:  # noqa: BLE001 - decode_image below names the problem
        w = h = 0
        fmt = None
    small = size is None or (0 < min(w, h) <= size)
    with decode_image(data, draft=None if small else size) as im:
        if small and fmt in _KEEP_FORMATS:
            return data, _KEEP_FORMATS[fmt]
        if im.mode != "RGB":
            im = im.convert("RGB")
        iw, ih = im.size
        scale = (size or min(iw, ih)) / min(iw, ih)
        if scale < 1:
            # bilinear with Pillow's support scaled to the reduction (antialiased, like OpenCV's
            # INTER_AREA that img2dataset uses): 35 % less CPU than bicubic, the largest cost here
            im = im.resize((max(1, round(iw * scale)), max(1, round(ih * scale))), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        im.save(out, "JPEG", quality=quality)
        return out.getvalue(), "jpg"
