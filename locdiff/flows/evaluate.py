"""Stage flow: evaluate a trained run on one split of an embeddings artifact (plus baselines)."""

from __future__ import annotations

from prefect import flow

from locdiff.tasks.evaluate import BASELINES, evaluate_task


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    run_key: str,
    embeddings_key: str,
    split: str | None = "test",
    dataset: str | None = None,
    baselines: list[str] | None = None,
    storage: str | None = None,
) -> str:
    """Returns the eval key (predictions.parquet + metrics.parquet)."""
    return evaluate_task(
        storage, run_key, embeddings_key, split, dataset, list(BASELINES if baselines is None else baselines)
    )
