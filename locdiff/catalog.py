"""DuckDB catalog over the artifact store: one connection factory, views over committed artifacts.

Convention (what each stage's committed artifact holds, so the views can find it):

| stage        | file(s)                     | view          |
|--------------|-----------------------------|---------------|
| (any)        | manifest.json               | ``artifacts`` (one row per committed artifact) |
| ``datasets`` | ``manifest.parquet``        | ``datasets``  (one row per image)               |
| ``embeddings``| ``part-*.parquet`` (any folder) | ``embeddings`` (one row per image)      |
| ``runs``     | manifest.json; ``curves.parquet`` | ``runs`` (one row per run); ``curves`` (+ in flight) |
| ``eval``     | ``predictions.parquet``, ``metrics.parquet`` | ``predictions``, ``metrics``  |
| ``aliases``  | manifest.json               | ``aliases`` (one row per model-name change; ``current``) |

The ``curves`` view also holds the curves so far of runs still training (``in_flight`` true): the
copy the training stage writes to the run's in-flight area every few steps (``Store.live``), read into
memory when the view is made.
Every view also has ``key`` (the artifact key) and ``name`` (the artifact name) columns. A view over
zero artifacts still exists, empty, with its core columns, so queries never fail on a fresh store.
The catalog is read-only: DuckDB reads the store only through :class:`ReadOnlyStoreFS` (registered with
``register_filesystem``, so S3 artifacts are read in place without the httpfs extension, which cannot be
downloaded offline), which serves the views' committed files and nothing else; DuckDB's own external
access is off and its configuration locked. Views are a snapshot
of what was committed when :func:`connect` ran; call it again (or :func:`refresh`) to see new artifacts.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import warnings
import weakref
from collections.abc import Callable

import duckdb
import fsspec
import pyarrow as pa

from locdiff.datasets.shards import DATASET_SCHEMA
from locdiff.storage import Store, hash_file
from locdiff_core.metrics import ACC_KEYS

PROTOCOL = "locdiffstore"

VIEWS = ("artifacts", "datasets", "embeddings", "runs", "curves", "predictions", "metrics", "aliases")

# (stage, file pattern) feeding each Parquet-backed view, and its columns when empty.
_SOURCES = {
    "datasets": ("datasets", "manifest.parquet"),
    "embeddings": ("embeddings", "part-*.parquet"),
    "curves": ("runs", "curves.parquet"),
    "predictions": ("eval", "predictions.parquet"),
    "metrics": ("eval", "metrics.parquet"),
}
_DUCK_TYPES = {pa.string(): "VARCHAR", pa.float64(): "DOUBLE", pa.int64(): "BIGINT"}
_EMPTY: dict[str, list[tuple[str, str]]] = {
    "datasets": [(f.name, _DUCK_TYPES[f.type]) for f in DATASET_SCHEMA],
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
        *[(k, "DOUBLE") for k in ACC_KEYS],
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


class CatalogWarning(UserWarning):
    """A committed file was left out of a view (corrupt, truncated or unreadable); the message names it."""


class ReadOnlyStoreFS(fsspec.AbstractFileSystem):
    """What DuckDB sees of the store: the committed files of the views, read-only, and nothing else.

    Paths are ``locdiffstore://<key>/<path in the artifact>``. Opening anything not in :attr:`files`
    (another path, ``..``, a folder listing) fails with ``PermissionError``, and so does every write:
    ``COPY … TO`` the store cannot reach the underlying filesystem or its credentials.
    """

    protocol = PROTOCOL
    root_marker = ""
    cachable = False

    def __init__(self, store: Store) -> None:
        super().__init__()
        self._store = store
        self.files: dict[str, dict] = {}  # store-relative path -> manifest file entry

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith(PROTOCOL + "://"):
            path = path[len(PROTOCOL) + 3 :]
        return path.strip("/")

    def _inner(self, path: str) -> str:
        rel = self._strip_protocol(path)
        if rel not in self.files:
            raise PermissionError(
                f"{PROTOCOL}://{rel}: not a committed file of a catalog view (locdiff sql is read-only and "
                "reads only the views)"
            )
        return self.files[rel]["fspath"]

    def _open(self, path, mode="rb", **kwargs):
        if mode != "rb":
            raise PermissionError(f"the catalog is read-only: cannot open {path!r} with mode {mode!r}")
        return self._store.fs.open(self._inner(path), "rb")

    def info(self, path, **kwargs):
        rel = self._strip_protocol(path)
        inner = self._inner(rel)
        entry = self.files[rel]
        return {"name": rel, "size": entry["size"], "type": "file", "inner": inner}

    def glob(self, path, **kwargs):  # no patterns: exactly the committed files, or a refusal
        rel = self._strip_protocol(path)
        self._inner(rel)
        return [rel]

    def exists(self, path, **kwargs):
        return self._strip_protocol(path) in self.files

    def ls(self, path, detail=True, **kwargs):
        info = self.info(path)
        return [info] if detail else [info["name"]]

    def modified(self, path):
        self._inner(path)
        return _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)

    def created(self, path):
        return self.modified(path)

    def _refuse(self, *args, **kwargs):
        raise PermissionError("the catalog is read-only: writes to the store through SQL are refused")

    mkdir = makedirs = rm = rm_file = _rm = rmdir = put = put_file = pipe = pipe_file = _refuse
    touch = mv = copy = cp_file = rename = _refuse


def connect(
    store: Store | str | None = None,
    database: str = ":memory:",
    *,
    verify: bool = True,
    on_warning: Callable[[str], None] | None = None,
) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection over the store's committed artifacts (the catalog views).

    DuckDB's external access is switched off and its configuration locked: ``COPY … TO``, ``ATTACH``,
    ``INSTALL``/``LOAD`` and ``read_*`` of any other path fail with a permission error. The views read
    the store through :class:`ReadOnlyStoreFS`, which serves only the views' committed files and
    refuses writes. With ``verify`` every such file is checked against its manifest's sha256 (one pass)
    before it is put in a view; without it, only its size. A file that fails is left out of its view
    with a warning naming the artifact and the part (``on_warning``, default: a :class:`CatalogWarning`).
    """
    if not isinstance(store, Store):
        store = Store.from_uri(store)
    if database != ":memory:":
        raise ValueError("the catalog is an in-memory, read-only database; database must be ':memory:'")
    con = duckdb.connect(":memory:")
    rofs = ReadOnlyStoreFS(store)
    con.register_filesystem(rofs)
    for stmt in (
        "SET temp_directory = ''",  # no spilling: nothing to write, not even temporary files
        f"SET allowed_directories = ['{PROTOCOL}://']",
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
        "SET allow_community_extensions = false",
        "SET python_enable_replacements = false",  # SQL cannot scan the caller's Python objects
        "SET enable_external_access = false",
        "SET lock_configuration = true",
    ):
        con.execute(stmt)
    _FS[con] = rofs
    refresh(con, store, verify=verify, on_warning=on_warning)
    return con


