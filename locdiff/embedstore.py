r"""The embeddings artifact: its layout, writing one part, and its readers (no encoder, no DataLoader).

``embeddings/<dataset>/<encoder>/<hash>`` (built by ``locdiff.stages.embeddings`` from images, or by
``locdiff.datasets.synth`` from a formula) holds, per part::

    parts/part-00000.parquet     image_id, embedding, lat, lon, split   (one per input tar shard)
    arrays/part-00000.emb.npy    float16 [n, dim]  \  the same rows as plain .npy arrays, which the
    arrays/part-00000.lat.npy    float64 [n]        > trainer memory-maps (:func:`open_embeddings`):
    arrays/part-00000.lon.npy    float64 [n]       /  a batch reads its rows, nothing else is loaded
    skipped/part-00000.parquet   image_id, reason                       (images that did not decode)

The Parquet parts are what the DuckDB catalog reads (``embeddings`` view) and where the ids and splits
are; the ``.npy`` arrays are the one copy every reader takes the rows from (``np.load(mmap_mode="r")``
part by part; from S3 each array is fetched once into a local cache named by its checksum, then mapped).

Layout: ``embedding`` is ``fixed_size_list<halffloat>[dim]`` — float16 halves the bytes of float32 and is
what docs/design.md §4 asks for; pyarrow writes it as Parquet's FLOAT16 logical type, which DuckDB 2.x reads
(as ``FLOAT[]``; checked in tests), so the catalog can query embeddings in place. Rows keep the shard's
manifest order.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from locdiff.errors import UserError
from locdiff.storage import ArtifactWriter, Store

PART_DIR = "parts"
SKIP_DIR = "skipped"
ARRAY_DIR = "arrays"
ARRAY_COLUMNS = ("emb", "lat", "lon")


def part_relpath(index: int) -> str:
    return f"{PART_DIR}/part-{index:05d}.parquet"


def array_relpath(index: int, column: str) -> str:
    return f"{ARRAY_DIR}/part-{index:05d}.{column}.npy"


def array_relpath_of(part_rel: str, column: str) -> str:
    stem = part_rel.rsplit("/", 1)[-1].removesuffix(".parquet")
    return f"{ARRAY_DIR}/{stem}.{column}.npy"


def skipped_relpath(index: int) -> str:
    return f"{SKIP_DIR}/part-{index:05d}.parquet"


def part_files(index: int) -> list[str]:
    """Every file one part commits (the Parquet part last)."""
    return [skipped_relpath(index), *(array_relpath(index, c) for c in ARRAY_COLUMNS), part_relpath(index)]


def part_done(w: ArtifactWriter, index: int) -> bool:
    """Whether every file of part ``index`` is committed (by ``w`` or by an earlier attempt)."""
    return all(w.part_done(r) for r in part_files(index))


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("embedding", pa.list_(pa.float16(), dim)),
            ("lat", pa.float64()),
            ("lon", pa.float64()),
            ("split", pa.string()),
        ]
    )


SKIP_SCHEMA = pa.schema([("image_id", pa.string()), ("reason", pa.string())])


# --------------------------------------------------------------------------------------------- writing
def write_arrays(w: ArtifactWriter, index: int, columns: dict[str, np.ndarray]) -> None:
    """Write and commit one part's ``.npy`` arrays (``emb``, ``lat``, ``lon``, or ``code``).

    Rows are checked here, once (finite embeddings, coordinates in range), so that readers can map the
    arrays without scanning them."""
    emb, lat, lon = columns.get("emb"), columns.get("lat"), columns.get("lon")
    if emb is not None and len(emb) and not np.isfinite(emb).all():
        raise ValueError(f"part {index}: the encoder produced NaN/inf embeddings")
    if lat is not None and len(lat) and (np.abs(lat).max() > 90 or np.abs(lon).max() > 180):
        raise ValueError(f"part {index}: coordinates out of range")
    for name, arr in columns.items():
        rel = array_relpath(index, name)
        with w.open(rel, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        w.commit_part(rel, rows=None)


def write_part(
    w: ArtifactWriter,
    index: int,
    ids: list[str],
    emb: np.ndarray,
    lat: np.ndarray,
    lon: np.ndarray,
    split: list[str],
    skipped: list[tuple[str, str]] = (),
) -> None:
    """Write and commit every file of one part (:func:`part_files`, in that order): the skipped list,
    the arrays (float16 ``emb [n, dim]``, float64 ``lat``/``lon``), then the Parquet part."""
    sk, dim = list(skipped), emb.shape[1]
    w.write_table(
        skipped_relpath(index),
        pa.table({"image_id": [s[0] for s in sk], "reason": [s[1] for s in sk]}, schema=SKIP_SCHEMA),
    )
    w.commit_part(skipped_relpath(index), rows=None)
    write_arrays(w, index, {"emb": emb, "lat": lat, "lon": lon})
    table = pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), dim),
            "lat": pa.array(lat, pa.float64()),
            "lon": pa.array(lon, pa.float64()),
            "split": pa.array(split, pa.string()),
        },
        schema=embedding_schema(dim),
    )
    w.write_table(part_relpath(index), table)
    w.commit_part(part_relpath(index), rows=len(ids))


# --------------------------------------------------------------------------------------------- reading
def embedding_parts(store: Store, key: str) -> list[str]:
    return [f for f in store.files(key) if f.startswith(PART_DIR + "/") and f.endswith(".parquet")]


def load_embeddings(store: Store, key: str, split: str | list[str] | None = None):
    """``(image_ids, embeddings float32 [N, dim], lat_deg float64 [N], lon_deg float64 [N])`` (tensors).

    ``split`` keeps one split (or several); rows come in part order, each part in its shard's order.
    They are read from the mapped arrays into one float32 output, part by part (no Arrow
    concatenation, no per-part float32 temporaries beyond one part's selected rows)."""
    import torch

    dim = int(store.manifest(key)["dim"])
    splits = None if split is None else ({split} if isinstance(split, str) else set(split))
    parts = embedding_parts(store, key)
    part_ids, masks = _selection(store, key, parts, splits)
    ids = [i for p in part_ids for i in p]
    n = len(ids)
    emb = torch.empty((n, dim), dtype=torch.float32)
    lat = torch.empty(n, dtype=torch.float64)
    lon = torch.empty(n, dtype=torch.float64)
    maps, o = MappedArrays(store), 0
    for rel, mask in zip(parts, masks, strict=True):
        cols = {c: maps.open(key, array_relpath_of(rel, c)) for c in ARRAY_COLUMNS}
        sel = slice(None) if mask is None else mask
        k = int(cols["lat"].shape[0] if mask is None else mask.sum())
        for out, c in ((emb, "emb"), (lat, "lat"), (lon, "lon")):  # numpy casts into the tensors' memory
            out.numpy()[o : o + k] = cols[c][sel]
        maps.release()
        o += k
    return ids, emb, lat, lon


def _selection(store: Store, key: str, parts: list[str], splits: set | None, with_ids: bool = True):
    """Per part, the image ids (or, without ``with_ids``, only their count) and the row mask (None:
    every row) of the rows of ``splits``."""
    import pyarrow.compute as pc

    ids, masks, present = [], [], set()
    columns = ["image_id", "split"] if with_ids else ["split"]
    for rel in parts:
        t = store.read_table(key, rel, columns=columns)
        if splits is None:
            masks.append(None)
        else:
            present.update(pc.unique(t["split"]).to_pylist())
            m = pc.is_in(t["split"], value_set=pa.array(sorted(splits), pa.string()))
            masks.append(m.to_numpy(zero_copy_only=False))
            t = t.filter(m)
        ids.append(t["image_id"].to_pylist() if with_ids else t.num_rows)
    if splits is not None and not any(ids):
        raise LookupError(f"no embeddings of split(s) {sorted(splits)} in {key}; it has {sorted(present)}")
    return ids, masks


def iter_embeddings(store: Store, key: str, split: str | list[str] | None = None, block_rows: int = 1 << 16):
    """``load_embeddings`` a block at a time, for readers that must not hold a whole split (evaluation):
    ``(n_rows, blocks)`` where ``blocks`` yields ``(image_ids, emb float32 [b, dim], lat float64 [b],
    lon float64 [b])`` numpy blocks of exactly ``block_rows`` rows (the last one shorter), in
    ``load_embeddings`` order. Rows are read from the memory-mapped arrays and ids a part at a time:
    only one part's ids and one block are in memory."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    splits = None if split is None else ({split} if isinstance(split, str) else set(split))
    parts = embedding_parts(store, key)
    counts, masks = _selection(store, key, parts, splits, with_ids=False)  # ids: a part at a time

    def blocks():
        maps, pieces, have = MappedArrays(store), [], 0
        for rel, count, mask in zip(parts, counts, masks, strict=True):
            if not count:
                continue
            ids = store.read_table(key, rel, columns=["image_id"])["image_id"]
            ids = (ids if mask is None else ids.filter(pa.array(mask))).to_pylist()
            cols = {c: maps.open(key, array_relpath_of(rel, c)) for c in ARRAY_COLUMNS}
            rows = np.arange(len(ids)) if mask is None else np.nonzero(mask)[0]
            pos = 0
            while pos < len(rows):
                take = rows[pos : pos + block_rows - have]
                pieces.append((ids[pos : pos + len(take)], *(cols[c][take] for c in ARRAY_COLUMNS)))
                pos, have = pos + len(take), have + len(take)
                if have == block_rows:
                    yield _join_pieces(pieces)
                    pieces, have = [], 0
            maps.release()
        if pieces:
            yield _join_pieces(pieces)

    return sum(counts), blocks()


def _join_pieces(pieces: list[tuple]) -> tuple:
    ids = [i for p in pieces for i in p[0]]
    emb, lat, lon = (np.concatenate([p[j] for p in pieces]) for j in (1, 2, 3))
    return (
        ids,
        emb.astype(np.float32, copy=False),
        lat.astype(np.float64, copy=False),
        lon.astype(np.float64, copy=False),
    )


# --------------------------------------------------------------------------------------------- mapping
MMAP_CACHE_ENV = "LOCDIFF_MMAP_CACHE"


def _mmap_cache_dir() -> str:
    """The local cache of S3 arrays: ``$LOCDIFF_MMAP_CACHE``, else ``<tmp>/locdiff-mmap-<uid>``; created
    with mode 0700 and refused (UserError) unless it is a real folder owned by this user that no one
    else can write (a shared cache could be filled with anything under a checksum's name); every file in
    it is hashed again before it is used (:func:`_cache_ok`)."""
    import stat
    import tempfile

    uid = os.getuid() if hasattr(os, "getuid") else None
    path = os.environ.get(MMAP_CACHE_ENV) or os.path.join(
        tempfile.gettempdir(), "locdiff-mmap" if uid is None else f"locdiff-mmap-{uid}"
    )
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if uid is not None and (not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022):
        raise UserError(
            f"the array cache {path} is not a folder of this user's (uid {uid}) that only it can write",
            f"`chmod 700` it if it is yours, else remove it or point ${MMAP_CACHE_ENV} at a folder of yours",
        )
    return path


# cache file -> (size, mtime_ns, inode, ctime_ns) when this process last hashed it against its checksum
_CACHE_STAMPS: dict[str, tuple[int, int, int, int]] = {}


def _stamp(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def _cache_ok(path: str, sha256: str) -> bool:
    """Whether a cached array holds the bytes of its checksum: hashed whole the first time this process
    uses it, then trusted while its size, mtime, inode and ctime stay as they were when hashed."""
    import fsspec

    from locdiff.storage import hash_file

    try:
        stamp = _stamp(path)
    except FileNotFoundError:
        return False
    if _CACHE_STAMPS.get(path) == stamp:
        return True
    if hash_file(fsspec.filesystem("file"), path)[0] != sha256:
        return False
    _CACHE_STAMPS[path] = stamp
    return True


def _drop_page_cache(path: str) -> None:
    """Drop a file's clean pages from the OS page cache (Linux; elsewhere a no-op). The checksum pass
    reads the file with read-ahead, which leaves it cached in large folios, and a fault on one mapped row
    would then map a whole folio into the process: a random-access run's resident set would grow with
    the table (measured: +37 % peak RSS from 10^5 to 10^6 rows). Dropped, rows fault in 4 KiB pages."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class MappedArrays:
    """Opens the ``.npy`` files of store artifacts as read-only memory maps; :meth:`release` drops the
    pages the maps have touched from this process (they stay in the OS page cache), which keeps the
    resident set of a long random-access run bounded."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.maps: list[np.memmap] = []

    def _local_path(self, key: str, relpath: str) -> str:
        if self.store.is_local:
            path = self.store.fspath(key, relpath)  # checked whole (once per store object), then mapped
            _drop_page_cache(path)
            return path
        import shutil

        entry = next(f for f in self.store.manifest(key)["files"] if f["relpath"] == relpath)
        path = os.path.join(_mmap_cache_dir(), entry["sha256"] + ".npy")  # content-addressed
        if not _cache_ok(path, entry["sha256"]):  # absent, or changed since it was filled: fetch again
            tmp = f"{path}.{os.getpid()}.tmp"
            try:  # the store's reader hashes the bytes as they arrive and raises on a mismatch
                with self.store.open(key, relpath) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 4 << 20)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            _CACHE_STAMPS[path] = _stamp(path)
        _drop_page_cache(path)
        return path

    def open(self, key: str, relpath: str, sequential: bool = False) -> np.ndarray:
        """Map one array: for scattered rows (training batches; no read-ahead) or, with ``sequential``,
        for block-by-block scans (the retrieval gallery; aggressive read-ahead)."""
        import mmap

        arr = np.load(self._local_path(key, relpath), mmap_mode="r", allow_pickle=False)
        advice = "MADV_SEQUENTIAL" if sequential else "MADV_RANDOM"
        if isinstance(arr, np.memmap) and hasattr(mmap, advice) and arr.size:
            arr._mmap.madvise(getattr(mmap, advice))
            self.maps.append(arr)
        return arr

    def release(self) -> None:
        import mmap

        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for arr in self.maps:
            arr._mmap.madvise(mmap.MADV_DONTNEED)


def open_embeddings(
    store: Store,
    key: str,
    split: str | list[str] | None = None,
    targets_key: str | None = None,
    release_every: int = 1,
):
    """The rows of ``split`` (or all) as a memory-mapped ``locdiff_core.data.PartedGeo``, with the
    target cache's codes when ``targets_key`` is given. Only the ``split`` column of each Parquet
    part is read now; embeddings, coordinates and codes are read a batch at a time."""
    import pyarrow.compute as pc

    from locdiff_core.data import GeoPart, PartedGeo

    splits = None if split is None else ([split] if isinstance(split, str) else list(split))
    maps = MappedArrays(store)
    tfiles = set(store.files(targets_key)) if targets_key else set()
    parts, rows, present, offset = [], [], set(), 0
    for rel in embedding_parts(store, key):
        cols = {c: maps.open(key, array_relpath_of(rel, c)) for c in ARRAY_COLUMNS}
        codes = None
        if targets_key:
            crel = array_relpath_of(rel, "code")
            if crel not in tfiles:
                raise LookupError(f"target cache {targets_key} has no {crel}; rebuild the cache")
            codes = maps.open(targets_key, crel)
            if codes.shape[0] != cols["emb"].shape[0]:
                raise ValueError(
                    f"target cache {targets_key} is not aligned with {key} in {rel} "
                    f"({codes.shape[0]} vs {cols['emb'].shape[0]} rows); rebuild the cache"
                )
        n = cols["emb"].shape[0]
        if splits is None:
            rows.append(np.arange(offset, offset + n, dtype=np.int64))
        else:
            col = store.read_table(key, rel, columns=["split"])["split"]
            present.update(pc.unique(col).to_pylist())
            mask = pc.is_in(col, value_set=pa.array(splits, pa.string())).to_numpy(zero_copy_only=False)
            rows.append(offset + np.nonzero(mask)[0].astype(np.int64))
        parts.append(GeoPart(cols["emb"], cols["lat"], cols["lon"], codes))
        offset += n
    sel = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    if len(sel) == 0:
        raise LookupError(f"no embeddings of split(s) {splits} in {key}; it has {sorted(present)}")
    return PartedGeo(parts, sel, release=maps.release, release_every=release_every)
