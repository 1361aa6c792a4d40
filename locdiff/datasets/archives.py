"""Bounds on what an image archive may expand to, checked from its headers before anything is written
(``prepare --archive`` calls :func:`check_archive` before it extracts):

- **Compression ratio.** A zip member larger than :data:`RATIO_FLOOR_BYTES` may expand to at most
  :data:`MAX_COMPRESSION_RATIO` x its compressed size. Tar members carry no compressed size, so for a
  tar (gzip/bzip2/xz or plain) the members declared so far may add up to at most that ratio x the
  archive's size (plus the floor); the check runs on each member's header, before its data is
  decompressed, so a bomb is refused without being inflated. Photos barely compress (JPEG, PNG, WebP:
  ~1x); a 1 GiB member of zeros compresses ~1000x.
- **Free disk.** The declared total must fit in the target file system's free space minus
  :data:`FREE_SPACE_MARGIN_BYTES`.

A refusal is an ``UnsafeArchiveError`` (one line, naming the member and the bound).
"""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from pathlib import Path

from locdiff.datasets.download import CorruptArchiveError, UnsafeArchiveError

MAX_COMPRESSION_RATIO = 100
RATIO_FLOOR_BYTES = 1 << 20  # members (and tar totals) below this are never refused for their ratio
FREE_SPACE_MARGIN_BYTES = 1 << 30


def _refuse_ratio(archive: Path, what: str, size: int, packed: int) -> None:
    if size > RATIO_FLOOR_BYTES and size > MAX_COMPRESSION_RATIO * max(packed, 1):
        raise UnsafeArchiveError(
            f"{archive}: {what} expands {size:,} bytes from {packed:,} (more than {MAX_COMPRESSION_RATIO}x: "
            "a decompression bomb?); nothing was extracted",
            "extract it yourself and pass --images-root if the archive is trusted",
        )


def check_archive(archive: str | os.PathLike, target_dir: str | os.PathLike) -> int:
    """Check ``archive``'s declared sizes against the ratio bound and ``target_dir``'s free space (the
    folder, or the nearest existing one above it); returns the declared total in bytes."""
    archive = Path(archive)
    total = 0
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        name, size = f"member {info.filename!r}", info.file_size
                        _refuse_ratio(archive, name, size, info.compress_size)
                        total += size
        else:
            packed = archive.stat().st_size
            with tarfile.open(archive, "r:*") as tf:
                for m in tf:  # headers one by one: the data of a refused member is never inflated
                    total += max(0, m.size)
                    _refuse_ratio(archive, f"member {m.name!r} (and those before it)", total, packed)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        if isinstance(exc, PermissionError | FileNotFoundError):
            raise
        raise CorruptArchiveError(
            f"{archive}: truncated or corrupt archive ({type(exc).__name__}: {exc})"[:400],
            "download the archive again (and check its checksum)",
        ) from None
    where = Path(target_dir)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if total > free - FREE_SPACE_MARGIN_BYTES:
        raise UnsafeArchiveError(
            f"{archive}: expands to {total:,} bytes but {where} has {free:,} free "
            f"(less a {FREE_SPACE_MARGIN_BYTES >> 30} GiB margin); nothing was extracted",
            "free some space, or extract it elsewhere and pass --images-root",
        )
    return total
