"""DuckDB catalog over the artifact store: one connection factory, views over committed artifacts.

Convention (what each stage's committed artifact holds, so the views can find it):

| stage        | file(s)                     | view          |
|--------------|-----------------------------|---------------|
| (any)        | manifest.json               | ``artifacts`` (one row per committed artifact) |
| ``datasets`` | ``manifest.parquet``        | ``datasets``  (one row per image)               |
| ``embeddings``| ``part-*.parquet`` (any folder) | ``embeddings`` (one row per image)      |
| ``runs``     | manifest.json; ``curves.parquet`` | ``runs`` (one row per run); ``curves``    |
| ``eval``     | ``predictions.parquet``, ``metrics.parquet`` | ``predictions``, ``metrics``  |
| ``aliases``  | manifest.json               | ``aliases`` (one row per model-name change; ``current``) |

Every view also has ``key`` (the artifact key) and ``name`` (the artifact name) columns. A view over
zero artifacts still exists, empty, with its core columns, so queries never fail on a fresh store.
The store's fsspec filesystem is registered with DuckDB (``register_filesystem``), so S3 artifacts are
read in place without the httpfs extension (which cannot be downloaded offline). Views are a snapshot
of what was committed when :func:`connect` ran; call it again (or :func:`refresh`) to see new artifacts.
"""

from __future__ import annotations

import fnmatch
import json

import duckdb
import pyarrow as pa

from locdiff.storage import Store

VIEWS = ("artifacts", "datasets", "embeddings", "runs", "curves", "predictions", "metrics", "aliases")

# (stage, file pattern) feeding each Parquet-backed view, and its columns when empty.
_SOURCES = {
    "datasets": ("datasets", "manifest.parquet"),
    "embeddings": ("embeddings", "part-*.parquet"),
    "curves": ("runs", "curves.parquet"),
    "predictions": ("eval", "predictions.parquet"),
    "metrics": ("eval", "metrics.parquet"),
}
_EMPTY: dict[str, list[tuple[str, str]]] = {
    "datasets": [
        ("image_id", "VARCHAR"),
        ("lat", "DOUBLE"),
        ("lon", "DOUBLE"),
        ("split", "VARCHAR"),
        ("shard", "VARCHAR"),
        ("member", "VARCHAR"),
        ("offset", "BIGINT"),
        ("size", "BIGINT"),
        ("source", "VARCHAR"),
    ],
    "embeddings": [("image_id", "VARCHAR"), ("embedding", "FLOAT[]"), ("lat", "DOUBLE"), ("lon", "DOUBLE")],
    "curves": [("step", "BIGINT"), ("metric", "VARCHAR"), ("value", "DOUBLE")],
    "predictions": [
        ("method", "VARCHAR"),
        ("image_id", "VARCHAR"),
        ("true_lat", "DOUBLE"),
        ("true_lon", "DOUBLE"),
        ("pred_lat", "DOUBLE"),
        ("pred_lon", "DOUBLE"),
        ("distance_km", "DOUBLE"),
        ("score", "DOUBLE"),
    ],
    "metrics": [
        ("run", "VARCHAR"),
        ("dataset", "VARCHAR"),
        ("split", "VARCHAR"),
        ("method", "VARCHAR"),
        *[(f"acc_{r}km", "DOUBLE") for r in (1, 25, 200, 750, 2500)],
        ("median_km", "DOUBLE"),
        ("mean_km", "DOUBLE"),
        ("geoscore", "DOUBLE"),
        ("n", "BIGINT"),
    ],
}
_ARTIFACT_CORE = (
    "key",
    "stage",
    "name",
    "hash",
    "version",
    "created_at",
    "rows",
    "n_files",
    "bytes",
    "upstream",
    "config",
    "code",
    "files",
)


