"""Stage flow: prepare a dataset (registry name or the embedded sample) into the store."""

from __future__ import annotations

from prefect import flow

from locdiff.tasks.data import prepare_task


@flow(name="prepare-dataset", log_prints=True)
def prepare_dataset_flow(
    dataset: str = "bluemarble", options: dict | None = None, storage: str | None = None
) -> str:
    """Download/validate/shard `dataset` (or build the embedded sample); returns the dataset key."""
    return prepare_task(storage, dataset, options or {})
