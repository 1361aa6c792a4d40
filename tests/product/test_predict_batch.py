"""`locdiff predict` in batch: files, folders, globs and manifests in; CSV/Parquet/GeoJSON out;
unreadable images become error rows; bad arguments are one line and exit code 2."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from PIL import Image

from tests.product.conftest import cli, write_image


def _inputs(tmp_path):
    root = tmp_path / "photos"
    write_image(root / "a.jpg", color=(10, 80, 200))
    write_image(root / "sub" / "deeper" / "b.png", size=(40, 120), color=(200, 180, 90))
    (root / "sub" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "notes.txt").write_text("ignored: not an image extension")
    truncated = write_image(tmp_path / "t.jpg", size=(300, 300)).read_bytes()
    (root / "sub" / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    other = write_image(tmp_path / "more" / "c.jpeg", color=(0, 0, 0))
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"image_id,path\nm1,{other}\nm2,more/missing.jpg\n")
    return root, manifest


def test_folder_glob_manifest_to_csv_parquet_geojson(tmp_path, tiny_store, run_key):
    root, manifest = _inputs(tmp_path)
    out_csv = tmp_path / "out.csv"
    code, out, err = cli(
        "predict",
        str(root),
        str(tmp_path / "more" / "*.jpeg"),
        str(manifest),
        "--out",
        str(out_csv),
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--model",
        run_key,
        store=tiny_store,
    )
    assert code == 0, err
    assert "wrote 7 rows" in out and "(3 unreadable)" in err
    import pandas as pd

    df = pd.read_csv(out_csv)
    assert list(df.columns[:5]) == ["id", "path", "error", "lat", "lon"]
    assert {"mode1_lat", "mode1_lon", "mode1_mass", "score"} <= set(df.columns)
    by_id = df.set_index("id")
    assert set(by_id.index) == {
        *("a.jpg", "sub/deeper/b.png", "sub/broken.jpg", "sub/truncated.jpg", "c.jpeg", "m1", "m2")
    }
    ok = by_id[by_id.error.isna()]
    assert len(ok) == 4 and ok.lat.between(-90, 90).all() and ok.lon.between(-180, 180).all()
    assert (ok.mode1_mass > 0).all()
    assert "not a decodable image" in by_id.loc["sub/broken.jpg", "error"]
    assert "truncated" in by_id.loc["sub/truncated.jpg", "error"]
    assert "not found" in by_id.loc["m2", "error"] and by_id.loc["m2"].isna()["lat"]

    out_pq, out_gj = tmp_path / "out.parquet", tmp_path / "out.geojson"
    for dest in (out_pq, out_gj):
        code, _, err = cli("predict", str(root), "--out", str(dest), "--no-progress", store=tiny_store)
        assert code == 0, err
    t = pq.read_table(out_pq)
    assert t.num_rows == 4 and t.schema.field("lat").type == "double"
    gj = json.loads(out_gj.read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 4
    good = [f for f in gj["features"] if f["geometry"]]
    bad = [f for f in gj["features"] if not f["geometry"]]
    assert len(good) == 2 and len(bad) == 2 and all(f["properties"]["error"] for f in bad)
    lon, lat = good[0]["geometry"]["coordinates"]
    assert lat == good[0]["properties"]["lat"] and lon == good[0]["properties"]["lon"]


def test_stdout_and_map(tmp_path, tiny_store):
    img = write_image(tmp_path / "x.jpg")
    big = tmp_path / "huge.png"
    Image.new("1", (12000, 8000)).save(big)  # 96 M pixels: above PIL's limit, refused from the header
    code, out, err = cli("predict", str(img), str(big), "--map", str(tmp_path / "m.png"), store=tiny_store)
    assert code == 0, err
    assert (
        "x.jpg:" in out
        and "mode 1:" in out
        and "huge.png: error: decompression bomb (12000x8000 pixels" in out
    )
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments_are_one_line_exit_2(tmp_path, tiny_store):
    img = write_image(tmp_path / "x.jpg")
    bad_manifest = tmp_path / "m.csv"
    bad_manifest.write_text("foo,bar\n1,2\n")
    cases = [
        (("predict", str(tmp_path / "nope.jpg")), "no such file"),
        (("predict", str(tmp_path / "*.webp")), "matches no file"),
        (("predict", str(img), "--out", str(tmp_path / "o.txt")), "output format"),
        (("predict", str(bad_manifest)), "no image column"),
        (("predict", str(img), "--device", "tpu"), "unknown --device"),
        (("predict", str(img), "--model", "nosuchname"), "no model is named"),
        (("predict", str(tmp_path / "empty_dir_missing")), "no such file"),
    ]
    for args, msg in cases:
        code, _, err = cli(*args, store=tiny_store)
        assert code == 2, (args, err)
        assert msg in err and "Traceback" not in err, (args, err)


def test_manifest_of_urls_dead_links_become_error_rows(tmp_path, tiny_store, http_files):
    write_image(http_files.root / "good.jpg")
    manifest = tmp_path / "urls.parquet"
    import pyarrow as pa

    pq.write_table(
        pa.table({"url": [f"{http_files.url}/good.jpg", f"{http_files.url}/gone.jpg"], "id": ["u1", "u2"]}),
        manifest,
    )
    out_csv = tmp_path / "u.csv"
    code, out, err = cli("predict", str(manifest), "--out", str(out_csv), store=tiny_store)
    assert code == 0, err
    import pandas as pd

    df = pd.read_csv(out_csv).set_index("id")
    assert pd.isna(df.loc["u1", "error"]) and -90 <= df.loc["u1", "lat"] <= 90
    assert "HTTP 404" in df.loc["u2", "error"]
