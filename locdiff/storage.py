"""Content-addressed artifact store on any fsspec filesystem (local files or S3).

Layout under the storage root (a key is ``<stage>/<name>/<hash16>``)::

    <root>/<key>/manifest.json                 the commit marker, written last (atomic)
    <root>/<key>/_attempts/<attempt>/<relpath> data files of one writer attempt
    <root>/<key>/_parts/<sha1(relpath)>.json   "this part is finished" markers (shard-level resume)

Each writer writes into its own attempt folder, so two writers of one key never touch each other's
files; the manifest names, for every file, the attempt folder that holds it. Committing is one atomic
put of ``manifest.json`` (a single PUT on S3; a temporary file plus ``os.replace`` locally), so a
killed writer leaves nothing that :meth:`Store.exists` accepts, and the last of two concurrent writers
simply wins with a complete artifact. Parts finished by an earlier attempt (``commit_part``) are
reused by a later ``writer(resume=True)`` without copying.

Credentials come from the environment or ``storage_options`` and are never written to manifests,
logs or ``repr``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import os
import re
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec

from locdiff import faults
from locdiff.errors import UserError

MANIFEST = "manifest.json"
_ATTEMPTS = "_attempts"
_PARTS = "_parts"
_HASH_LEN = 16
_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-/=]+/[0-9a-f]{16}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-=]+(/[A-Za-z0-9_.\-=]+)*$")
_STAGE_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_CHUNK = 4 << 20


class ArtifactNotFoundError(UserError):
    """The requested artifact (or a file of it) is not committed in the store."""


# --------------------------------------------------------------------------------------------- helpers
def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path | PurePosixPath):
        return str(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    if isinstance(obj, _dt.datetime | _dt.date):
        return obj.isoformat()
    raise TypeError(f"config value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces) used for hashing configs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default)


def _to_jsonable(obj: Any) -> Any:
    return json.loads(canonical_json(obj))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """locdiff's version plus the git commit of the checkout it runs from (when there is one)."""
    from locdiff import __version__

    info: dict[str, Any] = {"locdiff": __version__, "git_commit": None, "git_dirty": None}
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
        if out.returncode == 0:
            info["git_commit"] = out.stdout.strip()
            st = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here,
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
            if st.returncode == 0:
                info["git_dirty"] = bool(st.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def default_root() -> str:
    """``$LOCDIFF_STORAGE``, else ``<project>/data/store`` (the project is the checkout holding locdiff)."""
    env = os.environ.get("LOCDIFF_STORAGE")
    if env:
        return env
    pkg_parent = Path(__file__).resolve().parents[1]
    project = pkg_parent if (pkg_parent / "pyproject.toml").exists() else Path.cwd()
    return "file://" + str(project / "data" / "store")


def _check_relpath(relpath: str) -> str:
    if not isinstance(relpath, str) or not relpath:
        raise ValueError(f"relpath must be a non-empty string, got {relpath!r}")
    p = PurePosixPath(relpath)
    if p.is_absolute() or any(part in ("..", "", ".") for part in p.parts) or "\\" in relpath:
        raise ValueError(f"relpath must be a relative POSIX path without '..' or '.', got {relpath!r}")
    if p.parts[0] in (_ATTEMPTS, _PARTS) or relpath == MANIFEST:
        raise ValueError(f"relpath {relpath!r} is reserved by the store")
    return str(p)


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key) or ".." in key.split("/"):
        raise ValueError(f"not a store key (expected '<stage>/<name>/<16 hex digits>'): {key!r}")
    return key


