r"""Embedding extraction: a dataset artifact's images -> frozen-encoder features, one part per shard.

``embed_dataset(store, dataset_key, encoder_name=…)`` builds (or reuses) and :func:`load_embeddings`
reads ``embeddings/<dataset>/<encoder>/<hash>``::

    parts/part-00000.parquet     image_id, embedding, lat, lon, split   (one per input tar shard)
    arrays/part-00000.emb.npy    float16 [n, dim]  \  the same rows as plain .npy arrays, which the
    arrays/part-00000.lat.npy    float64 [n]        > trainer memory-maps (:func:`open_embeddings`):
    arrays/part-00000.lon.npy    float64 [n]       /  a batch reads its rows, nothing else is loaded
    skipped/part-00000.parquet   image_id, reason                       (images that did not decode)

The Parquet parts are what the DuckDB catalog reads (``embeddings`` view); the ``.npy`` arrays are the
zero-copy path for training and scale (``np.load(mmap_mode="r")`` part by part; from S3 each array is
fetched once into a local cache named by its checksum, then mapped).

Layout: ``embedding`` is ``fixed_size_list<halffloat>[dim]`` — float16 halves the bytes of float32 and is
what DESIGN §4 asks for; pyarrow writes it as Parquet's FLOAT16 logical type, which DuckDB 2.x reads
(as ``FLOAT[]``; checked in tests), so the catalog can query embeddings in place. Rows keep the shard's
manifest order.

Execution: one ``torch.utils.data.DataLoader`` over the shards still to do; each worker owns whole
shards (streams the tar once, decodes and resizes with the encoder's picklable ``preprocess``) and
yields uint8 batches that never straddle a shard, so a shard's batches — and therefore its embeddings —
do not depend on how many shards were done before a crash. The main process runs the encoder (pinned
memory + non-blocking copies + bf16 autocast on CUDA) and, when a shard's last batch arrives, writes its
part and commits it (``ArtifactWriter.commit_part``). A re-run after a crash reuses every committed part
(``part_done``) and embeds only the rest. Undecodable or missing images are skipped and listed.
"""

from __future__ import annotations

import os
import pickle
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from locdiff.datasets import shards as ds
from locdiff.encoders import OFFLINE_ENCODER, Encoder, load_encoder
from locdiff.errors import UserError
from locdiff.stages import VERSIONS, get_or_build, stage_key
from locdiff.storage import ArtifactWriter, Key, Store

STAGE = "embeddings"
PART_DIR = "parts"
SKIP_DIR = "skipped"
ARRAY_DIR = "arrays"
ARRAY_COLUMNS = ("emb", "lat", "lon")
MAX_SKIPPED_LISTED = 1000
# Test hook: seconds to sleep after each committed part (lets a test SIGKILL the stage mid-way).
SLEEP_ENV = "LOCDIFF_TEST_SLEEP_PER_SHARD"


def part_relpath(shard_index: int) -> str:
    return f"{PART_DIR}/part-{shard_index:05d}.parquet"


def array_relpath(shard_index: int, column: str) -> str:
    return f"{ARRAY_DIR}/part-{shard_index:05d}.{column}.npy"


def array_relpath_of(part_rel: str, column: str) -> str:
    stem = part_rel.rsplit("/", 1)[-1].removesuffix(".parquet")
    return f"{ARRAY_DIR}/{stem}.{column}.npy"


def skipped_relpath(shard_index: int) -> str:
    return f"{SKIP_DIR}/part-{shard_index:05d}.parquet"


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


_SKIP_SCHEMA = pa.schema([("image_id", pa.string()), ("reason", pa.string())])


# --------------------------------------------------------------------------------------------- reading
@dataclass
class _Shard:
    index: int  # position in the dataset (part number)
    relpath: str  # tar relpath in the dataset artifact
    members: list[str]
    image_ids: list[str]


