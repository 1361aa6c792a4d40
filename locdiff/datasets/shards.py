"""Dataset artifacts: images in tar shards plus one Parquet manifest (the format every dataset uses).

A committed ``datasets/<name>/<hash>`` artifact holds::

    manifest.parquet            one row per usable image (DATASET_COLUMNS + any extra source fields)
    shards/shard-00000.tar      plain POSIX tar, members ``<index>.<ext>`` (ids may hold any character)
    shards/shard-00000.parquet  the shard's index: its manifest rows plus the skipped ones (status/error)

Manifest rows carry ``offset``/``size`` of the member's bytes inside its tar, so a reader can fetch one
image with a single ranged read (:func:`read_image`) or stream a shard (:func:`iter_shard`).
Every shard (tar + index) is committed as a part, so an interrupted build resumes shard by shard.
The artifact's ``manifest.json`` gets ``rows``, ``n_skipped``, ``skipped`` (id, source, reason; first
1000) and per-split counts.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from locdiff.storage import ArtifactWriter, Store

SHARD_DIR = "shards"
MANIFEST_FILE = "manifest.parquet"
DEFAULT_SHARD_SIZE = 1000
MAX_SKIPPED_LISTED = 1000

# Columns of manifest.parquet, in order; extra source fields follow them.
DATASET_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("member", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("source", pa.string()),
    ]
)
DATASET_COLUMNS = DATASET_SCHEMA.names
_INDEX_SCHEMA = DATASET_SCHEMA.append(pa.field("status", pa.string())).append(pa.field("error", pa.string()))


@dataclass
class ImageRecord:
    """One image to put in a dataset. ``data`` may be bytes or a zero-argument callable returning them
    (called only when its shard is not already finished, so resumed builds skip the work); a callable
    may raise :class:`SkipImage` (or any ``OSError``/``ValueError``) to skip the image with a reason."""

    image_id: str
    lat: float
    lon: float
    data: bytes | Callable[[], bytes] | None
    split: str = "train"
    ext: str = "jpg"
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class SkipImage(Exception):
    """Raised by a record's data callable to skip that image (the message is the listed reason)."""


class TransientFailure(SkipImage):
    """A skip that may succeed later (timeouts, resets, 5xx): the shard index marks the row ``failed``
    (not ``skipped``), so a later build of the same rows fetches it again instead of reusing the gap."""


def shard_relpath(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:05d}.tar"


def check_image(data: bytes) -> tuple[int, int]:
    """Decode an image fully; returns (width, height). Raises ValueError (an ``ImageError``) naming
    the problem, for anything Pillow cannot decode safely (decompression bombs included)."""
    from locdiff.datasets.images import decode_image

    with decode_image(data) as im:
        return im.size


