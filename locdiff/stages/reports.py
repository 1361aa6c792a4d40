"""Reports: the metrics table and markdown report (map, error CDF) of evaluations, in the store.

``reports/<title>/<hash>`` (upstream: the evaluations) holds report.md, map-<dataset>.png,
map-<dataset>.html (the interactive offline map, ``locdiff.mapview``), cdf-<dataset>.png,
reliability-<dataset>.png (coverage of LocDiff's credible radii), training-curves.png (the evaluated run's
curves) and metrics.json.
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
    maps: dict[str, tuple[str, bytes]] = {}  # file name -> (dataset, HTML)
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
        maps[f"map-{dataset}.html"] = (dataset, _map_html(main, dataset))
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

    curves = _training_curves(store, eval_keys)
    if curves:
        figures["training-curves.png"] = curves
    cfg = {"title": title, "notes": notes, "figures": 2}  # 2: with the HTML maps and training curves

    def map_notes(where) -> list[str]:
        return [
            f"Interactive map of {ds} (one offline HTML file; open it in a browser): `{where(fname)}`"
            for fname, (ds, _) in maps.items()
        ]

    def build(w) -> None:
        for fname, (_, data) in (figures | maps).items():
            w.write_bytes(fname, data)
        w.write_bytes("metrics.json", json.dumps(rows, indent=1).encode())
        # the markdown stored in the store links its images by relative file name
        stored_md = rp.markdown_report(
            title,
            rows,
            {cap: (fname, None) for fname, (cap, _) in figures.items()},
            notes + map_notes(str),
            sections=sections,
        )
        w.write_bytes("report.md", stored_md.encode())

    key = get_or_build(store, STAGE, slug(title) or "report", cfg, eval_keys, build)
    images = {fname: store.uri(key, fname) for fname in figures | maps}
    report_uri = store.uri(key, "report.md")
    ui_md = rp.markdown_report(
        title,
        rows,
        {cap: (images[fname], png) for fname, (cap, png) in figures.items()},
        notes + map_notes(images.get),
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


def _map_html(preds, dataset: str) -> bytes:
    """The interactive offline map of one evaluation's predictions (truth -> prediction, by error)."""
    from locdiff import mapview

    items = mapview.evaluation_items(preds)
    title = f"{dataset}: LocDiff predictions vs truth ({len(items)} of {len(preds)} images)"
    return mapview.page_html(items, title).encode()


def _training_curves(store: Store, eval_keys: list[str]) -> tuple[str, bytes] | None:
    """(caption, PNG) of the training curves of the run the evaluations evaluate (the first one's)."""
    import json

    for ek in eval_keys:
        run_key = next((u for u in store.manifest(ek).get("upstream", []) if u.startswith("runs/")), None)
        if run_key and store.exists(run_key):
            try:
                curves = json.loads(store.read_bytes(run_key, "curves.json"))
            except FileNotFoundError:
                continue
            return f"Training curves of {run_key}", rp.training_curves_png(curves, title=run_key)
    return None