def _plan(store: Store, dataset_key: str) -> tuple[list[_Shard], pa.Table]:
    table = ds.read_manifest(
        store, dataset_key, columns=["image_id", "lat", "lon", "split", "shard", "member"]
    )
    tars = ds.shards(store, dataset_key)
    by_shard: dict[str, tuple[list, list]] = {t: ([], []) for t in tars}
    for iid, shard, member in zip(
        table["image_id"].to_pylist(), table["shard"].to_pylist(), table["member"].to_pylist(), strict=True
    ):
        if shard not in by_shard:
            raise ValueError(
                f"dataset {dataset_key}: image {iid!r} names shard {shard!r}, which is not in it"
            )
        by_shard[shard][0].append(member)
        by_shard[shard][1].append(iid)
    plan = []
    for t in tars:
        m = re.search(r"(\d+)\.tar$", t)
        idx = int(m.group(1)) if m else len(plan)
        plan.append(_Shard(idx, t, *by_shard[t]))
    return plan, table


class _ShardBatches(IterableDataset):
    """Yields ``dict(shard, ids, x, skipped, last)``; worker w takes shards w, w+W, w+2W, …"""

    def __init__(self, store: Store, dataset_key: str, plan: list[_Shard], preprocess, batch_size: int):
        self.store, self.key, self.plan = store, dataset_key, plan
        self.preprocess, self.batch_size = preprocess, batch_size

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None and not self.store.is_local:
            # an async S3 client copied by fork is not safe to use: open a fresh one in each worker
            self.store = pickle.loads(pickle.dumps(self.store))
        for j, sh in enumerate(self.plan):
            if j % nw == wid:
                yield from self._shard(j, sh)

    def _shard(self, j: int, sh: _Shard):
        from locdiff.datasets.images import decode_image

        wanted = dict(zip(sh.members, sh.image_ids, strict=True))
        found: dict[str, bytes] = {}
        skipped: list[tuple[str, str]] = []
        for member, data in ds.iter_shard(self.store, self.key, sh.relpath):
            if member in wanted:
                found[member] = data
        ids, xs = [], []
        n_items = len(sh.members)
        for i, (member, iid) in enumerate(zip(sh.members, sh.image_ids, strict=True)):
            data = found.pop(member, None)
            if data is None:
                skipped.append((iid, f"member {member} missing from {sh.relpath}"))
            else:
                try:
                    with decode_image(data) as im:  # bombs and broken files: a skipped row
                        xs.append(self.preprocess(im))
                    ids.append(iid)
                except Exception as exc:  # noqa: BLE001 - any decode failure skips the image
                    skipped.append((iid, f"undecodable image ({type(exc).__name__}: {exc})"[:300]))
            last = i == n_items - 1
            if len(xs) >= self.batch_size or last:
                x = torch.stack(xs) if xs else torch.empty(0, dtype=torch.uint8)
                yield {"shard": j, "ids": ids, "x": x, "skipped": skipped, "last": last}
                ids, xs, skipped = [], [], []
        if n_items == 0:
            yield {"shard": j, "ids": [], "x": torch.empty(0, dtype=torch.uint8), "skipped": [], "last": True}


