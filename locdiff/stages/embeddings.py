"""Embedding extraction: a dataset artifact's images -> frozen-encoder features, one part per shard.

``embed_dataset(store, dataset_key, encoder_name=…)`` builds (or reuses) and :func:`load_embeddings`
reads ``embeddings/<dataset>/<encoder>/<hash>``::

    parts/part-00000.parquet     image_id, embedding, lat, lon, split   (one per input tar shard)
    skipped/part-00000.parquet   image_id, reason                       (images that did not decode)

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
from locdiff.stages import get_or_build, stage_key
from locdiff.storage import ArtifactWriter, Key, Store

STAGE = "embeddings"
PART_DIR = "parts"
SKIP_DIR = "skipped"
MAX_SKIPPED_LISTED = 1000
# Test hook: seconds to sleep after each committed part (lets a test SIGKILL the stage mid-way).
SLEEP_ENV = "LOCDIFF_TEST_SLEEP_PER_SHARD"


def part_relpath(shard_index: int) -> str:
    return f"{PART_DIR}/part-{shard_index:05d}.parquet"


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
def _default_workers() -> int:
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
    device: str = "cpu",
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
        meta = {
            iid: (la, lo, sp)
            for iid, la, lo, sp in zip(
                table["image_id"].to_pylist(),
                table["lat"].to_pylist(),
                table["lon"].to_pylist(),
                table["split"].to_pylist(),
                strict=True,
            )
        }
        total = table.num_rows
        stats = EmbedStats(parts_total=len(plan))
        t0 = time.perf_counter()
        sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
        todo = []
        for sh in plan:
            if w.part_done(part_relpath(sh.index)) and w.part_done(skipped_relpath(sh.index)):
                stats.parts_reused += 1
                stats.images += len(sh.members)
            else:
                todo.append(sh)
        if progress is not None:
            progress(stats.images, total)
        if todo:
            workers = _default_workers() if num_workers is None else max(0, int(num_workers))
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
