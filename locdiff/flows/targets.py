"""Stage flow: cache SHDD targets of degree L for an embeddings artifact."""

from __future__ import annotations

from prefect import flow

from locdiff.tasks.data import targets_task


@flow(name="targets", log_prints=True)
def targets_flow(embeddings_key: str, max_degree: int = 16, storage: str | None = None) -> str:
    return targets_task(storage, embeddings_key, max_degree)