# --------------------------------------------------------------------------------------------- the store
class Store:
    """An artifact store rooted at a URI; see the module docstring for the layout and guarantees."""

    def __init__(self, fs: fsspec.AbstractFileSystem, base: str, url: str) -> None:
        self.fs = fs
        self._base = base.rstrip("/")  # path in fs terms (no protocol for s3)
        self.url = url.rstrip("/")  # canonical URI, for display
        self._protocol = "s3" if url.startswith(("s3://", "s3a://")) else "file"
        self._key_info: dict[str, dict] = {}
        self._endpoint: str | None = None

    # ---- construction
    @classmethod
    def from_uri(cls, uri: str | None = None, storage_options: dict | None = None) -> Store:
        """Open a store: ``file:///path`` / a plain path, or ``s3://bucket/prefix``.

        ``None`` means ``$LOCDIFF_STORAGE`` or ``file://<project>/data/store``. For S3 the endpoint comes
        from ``storage_options`` (``endpoint_url``), else ``$LOCDIFF_S3_ENDPOINT`` or ``$AWS_ENDPOINT_URL``;
        credentials from ``storage_options`` (``key``/``secret``) or the usual AWS environment variables.
        """
        uri = uri or default_root()
        opts = dict(storage_options or {})
        if uri.startswith(("s3://", "s3a://")):
            import s3fs

            bucket_prefix = uri.split("://", 1)[1].strip("/")
            if not bucket_prefix:
                raise UserError(f"S3 storage URI has no bucket: {uri!r}", "use s3://bucket/prefix")
            endpoint = (
                opts.pop("endpoint_url", None)
                or os.environ.get("LOCDIFF_S3_ENDPOINT")
                or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL")
            )
            if endpoint:
                client_kwargs = dict(opts.pop("client_kwargs", {}) or {})
                client_kwargs.setdefault("endpoint_url", endpoint)
                opts["client_kwargs"] = client_kwargs
            opts.setdefault("skip_instance_cache", True)
            fs = s3fs.S3FileSystem(**opts)
            store = cls(fs, bucket_prefix, "s3://" + bucket_prefix)
            store._endpoint = endpoint
            return store
        if uri.startswith("file://"):
            path = uri[len("file://") :]
        elif "://" in uri:
            proto = uri.split("://", 1)[0]
            raise UserError(
                f"unsupported storage URI scheme {proto!r} in {uri!r}",
                "use file:///absolute/path, a plain path, or s3://bucket/prefix",
            )
        else:
            path = uri
        base = str(Path(path).expanduser().resolve())
        fs = fsspec.filesystem("file", auto_mkdir=True)
        fs.makedirs(base, exist_ok=True)
        return cls(fs, base, "file://" + base)

    def __repr__(self) -> str:  # never shows credentials
        return f"Store({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Store) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __reduce__(self):  # picklable (Prefect task arguments): re-open from URI + endpoint; secrets from env
        return (_reopen, (self.url, self._endpoint))

    @property
    def root(self) -> str:
        """The root as readers take it: an absolute local path, or ``s3://bucket/prefix``."""
        return self._base if self._protocol == "file" else self.url

    @property
    def is_local(self) -> bool:
        return self._protocol == "file"

    # ---- paths
    def _p(self, *parts: str) -> str:
        return "/".join([self._base, *[p.strip("/") for p in parts if p]])

    def _to_uri(self, fspath: str) -> str:
        return fspath if self._protocol == "file" else "s3://" + fspath.split("://", 1)[-1]

    def _refresh(self, path: str | None = None) -> None:
        if self._protocol != "file":
            self.fs.invalidate_cache(path)

    # ---- keys
    def key(self, stage: str, name: str, version: str, config: dict, upstream: Iterable[str] = ()) -> str:
        """Content-addressed key ``<stage>/<name>/<hash16>``; hash of stage, version, config, upstream."""
        if not _STAGE_RE.match(stage or ""):
            raise ValueError(f"stage must match {_STAGE_RE.pattern}, got {stage!r}")
        if not _NAME_RE.match(name or ""):
            raise ValueError(f"name must be path-like ({_NAME_RE.pattern}), got {name!r}")
        upstream = sorted(str(u) for u in upstream)
        payload = canonical_json(
            {"stage": stage, "version": str(version), "config": config, "upstream": upstream}
        )
        digest = hashlib.sha256(payload.encode()).hexdigest()[:_HASH_LEN]
        key = f"{stage}/{name}/{digest}"
        self._key_info[key] = {
            "stage": stage,
            "name": name,
            "version": str(version),
            "config": _to_jsonable(config),
            "upstream": upstream,
        }
        return key

    # ---- reading
    def _read_manifest(self, key: str) -> dict | None:
        path = self._p(key, MANIFEST)
        try:
            with self.fs.open(path, "rb") as f:
                raw = f.read()
        except (FileNotFoundError, OSError):
            return None
        try:
            man = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(man, dict) or man.get("key") != key or not isinstance(man.get("files"), list):
            return None
        return man

    def exists(self, key: str) -> bool:
        """True when ``key`` is committed (its manifest is present and valid)."""
        _check_key(key)
        self._refresh(self._p(key))
        return self._read_manifest(key) is not None

    def manifest(self, key: str) -> dict:
        """The committed manifest of ``key``; :class:`ArtifactNotFoundError` when not committed."""
        _check_key(key)
        self._refresh(self._p(key))
        man = self._read_manifest(key)
        if man is None:
            raise ArtifactNotFoundError(
                f"artifact {key!r} is not committed in {self.url}",
                'run the stage that produces it (`locdiff sql "SELECT key FROM artifacts"` lists what is)',
            )
        return man

    def files(self, key: str) -> list[str]:
        """Relative paths of the files of a committed artifact, sorted."""
        return sorted(f["relpath"] for f in self.manifest(key)["files"])

    def _entry(self, key: str, relpath: str) -> dict:
        man = self.manifest(key)
        for f in man["files"]:
            if f["relpath"] == relpath:
                return f
        raise ArtifactNotFoundError(
            f"artifact {key!r} has no file {relpath!r}",
            f"it has: {', '.join(sorted(f['relpath'] for f in man['files'])[:20]) or '(no files)'}",
        )

    def uri(self, key: str, relpath: str) -> str:
        """Full URI of a committed file (absolute path locally, ``s3://…`` on S3), for pyarrow/duckdb."""
        entry = self._entry(key, relpath)
        return self._to_uri(self._p(key, entry["path"]))

    def entry_uri(self, key: str, entry: dict) -> str:
        """Full URI of the file a manifest entry (``manifest(key)["files"][i]``) points at."""
        return self._to_uri(self._p(key, entry["path"]))

    def fspath(self, key: str, relpath: str) -> str:
        """Path of a committed file in ``self.fs`` terms (what ``store.fs.open`` takes)."""
        return self._p(key, self._entry(key, relpath)["path"])

    def open(self, key: str, relpath: str, mode: str = "rb"):
        """Open a committed file for reading."""
        if "r" not in mode or any(c in mode for c in "wax+"):
            raise ValueError(f"Store.open is read-only (mode 'rb' or 'r'), got {mode!r}; use writer()")
        return self.fs.open(self.fspath(key, relpath), mode)

    def read_table(self, key: str, relpath: str, columns: list[str] | None = None):
        """Read a committed Parquet file as a ``pyarrow.Table`` through the store's filesystem."""
        import pyarrow.parquet as pq

        with self.open(key, relpath) as f:
            return pq.read_table(f, columns=columns)

    def verify(self, key: str) -> list[str]:
        """Re-hash every file of a committed artifact; returns the relpaths whose checksum differs."""
        bad = []
        for entry in self.manifest(key)["files"]:
            try:
                digest, _ = _hash_file(self.fs, self._p(key, entry["path"]))
            except FileNotFoundError:
                digest = None
            if digest != entry["sha256"]:
                bad.append(entry["relpath"])
        return bad

    def list(self, stage: str | None = None) -> list[dict]:
        """Committed manifests (optionally of one stage), oldest first."""
        base = self._p(stage) if stage else self._base
        self._refresh()
        try:
            paths = self.fs.find(base)
        except FileNotFoundError:
            return []
        out = []
        for p in paths:
            if not p.endswith("/" + MANIFEST):
                continue
            rel = p[len(self._base) + 1 : -len(MANIFEST) - 1] if p.startswith(self._base) else None
            if rel is None:
                rel = p.split("://", 1)[-1][len(self._base.split("://", 1)[-1]) + 1 : -len(MANIFEST) - 1]
            if not _KEY_RE.match(rel):
                continue
            man = self._read_manifest(rel)
            if man is not None:
                out.append(man)
        out.sort(key=lambda m: (m.get("created_at", ""), m["key"]))
        return out

    def latest(self, stage: str, name: str | None = None) -> str | None:
        """The newest committed key of a stage (and name), or None."""
        mans = [m for m in self.list(stage) if name is None or m.get("name") == name]
        return mans[-1]["key"] if mans else None

    # ---- writing
    def writer(
        self,
        key: str,
        config: dict | None = None,
        upstream: Iterable[str] = (),
        resume: bool = True,
        version: str | None = None,
    ) -> ArtifactWriter:
        """A context manager that stages files for ``key`` and commits them on a clean exit."""
        _check_key(key)
        info = self._key_info.get(key, {})
        if config is None:
            config = info.get("config", {})
        if version is None:
            version = info.get("version")
        return ArtifactWriter(self, key, config, list(upstream) or info.get("upstream", []), resume, version)

    def _atomic_put(self, path: str, data: bytes) -> None:
        if self._protocol == "file":
            d = os.path.dirname(path)
            os.makedirs(d, exist_ok=True)
            tmp = os.path.join(d, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # one PUT: S3 makes an object visible whole or not at all
            self.fs.pipe_file(path, data)

    def delete(self, key: str) -> None:
        """Remove an artifact (manifest first, so it stops being visible before its files go)."""
        _check_key(key)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._p(key, MANIFEST))
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._p(key), recursive=True)
        self._refresh()


