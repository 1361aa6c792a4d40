"""Stage flow: build an anchor set (uniform lattice, a dataset's coordinates, or land-only)."""

from __future__ import annotations

from prefect import flow

from locdiff.tasks.data import anchors_task


@flow(name="anchors", log_prints=True)
def anchors_flow(
    kind: str = "uniform", n: int = 10_000, source_key: str | None = None, storage: str | None = None
) -> str:
    return anchors_task(storage, kind, n, source_key)
