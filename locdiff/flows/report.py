"""Stage flow: the metrics table and markdown report (map, error CDF) of evaluations."""

from __future__ import annotations

from prefect import flow

from locdiff.tasks.report import report_task


@flow(name="report", log_prints=True)
def report_flow(
    eval_keys: list[str],
    title: str = "LocDiff evaluation",
    notes: list[str] | None = None,
    storage: str | None = None,
) -> dict:
    """Publishes a table artifact and a markdown artifact; returns {key, rows, report, images, text_table}."""
    return report_task(storage, eval_keys, title, notes or [])