def _reopen(url: str, endpoint: str | None = None) -> Store:
    return Store.from_uri(url, {"endpoint_url": endpoint} if endpoint else None)


def _hash_file(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with fs.open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


# --------------------------------------------------------------------------------------------- writer
class ArtifactWriter:
    """Stages the files of one artifact; use as ``with store.writer(key, config) as w: ...``.

    Write files with :meth:`open` or to :meth:`path`; mark finished shards with :meth:`commit_part` so
    that a crashed run can skip them next time (:meth:`part_done`). On a clean exit every file is
    checksummed and ``manifest.json`` is written last. On an exception nothing becomes visible.
    """

    def __init__(
        self,
        store: Store,
        key: str,
        config: dict,
        upstream: list[str],
        resume: bool,
        version: str | None,
    ) -> None:
        self.store = store
        self.key = key
        self.config = _to_jsonable(config)
        self.upstream = sorted(str(u) for u in upstream)
        self.resume = resume
        self.version = version
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
        self.attempt = f"{stamp}-{os.getpid()}-{secrets.token_hex(4)}"
        self._info: dict[str, Any] = {}
        self._parts: dict[str, dict] = {}  # relpath -> entry (finished parts, own or reused)
        self._active = False
        self.committed = False
        self._stage = key.split("/", 1)[0]

    # ---- context manager
    def __enter__(self) -> ArtifactWriter:
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._active = False
        if exc_type is None:
            self._commit()
        return False

    # ---- staging
    def _attempt_rel(self, relpath: str) -> str:
        return f"{_ATTEMPTS}/{self.attempt}/{relpath}"

    def path(self, relpath: str) -> str:
        """Staging URI to write ``relpath`` to (parent folders exist for local stores)."""
        relpath = _check_relpath(relpath)
        p = self.store._p(self.key, self._attempt_rel(relpath))
        if self.store.is_local:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        return self.store._to_uri(p)

    def open(self, relpath: str, mode: str = "wb"):
        """Open a staging file of this attempt for writing."""
        relpath = _check_relpath(relpath)
        return self.store.fs.open(self.store._p(self.key, self._attempt_rel(relpath)), mode)

    def write_bytes(self, relpath: str, data: bytes) -> None:
        with self.open(relpath, "wb") as f:
            f.write(data)

    def write_table(self, relpath: str, table, **kwargs) -> None:
        """Write a ``pyarrow.Table`` (or pandas DataFrame) as Parquet to ``relpath``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not isinstance(table, pa.Table):
            table = pa.Table.from_pandas(table, preserve_index=False)
        with self.open(relpath, "wb") as f:
            pq.write_table(table, f, **kwargs)

    def _marker(self, relpath: str) -> str:
        return self.store._p(self.key, _PARTS, hashlib.sha1(relpath.encode()).hexdigest() + ".json")

    def part_done(self, relpath: str) -> bool:
        """True when this part is finished: by this writer, or (resume=True) by an earlier attempt.

        A part reported done by an earlier attempt is taken into this artifact as it is; skip writing it.
        """
        relpath = _check_relpath(relpath)
        if relpath in self._parts:
            return True
        if not self.resume:
            return False
        fs = self.store.fs
        self.store._refresh(self.store._p(self.key, _PARTS))
        try:
            with fs.open(self._marker(relpath), "rb") as f:
                entry = json.loads(f.read())
        except (FileNotFoundError, OSError, ValueError):
            return False
        if not isinstance(entry, dict) or entry.get("relpath") != relpath:
            return False
        data = self.store._p(self.key, entry.get("path", ""))
        try:
            size = fs.size(data)
        except (FileNotFoundError, OSError):
            return False
        if size != entry.get("size"):
            return False
        self._parts[relpath] = entry
        return True

    def open_part(self, relpath: str, mode: str = "rb"):
        """Open a finished part (this attempt's, or one reused via :meth:`part_done`) for reading."""
        relpath = _check_relpath(relpath)
        if relpath not in self._parts:
            raise ValueError(f"{relpath!r} is not a finished part of {self.key}; check part_done() first")
        if "r" not in mode or any(c in mode for c in "wax+"):
            raise ValueError(f"open_part is read-only (mode 'rb' or 'r'), got {mode!r}")
        return self.store.fs.open(self.store._p(self.key, self._parts[relpath]["path"]), mode)

    def commit_part(self, relpath: str, rows: int | None = None) -> dict:
        """Mark one written part finished (checksum recorded); survives a crash of this process."""
        relpath = _check_relpath(relpath)
        rel_in_key = self._attempt_rel(relpath)
        full = self.store._p(self.key, rel_in_key)
        try:
            digest, size = _hash_file(self.store.fs, full)
        except FileNotFoundError:
            raise ValueError(
                f"commit_part({relpath!r}): nothing was written to it in this attempt of {self.key}"
            ) from None
        entry = {
            "relpath": relpath,
            "path": rel_in_key,
            "sha256": digest,
            "size": size,
            "rows": None if rows is None else int(rows),
            "attempt": self.attempt,
        }
        faults.point(f"{self._stage}:part-written")
        self.store._atomic_put(self._marker(relpath), json.dumps(entry).encode())
        faults.point(f"{self._stage}:part-committed")
        self._parts[relpath] = entry
        return entry

    def set(self, **info: Any) -> None:
        """Extra manifest fields (counts, skipped lists, metrics, ``rows=`` to override the sum)."""
        reserved = {"key", "stage", "name", "files", "config", "upstream", "code", "created_at", "attempt"}
        bad = reserved & set(info)
        if bad:
            raise ValueError(f"manifest fields {sorted(bad)} are set by the store; use other names")
        self._info.update(_to_jsonable(info))

    # ---- commit
    def _own_files(self) -> Iterator[str]:
        base = self.store._p(self.key, _ATTEMPTS, self.attempt)
        self.store._refresh(base)
        try:
            found = self.store.fs.find(base)
        except FileNotFoundError:
            return
        prefix = base.split("://", 1)[-1].rstrip("/") + "/"
        for p in found:
            p = p.split("://", 1)[-1]
            if p.startswith(prefix):
                yield p[len(prefix) :]

    def _commit(self) -> None:
        files: dict[str, dict] = {}
        own = set(self._own_files())
        for relpath in sorted(own):
            part = self._parts.get(relpath)
            if part is not None and part.get("attempt") == self.attempt:
                files[relpath] = part
                continue
            digest, size = _hash_file(self.store.fs, self.store._p(self.key, self._attempt_rel(relpath)))
            files[relpath] = {
                "relpath": relpath,
                "path": self._attempt_rel(relpath),
                "sha256": digest,
                "size": size,
                "rows": None,
            }
        for relpath, part in self._parts.items():  # reused parts of earlier attempts
            files.setdefault(relpath, part)
        entries = [
            {k: f.get(k) for k in ("relpath", "path", "sha256", "size", "rows")}
            for f in sorted(files.values(), key=lambda f: f["relpath"])
        ]
        part_rows = [e["rows"] for e in entries if e["rows"] is not None]
        stage, rest = self.key.split("/", 1)
        name, digest = rest.rsplit("/", 1)
        manifest = {
            "key": self.key,
            "stage": stage,
            "name": name,
            "hash": digest,
            "version": self.version,
            "rows": sum(part_rows) if part_rows else None,
            "files": entries,
            "n_files": len(entries),
            "bytes": sum(e["size"] for e in entries),
            "config": self.config,
            "upstream": self.upstream,
            "code": code_version(),
            "attempt": self.attempt,
            "created_at": _now_iso(),
        }
        manifest.update(self._info)
        faults.point(f"{stage}:before-manifest")
        self.store._atomic_put(self.store._p(self.key, MANIFEST), json.dumps(manifest, indent=1).encode())
        faults.point(f"{stage}:committed")
        self.store._refresh()
        self.committed = True


# --------------------------------------------------------------------------------------------- key type
@dataclasses.dataclass(frozen=True)
class Key:
    """A store key taken apart: ``<stage>/<name>/<hash16>`` (``name`` may hold slashes)."""

    stage: str
    name: str
    hash: str

    @classmethod
    def parse(cls, key: str) -> Key:
        stage, rest = _check_key(key).split("/", 1)
        name, digest = rest.rsplit("/", 1)
        return cls(stage, name, digest)

    @property
    def head(self) -> str:
        """The first component of the name (a dataset name for most stages)."""
        return self.name.split("/", 1)[0]

    def __str__(self) -> str:
        return f"{self.stage}/{self.name}/{self.hash}"


# --------------------------------------------------------------------------------------------- leases
LEASE = "_lease.json"
LEASE_TTL_ENV = "LOCDIFF_LEASE_TTL_S"


class LeaseTimeoutError(UserError):
    """Another live process holds the build of this key for longer than we were asked to wait."""


class Lease:
    """One builder per key at a time: ``with Lease(store, key) as lease: ...``.

    The holder writes ``<key>/_lease.json`` (owner, expiry) and a daemon thread renews it every ttl/3
    while the block runs; the file is removed on exit. A second process asking for the same key waits
    while the lease is live and (a) returns as soon as the key is committed (``committed`` is then
    True: reuse it, do not rebuild), or (b) takes the lease over once it has expired — its holder
    crashed — and builds, resuming from the parts the holder committed. Taking over is a write followed
    by a read-back after a settle delay, so of two racing takers exactly one proceeds.
    """

    def __init__(
        self,
        store: Store,
        key: str,
        ttl_s: float | None = None,
        wait_s: float = 7 * 24 * 3600,
        poll_s: float | None = None,
        on_wait=None,
    ) -> None:
        self.store = store
        self.key = _check_key(key)
        self.ttl_s = float(ttl_s if ttl_s is not None else os.environ.get(LEASE_TTL_ENV, 120))
        self.wait_s = float(wait_s)
        self.poll_s = float(poll_s if poll_s is not None else min(5.0, max(0.2, self.ttl_s / 6)))
        self.on_wait = on_wait
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"
        self.committed = False
        self._path = store._p(key, LEASE)
        self._stop = None
        self._thread = None

    def _read(self) -> dict | None:
        self.store._refresh(self._path)
        try:
            with self.store.fs.open(self._path, "rb") as f:
                data = json.loads(f.read())
        except (FileNotFoundError, OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _write(self) -> None:
        body = {"owner": self.owner, "expires": time.time() + self.ttl_s, "ttl_s": self.ttl_s}
        self.store._atomic_put(self._path, json.dumps(body).encode())

    def _try_take(self) -> bool:
        cur = self._read()
        if cur is not None and cur.get("owner") != self.owner and cur.get("expires", 0) > time.time():
            return False
        self._write()
        time.sleep(min(1.0, self.poll_s / 2))  # settle: a racing taker's write lands before we read back
        cur = self._read()
        return cur is not None and cur.get("owner") == self.owner

    def __enter__(self) -> Lease:
        import threading

        deadline = time.monotonic() + self.wait_s
        waited = False
        while True:
            if self.store.exists(self.key):
                self.committed = True
                return self
            if self._try_take():
                break
            if not waited and self.on_wait is not None:
                holder = self._read() or {}
                self.on_wait(holder.get("owner", "?"))
            waited = True
            if time.monotonic() > deadline:
                holder = self._read() or {}
                raise LeaseTimeoutError(
                    f"{self.key} is being built by {holder.get('owner', 'another process')}; "
                    f"gave up after waiting {self.wait_s:.0f} s",
                    "wait for that run to finish, or stop it; a crashed holder's lease expires by itself",
                )
            time.sleep(self.poll_s)
        self._stop = threading.Event()

        def renew() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                with contextlib.suppress(Exception):  # a missed renewal only shortens the lease
                    self._write()

        self._thread = threading.Thread(target=renew, name=f"lease {self.key}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            cur = self._read()
            if cur is not None and cur.get("owner") == self.owner:
                with contextlib.suppress(FileNotFoundError):
                    self.store.fs.rm(self._path)
        return False
