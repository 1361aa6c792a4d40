"""Retrieval index: the training split's image embeddings and coordinates (the "gallery").

``retrieval/<embeddings name>/<hash>`` (upstream: the embeddings artifact) holds::

    gallery.npy     float16 [G, E], L2-normalised rows (inner product = cosine similarity)
    coords.parquet  image_id, lat, lon (row i describes gallery row i)

Evaluations read it for the retrieval 1-NN baseline and LocDiff-H (and name it in their upstream);
``locdiff predict --hybrid`` reads it through :func:`load_index`. Search is exact inner product
(``locdiff_core.retrieval.search_inner_product``: chunked torch matmul + running top-k, chosen over
faiss' ``IndexFlatIP`` by ``benchmarks/bench_retrieval.py``).

Memory is bounded at any gallery size: the index is built by streaming the split from the embeddings'
memory-mapped arrays a block at a time (normalised in float32 per block, written as float16 rows after
a ``.npy`` header), and a loaded index maps ``gallery.npy`` and reads it a block at a time per search,
dropping each block's pages after use (``tests/scale/test_memory_bounded.py`` asserts the peak RSS of
build + evaluation at 10^5 and 10^6 rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from locdiff.stages import get_or_build
from locdiff.storage import Key, Store

STAGE = "retrieval"
GALLERY_FILE = "gallery.npy"
COORDS_FILE = "coords.parquet"
BUILD_BLOCK_ROWS = 1 << 15  # rows normalised at a time while building (32 k x 768 float32 = 96 MiB)


def build_index(store: Store, embeddings_key: str, split: str = "train") -> str:
    """Build (or reuse) the retrieval index of one split of an embeddings artifact; returns its key."""
    cfg = {"split": split, "normalized": True, "dtype": "float16"}

    def build(w) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from locdiff.embedstore import iter_embeddings
        from locdiff_core.retrieval import normalize_rows

        dim = int(store.manifest(embeddings_key)["dim"])
        n, blocks = iter_embeddings(store, embeddings_key, split, BUILD_BLOCK_ROWS)
        schema = pa.schema([("image_id", pa.string()), ("lat", pa.float64()), ("lon", pa.float64())])
        header = {"descr": np.dtype(np.float16).str, "fortran_order": False, "shape": (n, dim)}
        with w.open(GALLERY_FILE) as g, w.open(COORDS_FILE) as c, pq.ParquetWriter(c, schema) as coords:
            np.lib.format.write_array_header_1_0(g, header)
            for ids, emb, lat, lon in blocks:
                g.write(normalize_rows(emb).numpy().astype(np.float16).tobytes())
                coords.write_table(pa.table({"image_id": ids, "lat": lat, "lon": lon}, schema=schema))
        w.set(gallery_size=n, dim=dim, embeddings=embeddings_key, split=split)

    return get_or_build(store, STAGE, Key.parse(embeddings_key).name, cfg, [embeddings_key], build)


@dataclass
class RetrievalIndex:
    """A gallery: ``emb`` float16 ``[G, E]`` (unit rows; a memory-mapped numpy array when loaded from the
    store, or a tensor), ``lat_deg``/``lon_deg`` float64 tensors ``[G]``."""

    key: str
    emb: object
    lat_deg: object
    lon_deg: object
    release: object = field(default=None, repr=False)  # drops the gallery's mapped pages

    def __len__(self) -> int:
        return int(self.emb.shape[0])

    def search(self, queries: np.ndarray, k: int):
        """``(similarity [B, k], index [B, k])`` of the k most similar gallery images (exact)."""
        from locdiff_core.retrieval import normalize_rows, search_inner_product

        return search_inner_product(normalize_rows(queries), self.emb, k, after_block=self.release)


def load_index(store: Store, key: str) -> RetrievalIndex:
    import torch

    from locdiff.embedstore import MappedArrays
    from locdiff.errors import UserError

    man = store.manifest(key)
    if man.get("stage") != STAGE:
        raise UserError(
            f"{key} is not a retrieval index (stage {man.get('stage')!r})", "pass a retrieval/... key"
        )
    maps = MappedArrays(store)
    gallery = maps.open(key, GALLERY_FILE, sequential=True)
    coords = store.read_table(key, COORDS_FILE, columns=["lat", "lon"])
    return RetrievalIndex(
        key=key,
        emb=gallery,
        lat_deg=torch.from_numpy(coords["lat"].to_numpy().astype(np.float64)),
        lon_deg=torch.from_numpy(coords["lon"].to_numpy().astype(np.float64)),
        release=maps.release,
    )
