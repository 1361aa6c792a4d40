"""The interactive offline maps (locdiff.mapview) in headless Chromium with the network off: the
evaluation report's map, `locdiff predict --map FILE.html`, and the page `locdiff serve` answers GET /
with (a tile uploaded through it). Each page must load with no failed and no outside request, show
its markers in the DOM and render a non-blank screenshot. Screenshots go to $LOCDIFF_SCREENSHOTS
when it is set (for a look), else to the test's temporary folder."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np
import pytest

from locdiff.storage import Store
from tests.browser import browser_page, screenshot_is_not_blank
from tests.product.conftest import cli
from tests.product.test_serve import server  # noqa: F401 - the module's running `locdiff serve`

POINTS = "g.trace{uid} path.point"  # plotly draws trace `uid` as <g class="trace{uid}">


def _shots(tmp_path: Path) -> Path:
    d = Path(os.environ.get("LOCDIFF_SCREENSHOTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _check_loaded(b, shot: Path) -> None:
    png = b.page.screenshot(path=str(shot))
    ok, sd = screenshot_is_not_blank(png)
    assert ok, f"screenshot looks blank (grey-level sd {sd:.1f})"
    assert b.blocked == [], f"requests to the network: {b.blocked}"
    assert b.failed == [], f"failed requests: {b.failed}"
    assert b.errors == [], f"page errors: {b.errors}"


@pytest.fixture(scope="module")
def report(tiny_store, run_key):
    from locdiff.stages.evals import evaluate_run
    from locdiff.stages.reports import build_report

    store = Store.from_uri(tiny_store)
    emb_key = store.manifest(run_key)["embeddings"]
    ek = evaluate_run(store, run_key, emb_key, split="test", dataset="maptest", baselines=[])
    return store, ek, build_report(store, [ek], title="map test")


def test_report_stores_the_html_map_and_training_curves(report, tmp_path):
    store, ek, out = report
    key = out["key"]
    assert {"map-maptest.html", "training-curves.png"} <= set(store.files(key))
    png = store.read_bytes(key, "training-curves.png")
    (_shots(tmp_path) / "training-curves.png").write_bytes(png)
    assert screenshot_is_not_blank(png)[0]
    # the Prefect artifact's markdown and the stored report say where the map is
    assert out["images"]["map-maptest.html"] in out["ui_markdown"]
    assert "`map-maptest.html`" in store.read_bytes(key, "report.md").decode()
    assert "Training curves of runs/" in out["ui_markdown"]
    html = store.read_bytes(key, "map-maptest.html").decode()
    assert "<script src" not in html.lower() and "<link" not in html.lower()  # all inlined


def test_report_map_in_chromium(report, tmp_path):
    store, ek, out = report
    path = tmp_path / "map.html"
    path.write_bytes(store.read_bytes(out["key"], "map-maptest.html"))
    n = len(store.read_table(ek, "predictions.parquet").to_pandas().query("method == 'locdiff'"))
    with browser_page() as b:
        b.page.goto(path.as_uri())
        b.page.wait_for_selector(POINTS.format(uid="pred"), state="attached", timeout=60_000)
        assert b.page.locator(POINTS.format(uid="pred")).count() == n
        assert b.page.locator(POINTS.format(uid="truth")).count() == n
        assert b.page.locator("g[class*='tracegc'] path.js-line").count() >= 1  # great-circle lines
        assert b.page.locator(POINTS.format(uid="modes")).count() >= n
        # the date line: truth 170E -> prediction 170W is cut at the edge, never drawn across the map
        xs = b.page.evaluate(
            "() => { var x = [], y = [];"
            " LocdiffMap.polyline(LocdiffMap.greatCircle(10, 170, -5, -170, 64), x, y); return x; }"
        )
        runs, cur = [], []
        for v in [*xs, None]:
            if v is None:
                runs, cur = runs + ([cur] if cur else []), []
            else:
                cur.append(v)
        assert len(runs) == 2 and runs[0][-1] == 180 and runs[1][0] == -180
        assert all(np.all(np.abs(np.diff(r)) < 10) for r in runs)
        _check_loaded(b, _shots(tmp_path) / "report-map.png")
        # the mouse wheel zooms in (the x range narrows from the whole world)
        box = b.page.locator("#ld-map .nsewdrag").first.bounding_box()
        b.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for _ in range(5):  # plotly zooms by at most ~10 % per wheel event
            b.page.mouse.wheel(0, -100)
        b.page.wait_for_function(
            "() => { const r = document.getElementById('ld-map').layout.xaxis.range;"
            " return r[1] - r[0] < 300; }"
        )


def test_predict_map_html_in_chromium(tiny_store, run_key, tmp_path):
    from locdiff.commands.predict import write_sample_images

    write_sample_images(tmp_path / "photos", n=3)
    out = tmp_path / "map.html"
    code, stdout, err = cli(
        "predict",
        str(tmp_path / "photos"),
        "--model",
        run_key,
        "--map",
        str(out),
        "--device",
        "cpu",
        store=tiny_store,
    )
    assert code == 0, err
    with browser_page() as b:
        b.page.goto(out.as_uri())
        pred = b.page.locator(POINTS.format(uid="pred"))
        pred.first.wait_for(state="attached", timeout=60_000)
        assert pred.count() == 3
        assert b.page.locator(POINTS.format(uid="modes")).count() >= 3
        assert b.page.locator("g.tracer90 path.js-line").count() >= 3  # a 90 % circle each, maybe cut
        _check_loaded(b, _shots(tmp_path) / "predict-map.png")
        box = pred.first.bounding_box()  # click the first prediction's marker: its popup opens
        b.page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        popup = b.page.locator("#ld-popup")
        assert popup.is_visible()
        assert popup.locator("img.ld-thumb").evaluate("img => img.naturalWidth") > 0  # the thumbnail
        assert popup.locator("table.ld-modes tr").count() >= 2  # a header and at least one mode
        b.page.screenshot(path=str(_shots(tmp_path) / "predict-map-popup.png"))


def test_serve_page_upload_a_tile_and_see_a_marker(server, tmp_path):  # noqa: F811
    from locdiff.commands.predict import write_sample_images

    write_sample_images(tmp_path / "photos", n=1)
    with browser_page(allow_origin=server) as b:
        b.page.goto(server + "/")
        b.page.wait_for_selector("#ld-map .main-svg", state="attached", timeout=60_000)
        assert b.page.locator(POINTS.format(uid="pred")).count() == 0
        b.page.set_input_files("#ld-files", str(tmp_path / "photos" / "tile-000.jpg"))
        b.page.wait_for_selector(POINTS.format(uid="pred"), state="attached", timeout=60_000)
        assert b.page.locator(POINTS.format(uid="pred")).count() == 1
        assert b.page.locator(POINTS.format(uid="modes")).count() >= 1
        assert "1 predicted" in b.page.locator("#ld-status").inner_text()
        # a second photo dropped on the drop zone (a drop event carrying the file)
        data = base64.b64encode((tmp_path / "photos" / "tile-000.jpg").read_bytes()).decode()
        b.page.evaluate(
            """(b64) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
                document.getElementById("ld-drop").dispatchEvent(
                    new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true})); }""",
            data,
        )
        b.page.wait_for_function("document.getElementById('ld-status').textContent.includes('2 predicted')")
        assert b.page.locator(POINTS.format(uid="pred")).count() == 2
        _check_loaded(b, _shots(tmp_path) / "serve-page.png")
