"""Reading committed artifacts into the tensors the model takes (I/O only, no math)."""

from __future__ import annotations

import numpy as np

from locdiff.storage import Store


def _embedding_tables(store: Store, key: str):
    import pyarrow as pa

    files = [f for f in store.files(key) if f.endswith(".parquet") and "embeddings" in f.split("/")[0] + f]
    if not files:
        files = [f for f in store.files(key) if f.endswith(".parquet")]
    tables = [store.read_table(key, f) for f in sorted(files)]
    tables = [t for t in tables if "embedding" in t.column_names]
    if not tables:
        raise LookupError(f"{key} has no embedding Parquet files")
    return pa.concat_tables(tables, promote_options="default")


def _splits(store: Store, key: str, table) -> np.ndarray:
    """The split of each row: a `split` column, else the upstream dataset manifest's split by image_id."""
    if "split" in table.column_names:
        return np.asarray(table["split"].to_pylist(), dtype=object)
    from locdiff.datasets.shards import read_manifest

    for up in store.manifest(key).get("upstream", []):
        if up.startswith("datasets/"):
            man = read_manifest(store, up, columns=["image_id", "split"])
            lookup = dict(zip(man["image_id"].to_pylist(), man["split"].to_pylist(), strict=True))
            return np.asarray([lookup.get(i, "") for i in table["image_id"].to_pylist()], dtype=object)
    raise LookupError(f"{key}: no split column and no upstream dataset to read splits from")


def load_table(store: Store, key: str, split: str | None = None):
    """(image_id list, emb float32 [N,E] ndarray, lat [N], lon [N]) of an embeddings artifact."""
    table = _embedding_tables(store, key)
    if split is not None:
        mask = _splits(store, key, table) == split
        if not mask.any():
            raise LookupError(f"{key} has no rows in split {split!r}")
        table = table.filter(mask)
    emb_col = table["embedding"].combine_chunks()
    width = len(emb_col[0].as_py()) if len(emb_col) else 0
    values = emb_col.flatten().to_numpy(zero_copy_only=False)
    emb = np.asarray(values, dtype=np.float32).reshape(len(table), width)
    lat = np.array(table["lat"].to_numpy(zero_copy_only=False), dtype=np.float64)
    lon = np.array(table["lon"].to_numpy(zero_copy_only=False), dtype=np.float64)
    return table["image_id"].to_pylist(), emb, lat, lon


def load_embeddings(store: Store, key: str, split: str | None = None):
    """A `locdiff_core.train.GeoEmbeddings` of one split of an embeddings artifact."""
    import torch

    from locdiff_core.train import GeoEmbeddings

    _, emb, lat, lon = load_table(store, key, split)
    return GeoEmbeddings(torch.tensor(emb), torch.tensor(lat), torch.tensor(lon))