_FS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # connection -> its ReadOnlyStoreFS


def _rofs(con: duckdb.DuckDBPyConnection) -> ReadOnlyStoreFS:
    rofs = _FS.get(con)
    if rofs is None:
        raise ValueError("refresh() needs a connection made by locdiff.catalog.connect()")
    return rofs


def _warn(on_warning: Callable[[str], None] | None, message: str) -> None:
    if on_warning is not None:
        on_warning(message)
    else:
        warnings.warn(message, CatalogWarning, stacklevel=3)


def _check_file(store: Store, key: str, entry: dict, verify: bool) -> str | None:
    """None when the committed file matches its manifest entry, else why not."""
    path = store.entry_path(key, entry)
    try:
        if verify:
            digest, size = hash_file(store.fs, path)
        else:
            digest, size = None, store.fs.size(path)
    except FileNotFoundError:
        return "it is missing"
    if size != entry.get("size"):
        return f"{size} bytes where the manifest says {entry.get('size')}"
    if verify and digest != entry.get("sha256"):
        return "its sha256 differs from the manifest's"
    return None


def refresh(
    con: duckdb.DuckDBPyConnection,
    store: Store,
    *,
    verify: bool = True,
    on_warning: Callable[[str], None] | None = None,
) -> None:
    """(Re)create every view from the store's committed artifacts."""
    rofs = _rofs(con)
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
    rofs.files = {}
    con.execute(
        "CREATE OR REPLACE VIEW aliases AS SELECT key, name AS alias, "
        "json_extract_string(info, '$.run') AS run, json_extract_string(info, '$.action') AS action, "
        "created, row_number() OVER (PARTITION BY name ORDER BY created DESC, key DESC) = 1 AS current "
        "FROM artifacts WHERE stage = 'aliases'"
    )
    for view, (stage, pattern) in _SOURCES.items():
        files: list[tuple[str, str, str, str]] = []  # (uri, key, name, relpath)
        for m in manifests:
            if m.get("stage") != stage:
                continue
            for f in m["files"]:
                base = f["relpath"].rsplit("/", 1)[-1]
                if not fnmatch.fnmatchcase(base, pattern):
                    continue
                problem = _check_file(store, m["key"], f, verify)
                if problem is not None:
                    _warn(
                        on_warning,
                        f"artifact {m['key']}, part {f['relpath']} fails its checksum ({problem}); "
                        f"left out of view {view!r}",
                    )
                    continue
                rel = f"{m['key']}/{f['path']}"
                rofs.files[rel] = {**f, "fspath": store.entry_path(m["key"], f)}
                files.append((f"{PROTOCOL}://{rel}", m["key"], m.get("name"), f["relpath"]))
        _create_view(con, "_locdiff_committed_curves" if view == "curves" else view, files, on_warning, view)
    _create_curves_view(con, store, on_warning)


