"""Data-plane tasks: prepare a dataset, embed it, cache SHDD targets, build an anchor set.

Thin wrappers around the data layer (`locdiff.datasets`, `locdiff.embed`, `locdiff.targets`,
`locdiff.anchorsets`): each opens the store, calls one function, and returns the store key it produced.
Retries with backoff on the I/O-bound ones (downloads, object storage); cache keyed on inputs + stage
version.
"""

from __future__ import annotations

from locdiff.tasks.common import Progress, io_task, open_store


def prepare_dataset(storage: str | None, dataset: str, options: dict | None = None) -> str:
    """Build the embedded sample, prepare a dataset from a manifest (options["manifest"]), or reuse a
    dataset already committed in the store; returns its key."""
    from locdiff.datasets.registry import REGISTRY

    store = open_store(storage)
    options = dict(options or {})
    spec = REGISTRY.get(dataset.lower())
    if spec is not None and spec.kind == "embedded":
        from locdiff.datasets.bluemarble import DEFAULT_N, build_bluemarble

        n = int(options.get("n", DEFAULT_N))
        bar = Progress("prepare", f"building {dataset} ({n} tiles)")
        key = build_bluemarble(store, progress=lambda shards, rows: bar(rows, n), **options)
        bar.done()
        return key
    if options.get("manifest"):
        from locdiff.datasets.prepare import prepare_from_manifest

        bar = Progress("prepare", f"preparing {dataset}")
        key = prepare_from_manifest(store, dataset.lower(), **options)
        bar.done()
        return key
    key = store.latest("datasets", dataset.lower())
    if key is None:
        from locdiff.errors import UserError

        how = spec.obtain if spec is not None else "pass dataset_options={'manifest': FILE}"
        raise UserError(f"dataset {dataset!r} is not in the store {store.url}", how)
    return key


def dataset_available(storage: str | None, dataset: str) -> str | None:
    """The key of the newest committed dataset artifact of that name, or None when absent."""
    return open_store(storage).latest("datasets", dataset.lower())


def embed_dataset(storage: str | None, dataset_key: str, encoder: str, options: dict | None = None) -> str:
    """Embed every image of a dataset artifact with an encoder of the registry; returns the key."""
    from locdiff.embed import embed_dataset as _embed

    store = open_store(storage)
    bar = Progress("embed", f"embedding {dataset_key.split('/')[1]} with {encoder}")
    from locdiff.tasks.predict import encoder_kwargs

    key = _embed(store, dataset_key, progress=bar, **encoder_kwargs(encoder), **dict(options or {}))
    bar.done()
    return key


def cache_targets(storage: str | None, embeddings_key: str, max_degree: int) -> str:
    """SHDD targets of degree L for an embeddings artifact; returns the key."""
    from locdiff.targets import build_targets

    return build_targets(open_store(storage), embeddings_key, max_degree)


def build_anchors(
    storage: str | None, kind: str = "uniform", n: int = 10_000, source_key: str | None = None
) -> str:
    """An anchor-set artifact (uniform / from a dataset's coordinates / land); returns the key."""
    from locdiff.anchorsets import build_anchor_set

    return build_anchor_set(open_store(storage), kind, n, dataset_key=source_key)


prepare_task = io_task(prepare_dataset, "prepare", timeout_seconds=48 * 3600, name="prepare-dataset")
# embedding resumes at shard granularity, so a retry redoes little
embed_task = io_task(embed_dataset, "embed", timeout_seconds=48 * 3600)
targets_task = io_task(cache_targets, "targets", timeout_seconds=12 * 3600)
anchors_task = io_task(build_anchors, "anchors", timeout_seconds=3600)
