"""Reports: the metrics table and markdown report (map, error CDF) of evaluations, in the store.

``reports/<title>/<hash>`` (upstream: the evaluations) holds report.md, map-<dataset>.png,
cdf-<dataset>.png, reliability-<dataset>.png (coverage of LocDiff's credible radii) and metrics.json.
Publishing them as Prefect artifacts is the flow layer's job (``locdiff.flows.tasks``); this module
returns what it needs.
"""

from __future__ import annotations

import re

import numpy as np

from locdiff import report as rp
from locdiff.stages import get_or_build
from locdiff.storage import Key, Store

STAGE = "reports"


def slug(text: str) -> str:
    """Lowercase letters, digits and dashes (report names, Prefect artifact keys)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")[:100]


def build_report(
    store: Store,
    eval_keys: list[str],
    *,
    title: str = "LocDiff evaluation",
    notes: list[str] | None = None,
) -> dict:
    """Write ``reports/<title>/<hash>``; returns ``{"key", "rows", "report", "images": {name: location},
    "text_table", "ui_markdown"}`` (``ui_markdown`` embeds the figures, for a UI artifact).
    """
    import json

    notes = list(notes or [])
    rows: list[dict] = []
    figures: dict[str, tuple[str, bytes]] = {}
    sections: list[str] = []
    for ek in eval_keys:
        man = store.manifest(ek)
        metrics = man.get("metrics", {})
        dataset = next(iter(metrics.values()), {}).get("dataset") or Key.parse(ek).name.rsplit("/", 1)[-1]
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
        loc = metrics.get("locdiff", {})
        mass_rel = (man.get("mass_reliability") or {}).get("locdiff")
        if mass_rel:
            sections.append(rp.mass_reliability_table(dataset, mass_rel))
        if loc.get("coverage50") is not None:
            series = {"raw": [(50.0, 100 * loc["coverage50"]), (90.0, 100 * loc["coverage90"])]}
            if loc.get("coverage50_cal") is not None:
                series["calibrated on val"] = [
                    (50.0, 100 * loc["coverage50_cal"]),
                    (90.0, 100 * loc["coverage90_cal"]),
                ]
            figures[f"reliability-{dataset}.png"] = (
                f"Credible-radius reliability on {dataset}",
                rp.reliability_png(series, title=f"{dataset}: LocDiff credible radii"),
            )

    cfg = {"title": title, "notes": notes}

    def build(w) -> None:
        for fname, (_, png) in figures.items():
            w.write_bytes(fname, png)
        w.write_bytes("metrics.json", json.dumps(rows, indent=1).encode())
        # the markdown stored in the store links its images by relative file name
        stored_md = rp.markdown_report(
            title, rows, {cap: (fname, None) for fname, (cap, _) in figures.items()}, notes, sections=sections
        )
        w.write_bytes("report.md", stored_md.encode())

    key = get_or_build(store, STAGE, slug(title) or "report", cfg, eval_keys, build)
    images = {fname: store.uri(key, fname) for fname in figures}
    report_uri = store.uri(key, "report.md")
    ui_md = rp.markdown_report(
        title, rows, {cap: (images[fname], png) for fname, (cap, png) in figures.items()}, notes,
        sections=sections,
    )
    return {
        "key": key,
        "rows": rows,
        "report": report_uri,
        "images": images,
        "text_table": rp.text_table(rows),
        "ui_markdown": ui_md,
    }