def _create_curves_view(con, store: Store, on_warning) -> None:
    """``curves``: the committed runs' curves, then the in-flight ones (``in_flight``)."""
    import pyarrow.parquet as pq

    from locdiff.curves import LIVE_CURVES

    live = []
    for key, data in store.live("runs", LIVE_CURVES):
        try:
            t = pq.read_table(pa.BufferReader(data)).select(["step", "metric", "value"])
        except (pa.ArrowException, KeyError) as exc:
            _warn(on_warning, f"in-flight curves of {key} cannot be read ({exc}); left out of view 'curves'")
            continue
        name = key.split("/", 1)[1].rsplit("/", 1)[0]
        live.append(
            t.append_column("key", pa.array([key] * len(t), pa.string())).append_column(
                "name", pa.array([name] * len(t), pa.string())
            )
        )
    schema = pa.schema(
        [
            ("step", pa.int64()),
            ("metric", pa.string()),
            ("value", pa.float64()),
            ("key", pa.string()),
            ("name", pa.string()),
        ]
    )
    con.register(
        "_locdiff_live_curves",
        pa.concat_tables([t.cast(schema) for t in live]) if live else schema.empty_table(),
    )
    con.execute(
        "CREATE OR REPLACE VIEW curves AS SELECT *, false AS in_flight FROM _locdiff_committed_curves "
        "UNION ALL BY NAME SELECT key, name, step, metric, value, true AS in_flight FROM _locdiff_live_curves"
    )


def _create_view(
    con: duckdb.DuckDBPyConnection,
    view: str,
    files: list[tuple[str, str, str, str]],
    on_warning: Callable[[str], None] | None = None,
    kind: str | None = None,
) -> None:
    """The view ``view`` over ``files``; empty, with the columns of ``_EMPTY[kind or view]``, without."""
    if files:
        try:
            _create_parquet_view(con, view, files)
            return
        except duckdb.Error:  # find the unreadable file(s), leave them out, say which
            good = []
            for item in files:
                try:
                    con.execute(f"SELECT count(*) FROM parquet_schema({_q(item[0])})").fetchall()
                    good.append(item)
                except duckdb.Error as exc:
                    msg = str(exc).splitlines()[0][:200]
                    _warn(
                        on_warning,
                        f"artifact {item[1]}, part {item[3]} cannot be read ({msg}); "
                        f"left out of view {view!r}",
                    )
            files = good
            if files:
                try:
                    _create_parquet_view(con, view, files)
                    return
                except duckdb.Error as exc:
                    _warn(on_warning, f"view {view!r} left empty: {str(exc).splitlines()[0][:200]}")
    cols = ", ".join(f'NULL::{typ} AS "{col}"' for col, typ in _EMPTY[kind or view])
    con.execute(
        f"CREATE OR REPLACE VIEW {view} AS SELECT NULL::VARCHAR AS key, NULL::VARCHAR AS name, {cols} "
        "WHERE false"
    )


def _create_parquet_view(con: duckdb.DuckDBPyConnection, view: str, files: list[tuple]) -> None:
    mapping = pa.table(
        {"_file": [f[0] for f in files], "key": [f[1] for f in files], "name": [f[2] for f in files]}
    )
    con.register(f"_locdiff_{view}_files", mapping)
    uris = ", ".join(_q(f[0]) for f in files)
    con.execute(
        f"CREATE OR REPLACE VIEW {view} AS SELECT f.key, f.name, "
        "COLUMNS(lambda c: c NOT IN ('filename', '_file', 'key', 'name')) "
        f"FROM read_parquet([{uris}], union_by_name = true, filename = true) t "
        f"JOIN _locdiff_{view}_files f ON t.filename = f._file"
    )
