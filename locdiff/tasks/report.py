"""The report task: metrics table + markdown report (map, error CDF) as Prefect artifacts and in the store."""

from __future__ import annotations

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from locdiff import report as rp
from locdiff.tasks.common import STAGE_VERSIONS, open_store


def _artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    import re

    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")[:100]


def build_report(
    storage: str | None,
    eval_keys: list[str],
    title: str = "LocDiff evaluation",
    notes: list[str] | None = None,
) -> dict:
    """Write ``reports/<title>/<hash>`` (report.md, map-<dataset>.png, cdf-<dataset>.png, metrics.json)
    and publish a table artifact and a markdown artifact when running inside a flow.

    Returns ``{"key", "rows", "report", "images": {name: location}, "text_table"}``.
    """
    import json

    store = open_store(storage)
    notes = list(notes or [])
    rows: list[dict] = []
    figures: dict[str, tuple[str, bytes]] = {}
    for ek in eval_keys:
        man = store.manifest(ek)
        metrics = man.get("metrics", {})
        dataset = next(iter(metrics.values()), {}).get("dataset") or ek.split("/")[2]
        rows += rp.metrics_rows(dataset, metrics)
        preds = store.read_table(ek, "predictions.parquet").to_pandas()
        main = preds[preds["method"] == "locdiff"] if (preds["method"] == "locdiff").any() else preds
        figures[f"map-{dataset}.png"] = (
            f"Predictions vs truth on {dataset}",
            rp.world_map_png(
                main["true_lat"].to_numpy(),
                main["true_lon"].to_numpy(),
                main["pred_lat"].to_numpy(),
                main["pred_lon"].to_numpy(),
                title=f"{dataset}: LocDiff predictions (x) vs truth (•)",
            ),
        )
        dists = {
            m: g["distance_km"].to_numpy(dtype=np.float64) for m, g in preds.groupby("method", sort=False)
        }
        figures[f"cdf-{dataset}.png"] = (
            f"Error-distance CDF on {dataset}",
            rp.error_cdf_png(dists, title=f"{dataset}: fraction of images within distance"),
        )

    cfg = {"title": title, "notes": notes}
    key = store.key("reports", _artifact_key(title) or "report", STAGE_VERSIONS["report"], cfg, eval_keys)
    with store.writer(key, config=cfg, upstream=eval_keys) as w:
        for fname, (_, png) in figures.items():
            w.write_bytes(fname, png)
        w.write_bytes("metrics.json", json.dumps(rows, indent=1).encode())
        # the markdown stored in the store links its images by relative file name
        stored_md = rp.markdown_report(
            title, rows, {cap: (fname, None) for fname, (cap, _) in figures.items()}, notes
        )
        w.write_bytes("report.md", stored_md.encode())
    images = {fname: store.uri(key, fname) for fname in figures}
    report_uri = store.uri(key, "report.md")
    ui_md = rp.markdown_report(
        title, rows, {cap: (images[fname], png) for fname, (cap, png) in figures.items()}, notes
    )
    _publish(title, rows, ui_md, report_uri)
    return {
        "key": key,
        "rows": rows,
        "report": report_uri,
        "images": images,
        "text_table": rp.text_table(rows),
    }


def _publish(title: str, rows: list[dict], markdown: str, report_uri: str) -> None:
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        from prefect.context import get_run_context

        get_run_context()
    except Exception:  # noqa: BLE001 - outside a run: nothing to publish to
        return
    base = _artifact_key(title) or "report"
    create_table_artifact(
        table=[
            {k: r.get(k) for k in ("dataset", "method", "source", *rp.ACC_KEYS, "median_km", "n")}
            for r in rows
        ],
        key=f"{base}-metrics",
        description=f"{title}: accuracy (%) at 1/25/200/750/2500 km beside published figures",
    )
    create_markdown_artifact(markdown=markdown, key=f"{base}-report", description=f"{title} ({report_uri})")


# Not cached: it is cheap, and every run should publish its own table and markdown artifacts.
report_task = task(build_report, name="report", cache_policy=NO_CACHE)
