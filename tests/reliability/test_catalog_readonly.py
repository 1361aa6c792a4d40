"""`locdiff sql` and the catalog are read-only: nothing a query says can write, attach, install or read
outside the store's views, and one corrupt part does not break every query."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from locdiff.catalog import PROTOCOL, CatalogWarning, connect
from locdiff.storage import Store


@pytest.fixture
def store(tmp_path):
    return Store.from_uri("file://" + str(tmp_path / "store"))


def _eval_artifact(store, run, acc):
    key = store.key("eval", f"{run}/im2gps3k", "1", {"run": run})
    with store.writer(key, version="1", config={"run": run}) as w:
        w.write_table(
            "predictions.parquet",
            pa.table({"method": ["locdiff"] * 2, "image_id": ["a", "b"], "distance_km": [1.0, 3000.0]}),
        )
        w.write_table("metrics.parquet", pa.table({"method": ["locdiff"], "acc_25km": [acc], "n": [2]}))
    return key


def _refused(con, query: str) -> str:
    with pytest.raises(duckdb.Error) as info:
        con.execute(query).fetchall()
    return str(info.value)


def test_sql_cannot_write_attach_install_or_read_outside(store, tmp_path):
    key = _eval_artifact(store, "r1", 0.5)
    metrics = Path(store.uri(key, "metrics.parquet"))
    before = metrics.read_bytes()
    outside = tmp_path / "outside.csv"
    outside.write_text("secret,x\n1,2\n")
    con = connect(store)
    assert con.execute("SELECT acc_25km FROM metrics").fetchall() == [(0.5,)]
    local_frame = pa.table({"secret": ["x"]})  # noqa: F841 - SQL must not reach the caller's objects
    with pytest.raises(duckdb.CatalogException):
        con.execute("SELECT * FROM local_frame").fetchall()
    probes = [
        f"COPY (SELECT 'locdiff' AS method, 1.0 AS acc_25km) TO '{metrics}' (FORMAT parquet)",
        f"COPY (SELECT 1) TO '{tmp_path / 'new.csv'}'",
        f"COPY (SELECT 1) TO '{PROTOCOL}://{key}/manifest.json'",
        f"COPY (SELECT 1) TO '{PROTOCOL}://{key}/x.csv'",
        f"SELECT * FROM read_csv('{outside}')",
        f"SELECT * FROM read_text('{metrics}')",  # even the store's own files: only through the views
        f"SELECT * FROM read_text('{PROTOCOL}://{key}/manifest.json')",  # not a view's file
        f"SELECT * FROM read_text('{PROTOCOL}://../../{outside.name}')",
        f"SELECT * FROM glob('{tmp_path}/*')",
        f"ATTACH '{tmp_path / 'x.duckdb'}' AS x",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "SET allowed_directories = ['/']",
        f"EXPORT DATABASE '{tmp_path / 'export'}'",
        "CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')",
        "SET python_enable_replacements = true",
    ]
    for q in probes:
        msg = _refused(con, q)
        assert any(w in msg for w in ("Permission", "read-only", "locked", "not a committed")), (q, msg)
    assert metrics.read_bytes() == before
    assert not (tmp_path / "new.csv").exists() and not (tmp_path / "x.duckdb").exists()
    assert not (tmp_path / "export").exists()
    assert store.verify(key) == []
    assert con.execute("SELECT acc_25km FROM metrics").fetchall() == [(0.5,)]


def test_cli_refuses_with_one_line_and_still_writes_its_own_outputs(store, tmp_path):
    key = _eval_artifact(store, "r1", 0.5)
    metrics = Path(store.uri(key, "metrics.parquet"))
    env = {**os.environ, "LOCDIFF_STORAGE": store.url}
    cmd = [sys.executable, "-m", "locdiff.cli", "sql"]
    res = subprocess.run(
        [*cmd, f"COPY (SELECT 1 AS n) TO '{metrics}' (FORMAT parquet)"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.startswith("error: SQL refused:")
    assert "read-only" in res.stderr
    assert store.verify(key) == []
    out = tmp_path / "m.parquet"
    res = subprocess.run(
        [*cmd, "SELECT method, acc_25km FROM metrics", "--format", "parquet", "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert pq.read_table(out).to_pylist() == [{"method": "locdiff", "acc_25km": 0.5}]


def test_one_corrupt_part_is_left_out_with_a_warning_naming_it(store):
    k1, k2, k3 = (_eval_artifact(store, r, a) for r, a in (("r1", 0.5), ("r2", 0.25), ("r3", 0.75)))
    truncated = Path(store.uri(k1, "predictions.parquet"))
    truncated.write_bytes(truncated.read_bytes()[:-20])
    tampered = Path(store.uri(k2, "metrics.parquet"))  # same size, different bytes: a forged value
    data = bytearray(tampered.read_bytes())
    data[4] ^= 0xFF
    tampered.write_bytes(bytes(data))
    seen: list[str] = []
    con = connect(store, on_warning=seen.append)
    assert sorted(r[0] for r in con.execute("SELECT key FROM artifacts").fetchall()) == sorted([k1, k2, k3])
    assert con.execute("SELECT key FROM metrics ORDER BY key").fetchall() == sorted([(k1,), (k3,)])
    assert sorted(r[0] for r in con.execute("SELECT DISTINCT key FROM predictions").fetchall()) == sorted(
        [k2, k3]
    )
    assert any(f"artifact {k1}, part predictions.parquet fails its checksum" in w for w in seen), seen
    assert any(f"artifact {k2}, part metrics.parquet fails its checksum" in w for w in seen), seen
    # without hashing, the size check still catches the truncated part
    with pytest.warns(CatalogWarning, match=f"artifact {k1}, part predictions.parquet"):
        con = connect(store, verify=False)
    assert con.execute("SELECT count(*) FROM predictions").fetchall() == [(4,)]


@pytest.mark.e2e
def test_s3_catalog_cannot_write_through_the_registered_filesystem(s3_store):
    store = s3_store
    key = _eval_artifact(store, "r1", 0.5)
    uri = store.uri(key, "metrics.parquet")  # s3://bucket/store/...
    man_uri = uri.split("/_attempts/", 1)[0] + "/manifest.json"
    before = store.manifest(key)
    con = connect(store)
    assert con.execute("SELECT acc_25km FROM metrics").fetchall() == [(0.5,)]
    for q in [
        f"COPY (SELECT 1 AS n) TO '{man_uri}'",
        f"COPY (SELECT 1 AS n) TO '{uri}' (FORMAT parquet)",
        f"COPY (SELECT 1 AS n) TO '{PROTOCOL}://{key}/manifest.json'",
        f"SELECT * FROM read_text('{man_uri}')",
    ]:
        _refused(con, q)
    assert store.manifest(key) == before and store.verify(key) == []
