"""Data-plane tasks: prepare a dataset, embed it, cache SHDD targets, build an anchor set.

Thin wrappers around the data layer (`locdiff.datasets`, `locdiff.embed`, `locdiff.targets`,
`locdiff.anchorsets`): each opens the store, calls one function, and returns the store key it produced.
Retries with backoff on the I/O-bound ones (downloads, object storage); cache keyed on inputs + stage
version.
"""

from __future__ import annotations

from prefect import task

from locdiff.tasks.common import (
    IO_RETRIES,
    IO_RETRY_DELAYS,
    IO_RETRY_JITTER,
    Progress,
    open_store,
    stage_cache,
)


def prepare_dataset(storage: str | None, dataset: str, options: dict | None = None) -> str:
    """Prepare (download/validate/shard) a registry dataset, or build the embedded sample; returns its key."""
    from locdiff.datasets import prepare_dataset as _prepare

    store = open_store(storage)
    bar = Progress("prepare", f"preparing {dataset}")
    key = _prepare(store, dataset, progress=bar, **dict(options or {}))
    bar.done()
    return key


def dataset_available(storage: str | None, dataset: str) -> str | None:
    """The key of a committed dataset artifact, or None when the dataset is not present locally."""
    from locdiff.datasets import find_dataset

    return find_dataset(open_store(storage), dataset)


def embed_dataset(storage: str | None, dataset_key: str, encoder: str, options: dict | None = None) -> str:
    """Embed every image of a dataset artifact with an encoder of the registry; returns the key."""
    from locdiff.embed import embed_dataset as _embed

    store = open_store(storage)
    bar = Progress("embed", f"embedding {dataset_key.split('/')[1]} with {encoder}")
    key = _embed(store, dataset_key, encoder, progress=bar, **dict(options or {}))
    bar.done()
    return key


def cache_targets(storage: str | None, embeddings_key: str, max_degree: int) -> str:
    """SHDD targets of degree L for an embeddings artifact; returns the key."""
    from locdiff.targets import cache_targets as _targets

    return _targets(open_store(storage), embeddings_key, max_degree)


def build_anchors(
    storage: str | None, kind: str = "uniform", n: int = 10_000, source_key: str | None = None
) -> str:
    """An anchor-set artifact (uniform / from a dataset's coordinates / land); returns the key."""
    from locdiff.anchorsets import build_anchor_set

    return build_anchor_set(open_store(storage), kind, n, source_key=source_key)


prepare_task = task(
    prepare_dataset,
    name="prepare-dataset",
    cache_policy=stage_cache("prepare"),
    persist_result=True,
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_jitter_factor=IO_RETRY_JITTER,
    timeout_seconds=48 * 3600,
)
embed_task = task(
    embed_dataset,
    name="embed",
    cache_policy=stage_cache("embed"),
    persist_result=True,
    retries=IO_RETRIES,  # resumes at shard granularity, so a retry redoes little
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_jitter_factor=IO_RETRY_JITTER,
    timeout_seconds=48 * 3600,
)
targets_task = task(
    cache_targets,
    name="targets",
    cache_policy=stage_cache("targets"),
    persist_result=True,
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_jitter_factor=IO_RETRY_JITTER,
    timeout_seconds=12 * 3600,
)
anchors_task = task(
    build_anchors,
    name="anchors",
    cache_policy=stage_cache("anchors"),
    persist_result=True,
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_jitter_factor=IO_RETRY_JITTER,
    timeout_seconds=3600,
)
