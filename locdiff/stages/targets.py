"""SHDD training targets: a cache of codes per embedding part (the default), or computed per batch.

Decision (measured by ``benchmarks/bench_targets.py`` on 2 CPU cores, 20 k gallery points, figures in
docs/data.md, when the cache was Parquet and the harmonics were torch's): reading cached float32 codes
back was 5x faster than computing ``SHDD(L).encode`` at L = 16, 5x at L = 32 and 2x at L = 64, so the
pipeline builds the cache once (:func:`build_targets`) and the trainer reads it (memory-mapped, a batch
of rows at a time; :func:`load_targets` reads it whole, part by part in ``load_embeddings`` order).
float32, not float16: float16 halves the file but its conversion back to float32 made reading 1.7-2.6x
slower (at L = 64 no faster than computing) and it rounds codes to ~1e-3 relative. The cost is disk:
(L+1)^2 * 4 bytes per image (17 KB at L = 64, i.e. 80 GB for MP16's 4.7 M images); at that scale, or on
a GPU (not measured here: no GPU on this machine), set ``train.targets="per_batch"``: the trainer
encodes each batch's coordinates and the pipeline builds no cache (docs/data.md has the cost table).

Artifact ``targets/<dataset>/L<L>/<hash>``: ``parts/part-xxxxx.parquet`` (image_id, split: the row
index) — one per embedding part, same row order — and beside each ``arrays/part-xxxxx.code.npy`` (the
codes ``[n, (L+1)^2]``, their only copy), which the trainer memory-maps
(``locdiff.embedstore.open_embeddings``) and reads a batch of rows at a time.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import torch

from locdiff.stages import get_or_build
from locdiff.storage import ArtifactWriter, Key, Store

STAGE = "targets"
BLOCK_ROWS = 8192  # rows encoded at a time when building the cache
_DTYPES = {"float32": np.float32, "float16": np.float16}


def targets_for(lat_deg, lon_deg, max_degree: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SHDD codes ``[N, (L+1)^2]`` of the given coordinates (the raw code c; x = sqrt(4 pi) c)."""
    from locdiff_core.shdd import SHDD

    lat = (lat_deg if isinstance(lat_deg, torch.Tensor) else torch.tensor(np.array(lat_deg))).to(dtype)
    lon = (lon_deg if isinstance(lon_deg, torch.Tensor) else torch.tensor(np.array(lon_deg))).to(dtype)
    return SHDD(max_degree).encode(lat, lon)


def build_targets(store: Store, embeddings_key: str, max_degree: int, dtype: str = "float32") -> str:
    """Cache SHDD codes for every embedding part (same parts, same row order); returns the key."""
    from locdiff.embedstore import array_relpath_of, embedding_parts

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    cfg = {"max_degree": int(max_degree), "dtype": dtype, "embeddings": embeddings_key}

    def build(w: ArtifactWriter) -> None:
        for rel in embedding_parts(store, embeddings_key):
            arr_rel = array_relpath_of(rel, "code")
            if w.part_done(rel) and w.part_done(arr_rel):
                continue
            t = store.read_table(embeddings_key, rel, columns=["image_id", "lat", "lon", "split"])
            lat, lon = t["lat"].to_numpy(), t["lon"].to_numpy()
            codes = np.empty((t.num_rows, (max_degree + 1) ** 2), _DTYPES[dtype])
            for i in range(0, t.num_rows, BLOCK_ROWS):  # float64 one block at a time: the part's float64
                j = i + BLOCK_ROWS  # codes alone would be 3.4 GB at L = 64 and 100 k rows
                codes[i:j] = targets_for(lat[i:j], lon[i:j], max_degree, torch.float64).numpy()
            with w.open(arr_rel, "wb") as f:
                np.save(f, codes, allow_pickle=False)
            w.commit_part(arr_rel)
            w.write_table(rel, t.select(["image_id", "split"]))  # the codes' one copy is the array
            w.commit_part(rel, rows=t.num_rows)
        w.set(max_degree=int(max_degree), dim=(int(max_degree) + 1) ** 2, code_dtype=dtype)

    name = f"{Key.parse(embeddings_key).head}/L{int(max_degree)}"
    return get_or_build(store, STAGE, name, cfg, [embeddings_key], build)


def load_targets(store: Store, key: str, split: str | None = None) -> tuple[list[str], torch.Tensor]:
    """(image_ids, codes float32 [N, D]) of a target cache, read part by part in embedding order."""
    from locdiff.embedstore import MappedArrays, array_relpath_of

    ids: list[str] = []
    parts = []
    maps = MappedArrays(store)
    for rel in sorted(f for f in store.files(key) if f.startswith("parts/")):
        t = store.read_table(key, rel, columns=["image_id", "split"])
        codes = maps.open(key, array_relpath_of(rel, "code"), sequential=True)
        if split is not None:
            mask = pc.equal(t["split"], split)
            t, codes = t.filter(mask), codes[mask.to_numpy(zero_copy_only=False)]
        ids.extend(t["image_id"].to_pylist())
        parts.append(torch.from_numpy(np.array(codes, dtype=np.float32)))  # a writable copy
        maps.release()
    d = (int(store.manifest(key)["max_degree"]) + 1) ** 2
    return ids, torch.cat(parts) if parts else torch.zeros(0, d)
