"""Retrieval index: the training split's image embeddings and coordinates (the "gallery").

``retrieval/<embeddings name>/<hash>`` (upstream: the embeddings artifact) holds::

    gallery.npy     float16 [G, E], L2-normalised rows (inner product = cosine similarity)
    coords.parquet  image_id, lat, lon (row i describes gallery row i)

Evaluations read it for the retrieval 1-NN baseline and LocDiff-H (and name it in their upstream);
``locdiff predict --hybrid`` reads it through :func:`load_index`. Search is exact inner product
(``locdiff_core.retrieval.search_inner_product``: chunked torch matmul + running top-k, chosen over
faiss' ``IndexFlatIP`` by ``benchmarks/bench_retrieval.py``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from locdiff.stages import get_or_build
from locdiff.storage import Key, Store

STAGE = "retrieval"
GALLERY_FILE = "gallery.npy"
COORDS_FILE = "coords.parquet"


def build_index(store: Store, embeddings_key: str, split: str = "train") -> str:
    """Build (or reuse) the retrieval index of one split of an embeddings artifact; returns its key."""
    cfg = {"split": split, "normalized": True, "dtype": "float16"}

    def build(w) -> None:
        import pyarrow as pa

        from locdiff.stages.embeddings import load_embeddings
        from locdiff_core.retrieval import normalize_rows

        ids, emb, lat, lon = load_embeddings(store, embeddings_key, split)
        gallery = normalize_rows(emb).numpy().astype(np.float16)  # [G, E]
        buf = io.BytesIO()
        np.save(buf, gallery, allow_pickle=False)
        w.write_bytes(GALLERY_FILE, buf.getvalue())
        w.write_table(COORDS_FILE, pa.table({"image_id": ids, "lat": lat.numpy(), "lon": lon.numpy()}))
        w.set(gallery_size=len(ids), dim=int(gallery.shape[1]), embeddings=embeddings_key, split=split)

    return get_or_build(store, STAGE, Key.parse(embeddings_key).name, cfg, [embeddings_key], build)


@dataclass
class RetrievalIndex:
    """A loaded gallery: ``emb`` float16 ``[G, E]`` (unit rows), ``lat_deg``/``lon_deg`` float64 ``[G]``."""

    key: str
    emb: object  # torch.Tensor
    lat_deg: object
    lon_deg: object

    def __len__(self) -> int:
        return int(self.emb.shape[0])

    def search(self, queries: np.ndarray, k: int):
        """``(similarity [B, k], index [B, k])`` of the k most similar gallery images (exact)."""
        from locdiff_core.retrieval import normalize_rows, search_inner_product

        return search_inner_product(normalize_rows(queries), self.emb, k)


def load_index(store: Store, key: str) -> RetrievalIndex:
    import torch

    from locdiff.errors import UserError

    man = store.manifest(key)
    if man.get("stage") != STAGE:
        raise UserError(
            f"{key} is not a retrieval index (stage {man.get('stage')!r})", "pass a retrieval/... key"
        )
    with store.open(key, GALLERY_FILE) as f:
        gallery = np.load(io.BytesIO(f.read()), allow_pickle=False)
    coords = store.read_table(key, COORDS_FILE)
    return RetrievalIndex(
        key=key,
        emb=torch.from_numpy(gallery),
        lat_deg=torch.from_numpy(coords["lat"].to_numpy().astype(np.float64)),
        lon_deg=torch.from_numpy(coords["lon"].to_numpy().astype(np.float64)),
    )
