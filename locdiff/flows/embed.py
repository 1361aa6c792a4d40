"""Stage flow: embed a prepared dataset with an encoder of the registry."""

from __future__ import annotations

from prefect import flow

from locdiff.tasks.data import embed_task


@flow(name="embed", log_prints=True)
def embed_flow(
    dataset_key: str,
    encoder: str = "efficientnet-lite0",
    options: dict | None = None,
    storage: str | None = None,
) -> str:
    """Image embeddings of every image of `dataset_key`; returns the embeddings key."""
    return embed_task(storage, dataset_key, encoder, options or {})