def _write_tar(fobj, members: list[tuple[str, bytes]]) -> list[tuple[int, int]]:
    """Write a tar with the given members; returns (data offset, size) of each member."""
    out = []
    with tarfile.open(fileobj=fobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0  # deterministic shards
            header_at = fobj.tell()
            tar.addfile(info, io.BytesIO(data))
            # A ustar header is one 512-byte block (names are short, so no extension headers).
            out.append((header_at + tarfile.BLOCKSIZE, len(data)))
    return out


class _Counter:
    """A write-only file wrapper that counts bytes (tarfile needs tell() for offsets)."""

    def __init__(self, f) -> None:
        self._f = f
        self._n = 0

    def write(self, b) -> int:
        self._f.write(b)
        self._n += len(b)
        return len(b)

    def tell(self) -> int:
        return self._n

    def flush(self) -> None:
        self._f.flush()


def write_shard(
    writer: ArtifactWriter, relpath: str, records: list[ImageRecord], verify: bool = True
) -> pa.Table:
    """Write one tar shard and its index into ``writer`` and commit both as parts; returns the index."""
    rows: dict[str, list] = {n: [] for n in _INDEX_SCHEMA.names}
    payload: list[tuple[str, bytes]] = []
    kept: list[int] = []
    extras: list[dict] = []
    for i, rec in enumerate(records):
        status, error, data = "ok", None, None
        try:
            data = rec.data() if callable(rec.data) else rec.data
            if data is None:
                raise SkipImage("no image data")
            if verify:
                check_image(data)
        except (SkipImage, OSError, ValueError) as exc:
            status = "failed" if isinstance(exc, TransientFailure) else "skipped"
            error = str(exc) or type(exc).__name__
        ext = (rec.ext or "bin").lstrip(".").lower()
        member = f"{len(payload):06d}.{ext}" if status == "ok" else None
        if status == "ok":
            payload.append((member, data))
            kept.append(i)
        for name, value in (
            ("image_id", str(rec.image_id)),
            ("lat", float(rec.lat) if rec.lat is not None else None),
            ("lon", float(rec.lon) if rec.lon is not None else None),
            ("split", rec.split),
            ("shard", relpath if status == "ok" else None),
            ("member", member),
            ("offset", None),
            ("size", None),
            ("source", rec.source or ""),
            ("status", status),
            ("error", error),
        ):
            rows[name].append(value)
        extras.append(rec.extra or {})
    with writer.open(relpath, "wb") as f:
        spans = _write_tar(_Counter(f), payload)
    for (offset, size), i in zip(spans, kept, strict=True):
        rows["offset"][i] = offset
        rows["size"][i] = size
    table = pa.table(rows, schema=_INDEX_SCHEMA)
    extra_names = sorted({k for e in extras for k in e} - set(_INDEX_SCHEMA.names))
    for name in extra_names:
        table = table.append_column(name, pa.array([e.get(name) for e in extras]))
    writer.commit_part(relpath, rows=len(kept))
    index_rel = relpath[: -len(".tar")] + ".parquet"
    writer.write_table(index_rel, table)
    writer.commit_part(index_rel, rows=len(kept))
    return table


def _read_index(writer: ArtifactWriter, relpath: str) -> pa.Table | None:
    index_rel = relpath[: -len(".tar")] + ".parquet"
    if not (writer.part_done(relpath) and writer.part_done(index_rel)):
        return None
    with writer.open_part(index_rel) as f:
        return pq.read_table(f)


def write_dataset(
    writer: ArtifactWriter,
    records: Iterable[ImageRecord],
    shard_size: int = DEFAULT_SHARD_SIZE,
    verify: bool = True,
    progress: Callable[[int, int], None] | None = None,
    prefetch: Callable[[list[ImageRecord]], None] | None = None,
) -> dict:
    """Write ``records`` as shards of ``shard_size`` plus ``manifest.parquet``; resumes finished shards.

    Records are grouped into shards in input order, so the same input gives the same shards; a shard
    finished by an earlier attempt of the same key is reused without touching its records' data.
    ``prefetch(batch)`` (optional) is called on a shard's records just before that shard is written
    (not for reused shards): the place to fetch their data concurrently.
    Returns (and sets on the manifest) the summary: rows, n_skipped, skipped (first 1000),
    skip_reasons (count per reason, the text before any parenthesis), split counts, shards.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    indexes: list[pa.Table] = []
    batch: list[ImageRecord] = []
    n_shards = 0
    reused = 0

    def flush() -> None:
        nonlocal n_shards, reused
        rel = shard_relpath(n_shards)
        idx = _read_index(writer, rel)
        if idx is None:
            if prefetch is not None:
                prefetch(batch)
            idx = write_shard(writer, rel, batch, verify=verify)
        else:
            reused += 1
        indexes.append(idx)
        n_shards += 1
        if progress is not None:
            progress(n_shards, sum(t.num_rows for t in indexes))

    for rec in records:
        batch.append(rec)
        if len(batch) >= shard_size:
            flush()
            batch = []
    if batch or n_shards == 0:
        flush()
    return summarize_dataset(writer, indexes, reused)


def summarize_dataset(writer: ArtifactWriter, indexes: list[pa.Table], reused: int = 0) -> dict:
    """Write ``manifest.parquet`` from the shard indexes (in shard order) and set the summary fields:
    rows, n_skipped, n_failed (transient failures, part of n_skipped), skipped (first 1000),
    skip_reasons (count per reason, the text before any parenthesis), splits, n_shards, shards_reused."""
    n_shards = len(indexes)
    index = pa.concat_tables(indexes, promote_options="default") if indexes else None
    ok_mask = pc.equal(index["status"], "ok")
    ok = index.filter(ok_mask).drop_columns(["status", "error"])
    bad = index.filter(pc.invert(ok_mask))
    writer.write_table(MANIFEST_FILE, ok)
    skipped = [
        {"image_id": i, "source": s, "reason": e}
        for i, s, e in zip(
            bad["image_id"].to_pylist(), bad["source"].to_pylist(), bad["error"].to_pylist(), strict=True
        )
    ]
    reasons: dict[str, int] = {}
    for s in skipped:
        r = (s["reason"] or "").split(" (", 1)[0]
        reasons[r] = reasons.get(r, 0) + 1
    splits: dict[str, int] = {}
    for s in ok["split"].to_pylist():
        splits[s] = splits.get(s, 0) + 1
    summary = {
        "rows": ok.num_rows,
        "n_skipped": len(skipped),
        "n_failed": int(pc.sum(pc.equal(bad["status"], "failed")).as_py() or 0),
        "skipped": skipped[:MAX_SKIPPED_LISTED],
        "skip_reasons": reasons,
        "splits": splits,
        "n_shards": n_shards,
        "shards_reused": reused,
    }
    writer.set(**summary)
    return summary


# --------------------------------------------------------------------------------------------- reading
def read_manifest(store: Store, key: str, columns: list[str] | None = None) -> pa.Table:
    """The ``manifest.parquet`` of a committed dataset artifact."""
    return store.read_table(key, MANIFEST_FILE, columns=columns)


def read_image(store: Store, key: str, shard: str, offset: int, size: int) -> bytes:
    """One image's bytes by its manifest row (shard, offset, size): a single ranged read."""
    with store.open(key, shard) as f:
        f.seek(int(offset))
        data = f.read(int(size))
    if len(data) != int(size):
        raise ValueError(f"{key}/{shard}: short read at offset {offset} ({len(data)} of {size} bytes)")
    return data


def iter_shard(store: Store, key: str, shard: str) -> Iterator[tuple[str, bytes]]:
    """Stream (member name, bytes) of one shard in order."""
    with store.open(key, shard) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            fobj = tar.extractfile(info)
            yield info.name, fobj.read() if fobj is not None else b""


def shards(store: Store, key: str) -> list[str]:
    """The tar shards of a committed dataset, in order."""
    return [r for r in store.files(key) if r.startswith(SHARD_DIR + "/") and r.endswith(".tar")]
