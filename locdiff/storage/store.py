"""Content-addressed artifact store on any fsspec filesystem (local files or S3).

Layout under the storage root (a key is ``<stage>/<name>/<hash16>``)::

    <root>/<key>/manifest.json                 the commit marker, written last (atomic)
    <root>/<key>/_attempts/<attempt>/<relpath> data files of one writer attempt
    <root>/<key>/_parts/<sha1(relpath)>.json   "this part is finished" markers (shard-level resume)
    <root>/<key>/_live/<relpath>               what an in-flight writer shows so far (e.g. training
                                               curves); replaced whole, removed when the key commits

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
import io
import json
import os
import uuid
from pathlib import Path

import fsspec

from locdiff.errors import UserError, environment_error
from locdiff.storage.checked import CheckedReader, check_whole, hash_file
from locdiff.storage.keys import KEY_RE, LIVE, MANIFEST, check_key, check_relpath, make_key
from locdiff.storage.writer import ArtifactWriter


class ArtifactNotFoundError(UserError):
    """The requested artifact (or a file of it) is not committed in the store."""


def default_root() -> str:
    """``$LOCDIFF_STORAGE``, else ``<project>/data/store`` (:func:`locdiff.project_dir`)."""
    from locdiff import project_dir

    return os.environ.get("LOCDIFF_STORAGE") or "file://" + str(project_dir() / "data" / "store")


# --------------------------------------------------------------------------------------------- the store
class Store:
    """An artifact store rooted at a URI; see the module docstring for the layout and guarantees."""

    def __init__(self, fs: fsspec.AbstractFileSystem, base: str, url: str) -> None:
        self.fs = fs
        self._base = base.rstrip("/")  # path in fs terms (no protocol for s3)
        self.url = url.rstrip("/")  # canonical URI, for display
        self._protocol = "s3" if url.startswith(("s3://", "s3a://")) else "file"
        self._endpoint: str | None = None
        self._verified: set[tuple[str, str]] = set()  # (fs path, sha256) hashed whole in this process

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
    key = staticmethod(make_key)

    # ---- reading
    def _read_manifest(self, key: str) -> dict | None:
        """The manifest, or None when it is truly absent; access errors raise StoreAccessError."""
        path = self._p(key, MANIFEST)
        try:
            with self.fs.open(path, "rb") as f:
                raw = f.read()
        except Exception as exc:
            if (err := environment_error(exc, self.url)) is not None:  # a missing bucket, not a missing key
                raise err from None
            if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError):
                return None
            raise
        try:
            man = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(man, dict) or man.get("key") != key or not isinstance(man.get("files"), list):
            return None
        return man

    def exists(self, key: str) -> bool:
        """True when ``key`` is committed (its manifest is present and valid)."""
        check_key(key)
        self._refresh(self._p(key))
        return self._read_manifest(key) is not None

    def manifest(self, key: str) -> dict:
        """The committed manifest of ``key``; :class:`ArtifactNotFoundError` when not committed."""
        check_key(key)
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

    def entry_path(self, key: str, entry: dict) -> str:
        """Path, in ``self.fs`` terms, of the file a manifest entry (``manifest(key)["files"][i]``) names."""
        return self._p(key, entry["path"])

    def fspath(self, key: str, relpath: str, *, verify: bool = True) -> str:
        """Path of a committed file in ``self.fs`` terms (what ``store.fs.open`` takes), for readers that
        map or open the file themselves: first hashed whole against the manifest's sha256 (one pass, once
        per file and store object; a mismatch raises :class:`ChecksumMismatchError`) unless ``verify=False``.
        """
        entry = self._entry(key, relpath)
        path = self._p(key, entry["path"])
        if verify and (path, entry["sha256"]) not in self._verified:
            check_whole(self.fs, self._verified, key, entry, path)
        return path

    def open(self, key: str, relpath: str, mode: str = "rb", *, verify: bool = True):
        """Open a committed file for reading, checked against the manifest's sha256 as it is read.

        The size is checked at once; the bytes are hashed as they are read (one pass) and a mismatch
        raises :class:`ChecksumMismatchError` ("artifact K, part P fails its checksum") when the end is
        reached, or on ``close()`` after a partial read (which then reads the rest). A reader that seeks
        away from where it is gets the whole file hashed first (once per file and store object).
        ``verify=False`` opens the file unchecked.
        """
        return self._open_entry(key, self._entry(key, relpath), mode, verify)

    def _open_entry(self, key: str, entry: dict, mode: str = "rb", verify: bool = True):
        if "r" not in mode or any(c in mode for c in "wax+"):
            raise ValueError(f"committed files are read-only (mode 'rb' or 'r'), got {mode!r}; use a writer")
        path = self._p(key, entry["path"])
        if not verify:
            return self.fs.open(path, mode)
        raw = CheckedReader(self.fs, self._verified, key, entry, path)
        if "b" in mode:  # the store's filesystem buffers below; no second buffer (and copy) on top
            return raw
        return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8")

    def read_bytes(self, key: str, relpath: str, *, verify: bool = True) -> bytes:
        """All bytes of a committed file (checked against its sha256 unless ``verify=False``)."""
        with self.open(key, relpath, verify=verify) as f:
            return f.read()

    def read_table(self, key: str, relpath: str, columns: list[str] | None = None, *, verify: bool = True):
        """Read a committed Parquet file as a ``pyarrow.Table``, checked against its sha256 (one pass)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not verify:
            with self.open(key, relpath, verify=False) as f:
                return pq.read_table(f, columns=columns)
        with self.open(key, relpath) as f:  # checked, into one buffer (no copy beyond the read itself)
            buf = f.read_rest()
        return pq.read_table(pa.BufferReader(pa.py_buffer(buf)), columns=columns)

    def verify(self, key: str) -> list[str]:
        """Re-hash every file of a committed artifact; returns the relpaths whose checksum differs."""
        bad = []
        for entry in self.manifest(key)["files"]:
            try:
                digest, _ = hash_file(self.fs, self._p(key, entry["path"]))
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
        except Exception as exc:
            if (err := environment_error(exc, self.url)) is not None:
                raise err from None
            if isinstance(exc, FileNotFoundError):
                return []
            raise
        out = []
        for p in paths:
            if not p.endswith("/" + MANIFEST):
                continue
            rel = p[len(self._base) + 1 : -len(MANIFEST) - 1] if p.startswith(self._base) else None
            if rel is None:
                rel = p.split("://", 1)[-1][len(self._base.split("://", 1)[-1]) + 1 : -len(MANIFEST) - 1]
            if not KEY_RE.fullmatch(rel):
                continue
            man = self._read_manifest(rel)
            if man is not None:
                out.append(man)
        out.sort(key=lambda m: (m.get("created_at", ""), m["key"]))
        return out

    def live(self, stage: str, relpath: str) -> list[tuple[str, bytes]]:
        """(key, bytes) of ``relpath`` as written by :meth:`ArtifactWriter.write_live` for every key of
        ``stage`` that is not committed yet (in flight, or abandoned by a killed writer)."""
        base = self._p(stage)
        self._refresh()
        try:
            paths = self.fs.find(base)
        except FileNotFoundError:
            return []
        prefix, tail = base.split("://", 1)[-1] + "/", f"/{LIVE}/{relpath}"
        out = []
        for p in paths:
            p = p.split("://", 1)[-1]
            if not (p.startswith(prefix) and p.endswith(tail)):
                continue
            key = f"{stage}/{p[len(prefix) : -len(tail)]}"
            if not KEY_RE.match(key) or self.exists(key):
                continue
            data = self.read_live(key, relpath)
            if data is not None:  # else committed (and cleaned up) meanwhile
                out.append((key, data))
        return out

    def read_live(self, key: str, relpath: str) -> bytes | None:
        """What the in-flight writer of ``key`` last showed under ``relpath`` (None: nothing, or done)."""
        try:
            with self.fs.open(self._p(check_key(key), LIVE, check_relpath(relpath)), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def latest(self, stage: str, name: str | None = None) -> str | None:
        """The newest committed key of a stage (and name), or None."""
        mans = [m for m in self.list(stage) if name is None or m.get("name") == name]
        return mans[-1]["key"] if mans else None

    # ---- writing
    def writer(
        self, key: str, *, version: str, config: dict, upstream=(), resume: bool = True
    ) -> ArtifactWriter:
        """A context manager that stages files for ``key`` and commits them on a clean exit; ``version``,
        ``config`` and ``upstream`` are what the key hashes (checked) and what its manifest records."""
        return ArtifactWriter(self, key, version=version, config=config, upstream=upstream, resume=resume)

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
        check_key(key)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._p(key, MANIFEST))
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._p(key), recursive=True)
        self._refresh()


def _reopen(url: str, endpoint: str | None = None) -> Store:
    return Store.from_uri(url, {"endpoint_url": endpoint} if endpoint else None)
