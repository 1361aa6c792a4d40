"""The pipeline's stages: one module per artifact kind, no Prefect (that lives in ``locdiff.flows``).

Each module owns its artifact's key, build and load:

| stage (store prefix) | module        | artifact                                                      |
|----------------------|---------------|---------------------------------------------------------------|
| ``datasets``         | datasets.py   | manifest + tar shards (built by ``locdiff.datasets``)         |
| ``embeddings``       | embeddings.py | per-shard parts: image_id, embedding, lat, lon, split         |
| ``targets``          | targets.py    | SHDD codes per embedding part, same rows                      |
| ``anchors``          | anchors.py    | anchor coordinates (uniform / data / land)                    |
| ``runs``             | runs.py       | checkpoints, curves                                           |
| ``retrieval``        | retrieval.py  | gallery index: normalised train embeddings + coordinates      |
| ``eval``             | evals.py      | predictions, metrics                                          |
| ``reports``          | reports.py    | report.md, figures, metrics.json                              |
| ``aliases``          | aliases.py    | one model-name change (tag/untag of a run)                    |

``VERSIONS`` is the one version table: bump a stage's entry when what it writes changes, and its keys
(and every key downstream, through ``upstream``) change with it. :func:`get_or_build` is the one
"key → committed? → writer → commit" path every stage uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from locdiff.storage import ArtifactWriter, Store

VERSIONS = {
    "datasets": "1",
    "embeddings": "2",
    "targets": "4",  # 4: the codes only in the .npy arrays (the Parquet parts keep image_id, split)
    "anchors": "2",
    "runs": "2",
    "retrieval": "1",
    "eval": "4",  # 4: mode masses are probabilities (a point-mass fit), mass reliability in the metrics
    "reports": "4",  # 3: metrics rows carry geoscore and radius coverage; 4: mode-mass reliability tables
    "aliases": "1",
}
STAGES = tuple(VERSIONS)


def stage_key(store: Store, stage: str, name: str, config: dict, upstream: Iterable[str] = ()) -> str:
    """The content-addressed key of a stage's artifact (stage version + config + upstream keys)."""
    if stage not in VERSIONS:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return store.key(stage, name, VERSIONS[stage], config, list(upstream))


def get_or_build(
    store: Store,
    stage: str,
    name: str,
    config: dict,
    upstream: Iterable[str],
    build: Callable[[ArtifactWriter], None],
    commit: bool = True,
) -> str:
    """The key of ``stage``'s artifact for (config, upstream): reused when committed, else built.

    ``build(writer)`` writes the files (parts it commits survive a crash; the next attempt's writer
    reports them done) and the artifact is committed when it returns. A committed key is never rebuilt
    (its content is what its key names): a rebuild takes a different config or upstream.

    With ``commit=False`` the artifact is left uncommitted: ``build`` only commits (or asks about)
    parts, for a stage whose parts several processes write and whose own call commits them.
    """
    upstream = list(upstream)
    key = stage_key(store, stage, name, config, upstream)
    if store.exists(key):
        return key
    w = store.writer(key, version=VERSIONS[stage], config=config, upstream=upstream)
    if not commit:
        build(w)
        return key
    with w:
        build(w)
    return key