# --------------------------------------------------------------------------------------------- the stage
def default_workers() -> int:
    # On 2 cores decoding inline beat one worker process (bench_embed: 14 % vs 23 % overhead): the
    # encoder already uses both cores and 128-px JPEGs decode in well under a millisecond.
    n = os.cpu_count() or 1
    return 0 if n <= 2 else 1 if n <= 4 else min(8, n // 2)


def embedding_config(encoder: Encoder, dataset_key: str) -> dict:
    precision = (encoder.amp or "fp32") if encoder.device.type == "cuda" else "fp32"
    return {"dataset": dataset_key, "encoder": encoder.config(), "precision": precision, "dtype": "float16"}


def _artifact_name(dataset_key: str, encoder: Encoder) -> str:
    return f"{Key.parse(dataset_key).name}/{re.sub(r'[^A-Za-z0-9_.=-]+', '_', encoder.name)}"


def embedding_key(store: Store, dataset_key: str, encoder: Encoder) -> str:
    cfg = embedding_config(encoder, dataset_key)
    return stage_key(store, STAGE, _artifact_name(dataset_key, encoder), cfg, [dataset_key])


@dataclass
class EmbedStats:
    parts_total: int = 0
    parts_reused: int = 0
    images: int = 0
    skipped: list = field(default_factory=list)
    seconds: float = 0.0


def embed_dataset(
    store: Store,
    dataset_key: str,
    encoder_name: str = OFFLINE_ENCODER,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    batch_size: int = 128,
    num_workers: int | None = None,
    device: str = "auto",
    image_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    encoder: Encoder | None = None,
) -> str:
    """Embed every image of a dataset artifact; returns the embeddings key (reused when committed).

    ``progress(images_done, images_total)`` is called after every part. Pass a loaded ``encoder`` to
    reuse one across calls (then ``encoder_name``/``pretrained``/``checkpoint``/``device`` are ignored).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    enc = encoder or load_encoder(encoder_name, pretrained, checkpoint, device=device, image_size=image_size)
    key = embedding_key(store, dataset_key, enc)
    if store.exists(key):
        return key

    def build(w: ArtifactWriter) -> None:
        plan, table = _plan(store, dataset_key)
        meta = _meta(table)
        total = table.num_rows
        stats = EmbedStats(parts_total=len(plan))
        t0 = time.perf_counter()
        todo = []
        for sh in plan:
            if all(w.part_done(r) for r in _shard_relpaths(sh.index)):
                stats.parts_reused += 1
                stats.images += len(sh.members)
            else:
                todo.append(sh)
        if progress is not None:
            progress(stats.images, total)
        if todo:
            _embed_shards(
                w, store, dataset_key, enc, todo, meta, batch_size, num_workers, stats, total, progress
            )
        skipped = []
        for sh in plan:
            with w.open_part(skipped_relpath(sh.index)) as f:
                skipped.extend(pq.read_table(f).to_pylist())
        stats.skipped = skipped
        stats.seconds = time.perf_counter() - t0
        w.set(
            dataset=dataset_key,
            encoder=enc.config(),
            dim=enc.dim,
            embedding_dtype="float16",
            n_skipped=len(skipped),
            skipped=skipped[:MAX_SKIPPED_LISTED],
            parts_total=stats.parts_total,
            parts_reused=stats.parts_reused,
            seconds=round(stats.seconds, 3),
        )

    cfg = embedding_config(enc, dataset_key)
    return get_or_build(store, STAGE, _artifact_name(dataset_key, enc), cfg, [dataset_key], build)


def _meta(table: pa.Table) -> dict:
    return {
        iid: (la, lo, sp)
        for iid, la, lo, sp in zip(
            table["image_id"].to_pylist(),
            table["lat"].to_pylist(),
            table["lon"].to_pylist(),
            table["split"].to_pylist(),
            strict=True,
        )
    }


def _embed_shards(
    w: ArtifactWriter,
    store: Store,
    dataset_key: str,
    enc: Encoder,
    todo: list[_Shard],
    meta: dict,
    batch_size: int,
    num_workers: int | None,
    stats: EmbedStats,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Embed the shards ``todo``, writing and committing each one's part as its last batch arrives."""
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
    workers = default_workers() if num_workers is None else max(0, int(num_workers))
    workers = min(workers, len(todo))
    cuda = enc.device.type == "cuda"
    loader = DataLoader(
        _ShardBatches(store, dataset_key, todo, enc.preprocess, batch_size),
        batch_size=None,
        num_workers=workers,
        pin_memory=cuda,
        prefetch_factor=4 if workers else None,
    )
    acc: dict[int, dict] = {}
    for item in loader:
        a = acc.setdefault(item["shard"], {"ids": [], "emb": [], "skipped": []})
        if item["ids"]:
            a["ids"].extend(item["ids"])
            a["emb"].append(enc(item["x"]).to("cpu", torch.float16).numpy())  # [b, dim]
        a["skipped"].extend(item["skipped"])
        if item["last"]:
            sh = todo[item["shard"]]
            _write_part(w, sh.index, acc.pop(item["shard"]), meta, enc.dim)
            stats.images += len(sh.members)
            if progress is not None:
                progress(stats.images, total)
            if sleep:
                time.sleep(sleep)


def _shard_relpaths(index: int) -> list[str]:
    """Every file one shard commits (the Parquet part last)."""
    return [skipped_relpath(index), *(array_relpath(index, c) for c in ARRAY_COLUMNS), part_relpath(index)]


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


# --------------------------------------------------------------------------------------------- per shard
_ENCODERS: dict[tuple, Encoder] = {}


def _encoder(encoder_name, pretrained, checkpoint, device, image_size) -> Encoder:
    """One loaded encoder per process and spec (a Dask worker runs many shard tasks)."""
    spec = (encoder_name, pretrained, checkpoint, device, image_size)
    if spec not in _ENCODERS:
        _ENCODERS[spec] = load_encoder(
            encoder_name, pretrained, checkpoint, device=device, image_size=image_size
        )
    return _ENCODERS[spec]


def shards_to_embed(
    store: Store,
    dataset_key: str,
    encoder_name: str = OFFLINE_ENCODER,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    image_size: int | None = None,
    encoder: Encoder | None = None,
    **_: object,
) -> list[int]:
    """The shard numbers of a dataset whose parts are not committed yet (none when the artifact is)."""
    enc = encoder or _encoder(encoder_name, pretrained, checkpoint, device, image_size)
    key = embedding_key(store, dataset_key, enc)
    if store.exists(key):
        return []
    plan, _ = _plan(store, dataset_key)
    w = store.writer(
        key, version=VERSIONS[STAGE], config=embedding_config(enc, dataset_key), upstream=[dataset_key]
    )
    return [sh.index for sh in plan if not all(w.part_done(r) for r in _shard_relpaths(sh.index))]


def embed_shard(
    store: Store,
    dataset_key: str,
    shard: int,
    encoder_name: str = OFFLINE_ENCODER,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    batch_size: int = 128,
    device: str = "auto",
    image_size: int | None = None,
    encoder: Encoder | None = None,
    **_: object,
) -> int:
    """Embed one shard and commit its part (a no-op when committed); returns its image count.

    The unit a Dask worker runs: a shard's part does not depend on which process embedded it, or on
    which other shards were embedded before, so the parts are the sequential stage's, byte for byte.
    """
    enc = encoder or _encoder(encoder_name, pretrained, checkpoint, device, image_size)
    key = embedding_key(store, dataset_key, enc)
    plan, table = _plan(store, dataset_key)
    sh = next((p for p in plan if p.index == shard), None)
    if sh is None:
        raise ValueError(f"dataset {dataset_key} has no shard {shard}")
    if store.exists(key):
        return len(sh.members)
    w = store.writer(
        key, version=VERSIONS[STAGE], config=embedding_config(enc, dataset_key), upstream=[dataset_key]
    )
    if not all(w.part_done(r) for r in _shard_relpaths(shard)):
        _embed_shards(w, store, dataset_key, enc, [sh], _meta(table), batch_size, 0, EmbedStats(), 0, None)
    return len(sh.members)


def _write_part(w: ArtifactWriter, index: int, a: dict, meta: dict, dim: int) -> None:
    ids = a["ids"]
    emb = np.concatenate(a["emb"]) if a["emb"] else np.zeros((0, dim), np.float16)
    lat, lon, split = (list(c) for c in zip(*(meta[i] for i in ids), strict=True)) if ids else ([], [], [])
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
    sk = a["skipped"]
    w.write_table(
        skipped_relpath(index),
        pa.table({"image_id": [s[0] for s in sk], "reason": [s[1] for s in sk]}, schema=_SKIP_SCHEMA),
    )
    w.commit_part(skipped_relpath(index), rows=None)
    write_arrays(
        w, index, {"emb": emb, "lat": np.asarray(lat, np.float64), "lon": np.asarray(lon, np.float64)}
    )
    w.write_table(part_relpath(index), table)
    w.commit_part(part_relpath(index), rows=len(ids))


# --------------------------------------------------------------------------------------------- loading
def embedding_parts(store: Store, key: str) -> list[str]:
    return [f for f in store.files(key) if f.startswith(PART_DIR + "/") and f.endswith(".parquet")]


def load_embeddings(
    store: Store, key: str, split: str | list[str] | None = None
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image_ids, embeddings float32 [N, dim], lat_deg float64 [N], lon_deg float64 [N])``.

    ``split`` keeps one split (or several); rows come in part order, each part in its shard's order.
    """
    dim = int(store.manifest(key)["dim"])
    splits = None if split is None else ({split} if isinstance(split, str) else set(split))
    if has_arrays(store, key):
        return _load_from_arrays(store, key, splits, dim)
    tables, present = [], set()
    for rel in embedding_parts(store, key):
        t = store.read_table(key, rel)
        if splits is not None:
            names = np.asarray(t["split"].to_pylist(), dtype=object)
            present.update(names.tolist())
            t = t.filter(pa.array(np.isin(names, list(splits))))
        tables.append(t)
    t = pa.concat_tables(tables) if tables else embedding_schema(dim).empty_table()
    if splits is not None and t.num_rows == 0:
        raise LookupError(f"no embeddings of split(s) {sorted(splits)} in {key}; it has {sorted(present)}")
    flat = t["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    emb = torch.from_numpy(np.asarray(flat, dtype=np.float32).reshape(t.num_rows, dim))
    lat = torch.from_numpy(t["lat"].to_numpy().astype(np.float64))
    lon = torch.from_numpy(t["lon"].to_numpy().astype(np.float64))
    return t["image_id"].to_pylist(), emb, lat, lon


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


def _load_from_arrays(store: Store, key: str, splits: set | None, dim: int):
    """``load_embeddings`` from the mapped arrays: one float32 output, filled part by part (no Arrow
    concatenation, no per-part float32 temporaries beyond one part's selected rows)."""
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


def iter_embeddings(store: Store, key: str, split: str | list[str] | None = None, block_rows: int = 1 << 16):
    """``load_embeddings`` a block at a time, for readers that must not hold a whole split (evaluation):
    ``(n_rows, blocks)`` where ``blocks`` yields ``(image_ids, emb float32 [b, dim], lat float64 [b],
    lon float64 [b])`` numpy blocks of exactly ``block_rows`` rows (the last one shorter), in
    ``load_embeddings`` order. Rows are read from the memory-mapped arrays and ids a part at a time:
    only one part's ids and one block are in memory. An artifact without arrays (an older locdiff) is
    loaded whole, then cut."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    splits = None if split is None else ({split} if isinstance(split, str) else set(split))
    if not has_arrays(store, key):
        ids, emb, lat, lon = load_embeddings(store, key, split)
        cut = range(0, len(ids), block_rows)
        return len(ids), (
            (
                ids[s : s + block_rows],
                emb[s : s + block_rows].numpy(),
                lat[s : s + block_rows].numpy(),
                lon[s : s + block_rows].numpy(),
            )
            for s in cut
        )
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


def has_arrays(store: Store, key: str) -> bool:
    """True when every Parquet part of an embeddings artifact has its memory-mappable arrays."""
    files = set(store.files(key))
    parts = [f for f in files if f.startswith(PART_DIR + "/") and f.endswith(".parquet")]
    return bool(parts) and all(array_relpath_of(p, c) in files for p in parts for c in ARRAY_COLUMNS)


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

    if not has_arrays(store, key):
        raise LookupError(f"{key} has no memory-mappable arrays (written by an older locdiff); re-embed it")
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


# --------------------------------------------------------------------------------------------- synthetic
SYNTHETIC_NOTE = (
    "SYNTHETIC: embeddings are a smooth noisy function of the location (no images); for scale "
    "measurements and tests only, never for accuracy claims"
)


def synthetic_rows(n: int, dim: int, seed: int, start: int = 0) -> dict[str, np.ndarray]:
    """Rows ``start..start+n`` of the synthetic table of ``seed``: photo-like locations (half around a
    few cities, half uniform on the sphere) and embeddings = Fourier features of the unit vector under
    a fixed random projection, plus Gaussian noise. Deterministic per (seed, start)."""
    proj = np.random.default_rng([seed, 0]).normal(0, 2.0, (3, dim - dim // 2))
    rng = np.random.default_rng([seed, 1, start])
    centres = np.array([[48.9, 2.3], [40.7, -74.0], [35.7, 139.7], [-33.9, 151.2], [-23.5, -46.6]])
    k = n // 2
    c = centres[rng.integers(0, len(centres), k)]
    lat = np.concatenate([c[:, 0] + rng.normal(0, 2, k), np.degrees(np.arcsin(rng.uniform(-1, 1, n - k)))])
    lon = np.concatenate([c[:, 1] + rng.normal(0, 2, k), rng.uniform(-180, 180, n - k)])
    lat = np.clip(lat, -89.9, 89.9)
    lon = (lon + 180) % 360 - 180
    la, lo = np.radians(lat), np.radians(lon)
    xyz = np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], 1)
    z = (xyz @ proj).astype(np.float32)  # [n, dim - dim//2]
    feats = np.concatenate([np.sin(z), np.cos(z)[:, : dim // 2]], 1)  # float32: bounded memory per part
    feats += 0.05 * rng.standard_normal(feats.shape, dtype=np.float32)
    emb = feats.astype(np.float16)
    split = np.full(n, "train", dtype=object)
    perm = rng.permutation(n)  # exactly 10 % val and 10 % test in every part
    split[perm[: n // 10]] = "val"
    split[perm[n // 10 : n // 5]] = "test"
    return {"emb": emb, "lat": lat, "lon": lon, "split": split}


def synth_embeddings(
    store: Store,
    name: str,
    rows: int,
    dim: int,
    seed: int = 0,
    part_rows: int = 100_000,
    encoder: str = "synthetic",
) -> str:
    """A synthetic embeddings artifact ``embeddings/<name>/synthetic/<hash>`` written directly, part by
    part (bounded memory at any size); see :data:`SYNTHETIC_NOTE`. Returns its key. ``encoder`` names the
    encoder the features stand in for (tests that predict real images with a run trained on them)."""
    if rows < 1 or dim < 2 or part_rows < 1:
        raise ValueError(f"rows, part_rows must be >= 1 and dim >= 2 (got {rows}, {part_rows}, {dim})")
    cfg = {
        "synthetic": True,
        "rows": int(rows),
        "dim": int(dim),
        "seed": int(seed),
        "part_rows": int(part_rows),
    }
    if encoder != "synthetic":
        cfg["encoder"] = encoder

    def build(w: ArtifactWriter) -> None:
        for index, start in enumerate(range(0, rows, part_rows)):
            if all(w.part_done(r) for r in _shard_relpaths(index)):
                continue
            n = min(part_rows, rows - start)
            r = synthetic_rows(n, dim, seed, start)
            w.write_table(skipped_relpath(index), _SKIP_SCHEMA.empty_table())
            w.commit_part(skipped_relpath(index), rows=None)
            write_arrays(w, index, {"emb": r["emb"], "lat": r["lat"], "lon": r["lon"]})
            table = pa.table(
                {
                    "image_id": pa.array([f"syn-{seed}-{start + i:09d}" for i in range(n)], pa.string()),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(r["emb"].reshape(-1)), dim),
                    "lat": pa.array(r["lat"], pa.float64()),
                    "lon": pa.array(r["lon"], pa.float64()),
                    "split": pa.array(list(r["split"]), pa.string()),
                },
                schema=embedding_schema(dim),
            )
            w.write_table(part_relpath(index), table)
            w.commit_part(part_relpath(index), rows=n)
            del r, table
        w.set(
            dataset=None,
            synthetic=True,
            note=SYNTHETIC_NOTE,
            encoder=encoder,
            dim=int(dim),
            embedding_dtype="float16",
            n_skipped=0,
            skipped=[],
        )

    return get_or_build(store, STAGE, f"{name}/synthetic", cfg, [], build)
