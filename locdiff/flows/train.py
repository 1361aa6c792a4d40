"""Stage flow: train (or resume) LocDiff on an embeddings artifact."""

from __future__ import annotations

from prefect import flow

from locdiff.tasks.train import train_task


@flow(name="train", log_prints=True)
def train_flow(
    embeddings_key: str,
    preset: str = "tiny",
    overrides: dict | None = None,
    name: str | None = None,
    storage: str | None = None,
    refresh: bool = False,
) -> str:
    """Returns the run key; a re-run after a crash resumes from the run's newest checkpoint."""
    t = train_task.with_options(refresh_cache=True) if refresh else train_task
    return t(storage, embeddings_key, preset, overrides or {}, name)
