"""Embedding extraction: a dataset artifact's images -> frozen-encoder features, one part per shard.

``embed_dataset(store, dataset_key, encoder_name=…)`` builds (or reuses)
``embeddings/<dataset>/<encoder>/<hash>``; its layout (Parquet parts, ``.npy`` arrays, skipped lists)
and its readers (``load_embeddings``, ``iter_embeddings``, ``open_embeddings``) are in
``locdiff.embedstore``.

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
from locdiff.embedstore import part_done, skipped_relpath, write_part
from locdiff.encoders import OFFLINE_ENCODER, Encoder, load_encoder
from locdiff.stages import get_or_build, stage_key
from locdiff.storage import ArtifactWriter, Key, Store

STAGE = "embeddings"
MAX_SKIPPED_LISTED = 1000


# --------------------------------------------------------------------------------------------- planning
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


def _stage(dataset_key: str, encoder: Encoder) -> tuple:
    """The stage's (stage, name, config, upstream) for ``get_or_build`` and ``stage_key``."""
    name = f"{Key.parse(dataset_key).name}/{re.sub(r'[^A-Za-z0-9_.=-]+', '_', encoder.name)}"
    return STAGE, name, embedding_config(encoder, dataset_key), [dataset_key]


def embedding_key(store: Store, dataset_key: str, encoder: Encoder) -> str:
    return stage_key(store, *_stage(dataset_key, encoder))


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

    def build(w: ArtifactWriter) -> None:
        plan, table = _plan(store, dataset_key)
        meta = _meta(table)
        total = table.num_rows
        stats = EmbedStats(parts_total=len(plan))
        t0 = time.perf_counter()
        todo = []
        for sh in plan:
            if part_done(w, sh.index):
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

    return get_or_build(store, *_stage(dataset_key, enc), build)


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
    todo: list[int] = []

    def build(w: ArtifactWriter) -> None:
        plan, _ = _plan(store, dataset_key)
        todo.extend(sh.index for sh in plan if not part_done(w, sh.index))

    get_or_build(store, *_stage(dataset_key, enc), build, commit=False)
    return todo


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
    plan, table = _plan(store, dataset_key)
    sh = next((p for p in plan if p.index == shard), None)
    if sh is None:
        raise ValueError(f"dataset {dataset_key} has no shard {shard}")

    def build(w: ArtifactWriter) -> None:
        if not part_done(w, shard):
            meta = _meta(table)
            _embed_shards(w, store, dataset_key, enc, [sh], meta, batch_size, 0, EmbedStats(), 0, None)

    get_or_build(store, *_stage(dataset_key, enc), build, commit=False)
    return len(sh.members)


def _write_part(w: ArtifactWriter, index: int, a: dict, meta: dict, dim: int) -> None:
    ids = a["ids"]
    emb = np.concatenate(a["emb"]) if a["emb"] else np.zeros((0, dim), np.float16)
    lat, lon, split = (list(c) for c in zip(*(meta[i] for i in ids), strict=True)) if ids else ([], [], [])
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    write_part(w, index, ids, emb, lat, lon, split, a["skipped"])
