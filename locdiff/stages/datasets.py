"""Datasets: ``datasets/<name>/<hash>`` — a manifest (image_id, lat, lon, split, shard, member, …) plus
images in tar shards. The builders live in ``locdiff.datasets`` (the embedded Blue Marble sample,
``prepare_from_manifest`` for any CSV/Parquet of paths or URLs); this module picks one and finds what
is committed.
"""

from __future__ import annotations

from collections.abc import Callable

from locdiff.errors import UserError
from locdiff.storage import Store

STAGE = "datasets"


def prepare_dataset(
    store: Store,
    dataset: str,
    options: dict | None = None,
    progress: Callable[[float, float], None] | None = None,
) -> str:
    """Build the embedded sample, prepare a dataset from a manifest (``options["manifest"]``), reuse
    the newest committed dataset of that name, or download a missing one from its published source
    (``options``: those of :func:`locdiff.datasets.sources.download_dataset`); returns its key."""
    from locdiff.datasets.registry import REGISTRY

    options = dict(options or {})
    spec = REGISTRY.get(dataset.lower())
    if spec is not None and spec.kind == "embedded":
        from locdiff.datasets.bluemarble import DEFAULT_N, build_bluemarble

        n = int(options.get("n", DEFAULT_N))
        on_shard = None if progress is None else (lambda shards, rows: progress(rows, n))
        return build_bluemarble(store, progress=on_shard, **options)
    if options.get("manifest"):
        from locdiff.datasets.prepare import prepare_from_manifest

        return prepare_from_manifest(store, dataset.lower(), **options)
    key = latest_dataset(store, dataset)
    if key is None:
        from locdiff.datasets.sources import SOURCES, download_dataset

        if dataset.lower() in SOURCES:  # a published dataset that is missing: download it
            return download_dataset(store, dataset, **options)
    if key is None:
        how = spec.obtain if spec is not None else "pass dataset_options={'manifest': FILE}"
        raise UserError(f"dataset {dataset!r} is not in the store {store.url}", how)
    return key


def latest_dataset(store: Store, dataset: str) -> str | None:
    """The key of the newest committed dataset of that name, or None when absent."""
    return store.latest(STAGE, dataset.lower())


def splits(store: Store, dataset_key: str) -> dict[str, int]:
    """Rows per split of a committed dataset (from its manifest)."""
    from locdiff.datasets.shards import read_manifest

    counts: dict[str, int] = {}
    for s in read_manifest(store, dataset_key, columns=["split"])["split"].to_pylist():
        counts[s] = counts.get(s, 0) + 1
    return counts