def _q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _artifacts_table(manifests: list[dict]) -> pa.Table:
    rows = []
    for m in manifests:
        extra = {k: v for k, v in m.items() if k not in _ARTIFACT_CORE and k != "attempt"}
        rows.append(
            {
                "key": m["key"],
                "stage": m.get("stage"),
                "name": m.get("name"),
                "hash": m.get("hash"),
                "version": m.get("version"),
                "created_at": m.get("created_at"),
                "rows": m.get("rows"),
                "n_files": m.get("n_files", len(m.get("files", []))),
                "bytes": m.get("bytes"),
                "upstream": list(m.get("upstream") or []),
                "git_commit": (m.get("code") or {}).get("git_commit"),
                "config": json.dumps(m.get("config"), sort_keys=True),
                "info": json.dumps(extra, sort_keys=True, default=str),
            }
        )
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("stage", pa.string()),
            ("name", pa.string()),
            ("hash", pa.string()),
            ("version", pa.string()),
            ("created_at", pa.string()),
            ("rows", pa.int64()),
            ("n_files", pa.int64()),
            ("bytes", pa.int64()),
            ("upstream", pa.list_(pa.string())),
            ("git_commit", pa.string()),
            ("config", pa.string()),
            ("info", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def connect(store: Store | str | None = None, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the store's filesystem registered and the catalog views created."""
    if not isinstance(store, Store):
        store = Store.from_uri(store)
    con = duckdb.connect(database)
    if not store.is_local:
        con.register_filesystem(store.fs)
    refresh(con, store)
    return con


def refresh(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    """(Re)create every view from the store's committed artifacts."""
    manifests = store.list()
    con.register("_locdiff_artifacts", _artifacts_table(manifests))
    con.execute(
        "CREATE OR REPLACE VIEW artifacts AS SELECT *, CAST(created_at AS TIMESTAMP) AS created "
        "FROM _locdiff_artifacts"
    )
    con.execute(
        "CREATE OR REPLACE VIEW runs AS SELECT key, name, created, rows, config, info, git_commit "
        "FROM artifacts WHERE stage = 'runs'"
    )
    con.execute(
        "CREATE OR REPLACE VIEW aliases AS SELECT key, name AS alias, "
        "json_extract_string(info, '$.run') AS run, json_extract_string(info, '$.action') AS action, "
        "created, row_number() OVER (PARTITION BY name ORDER BY created DESC, key DESC) = 1 AS current "
        "FROM artifacts WHERE stage = 'aliases'"
    )
    for view, (stage, pattern) in _SOURCES.items():
        files: list[tuple[str, str, str]] = []  # (uri, key, name)
        for m in manifests:
            if m.get("stage") != stage:
                continue
            for f in m["files"]:
                base = f["relpath"].rsplit("/", 1)[-1]
                if fnmatch.fnmatchcase(base, pattern):
                    files.append((store.entry_uri(m["key"], f), m["key"], m.get("name")))
        _create_view(con, view, files)


def _create_view(con: duckdb.DuckDBPyConnection, view: str, files: list[tuple[str, str, str]]) -> None:
    if not files:
        cols = ", ".join(f'NULL::{typ} AS "{col}"' for col, typ in _EMPTY[view])
        con.execute(
            f"CREATE OR REPLACE VIEW {view} AS SELECT NULL::VARCHAR AS key, NULL::VARCHAR AS name, {cols} "
            "WHERE false"
        )
        return
    mapping = pa.table(
        {"_file": [u for u, _, _ in files], "key": [k for _, k, _ in files], "name": [n for _, _, n in files]}
    )
    con.register(f"_locdiff_{view}_files", mapping)
    uris = ", ".join(_q(u) for u, _, _ in files)
    con.execute(
        f"CREATE OR REPLACE VIEW {view} AS SELECT f.key, f.name, "
        "COLUMNS(lambda c: c NOT IN ('filename', '_file', 'key', 'name')) "
        f"FROM read_parquet([{uris}], union_by_name = true, filename = true) t "
        f"JOIN _locdiff_{view}_files f ON t.filename = f._file"
    )
