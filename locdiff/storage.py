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
import dataclasses
import datetime as _dt
import functools
import hashlib
import io
import json
import os
import re
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec

from locdiff import faults
from locdiff.errors import UserError, environment_error

MANIFEST = "manifest.json"
_ATTEMPTS = "_attempts"
_PARTS = "_parts"
_LIVE = "_live"
_HASH_LEN = 16
_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-/=]+/[0-9a-f]{16}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-=]+(/[A-Za-z0-9_.\-=]+)*$")
_STAGE_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_CHUNK = 4 << 20


class ArtifactNotFoundError(UserError):
    """The requested artifact (or a file of it) is not committed in the store."""


class InvalidNameError(UserError, ValueError):
    """A dataset/artifact name a key cannot hold (spaces, control characters, a trailing newline)."""


class ChecksumMismatchError(UserError):
    """A committed file's bytes differ from its manifest (tampered, truncated or bit-rotted)."""

    def __init__(self, key: str, relpath: str, detail: str) -> None:
        super().__init__(
            f"artifact {key}, part {relpath} fails its checksum ({detail})",
            "the file changed after it was committed; delete the artifact and re-run the stage that "
            "produces it",
        )
        self.key = key
        self.relpath = relpath


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
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or ".." in key.split("/"):
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
    def key(self, stage: str, name: str, version: str, config: dict, upstream: Iterable[str] = ()) -> str:
        """Content-addressed key ``<stage>/<name>/<hash16>``; hash of stage, version, config, upstream."""
        if not _STAGE_RE.fullmatch(stage or ""):
            raise ValueError(f"stage must match {_STAGE_RE.pattern}, got {stage!r}")
        if not _NAME_RE.fullmatch(name or ""):  # fullmatch: '$' would let a trailing newline through
            raise InvalidNameError(
                f"invalid artifact name {name!r}",
                "use letters, digits, '_', '.', '-', '=' (parts separated by '/'), e.g. mp16",
            )
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
        """The manifest, or None when it is truly absent; access errors raise StoreAccessError."""
        path = self._p(key, MANIFEST)
        try:
            with self.fs.open(path, "rb") as f:
                raw = f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            err = environment_error(exc, self.url)  # a missing bucket is not a missing artifact
            if err is not None:
                raise err from None
            return None
        except Exception as exc:
            err = environment_error(exc, self.url)
            if err is not None:
                raise err from None
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
            self._check_whole(key, entry, path)
        return path

    def _check_whole(self, key: str, entry: dict, path: str) -> None:
        """Hash a committed file whole against its manifest entry; remember it as verified."""
        digest, n = hash_file(self.fs, path)
        rel = entry["relpath"]
        if n != int(entry["size"]):
            raise ChecksumMismatchError(key, rel, f"{n} bytes, the manifest says {entry['size']}")
        if digest != entry["sha256"]:
            raise ChecksumMismatchError(key, rel, "its sha256 differs from the manifest's")
        self._verified.add((path, entry["sha256"]))

    def open(self, key: str, relpath: str, mode: str = "rb", *, verify: bool = True):
        """Open a committed file for reading, checked against the manifest's sha256 as it is read.

        The size is checked at once; the bytes are hashed as they are read (one pass) and a mismatch
        raises :class:`ChecksumMismatchError` ("artifact K, part P fails its checksum") when the end is
        reached, or on ``close()`` after a partial read (which then reads the rest). A reader that seeks
        away from where it is gets the whole file hashed first (once per file and store object).
        ``verify=False`` opens the file unchecked.
        """
        if "r" not in mode or any(c in mode for c in "wax+"):
            raise ValueError(f"Store.open is read-only (mode 'rb' or 'r'), got {mode!r}; use writer()")
        entry = self._entry(key, relpath)
        return self._open_entry(key, entry, mode, verify)

    def _open_entry(self, key: str, entry: dict, mode: str = "rb", verify: bool = True):
        path = self._p(key, entry["path"])
        if not verify:
            return self.fs.open(path, mode)
        raw = _CheckedReader(self, key, entry, path)
        if "b" in mode:  # the store's filesystem buffers below; no second buffer (and copy) on top
            return raw
        return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8")

    def read_bytes(self, key: str, relpath: str, *, verify: bool = True) -> bytes:
        """All bytes of a committed file (checked against its sha256 unless ``verify=False``)."""
        with self.open(key, relpath, verify=verify) as f:
            return f.read()

    def _read_buffer(self, key: str, relpath: str):
        """All bytes of a committed file, checked, as a buffer (no copy beyond the read itself)."""
        with self.open(key, relpath) as f:
            return f.read_rest()

    def read_table(self, key: str, relpath: str, columns: list[str] | None = None, *, verify: bool = True):
        """Read a committed Parquet file as a ``pyarrow.Table``, checked against its sha256 (one pass)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not verify:
            with self.open(key, relpath, verify=False) as f:
                return pq.read_table(f, columns=columns)
        return pq.read_table(pa.BufferReader(pa.py_buffer(self._read_buffer(key, relpath))), columns=columns)

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
        except FileNotFoundError as exc:
            err = environment_error(exc, self.url)
            if err is not None:
                raise err from None
            return []
        except Exception as exc:
            err = environment_error(exc, self.url)
            if err is not None:
                raise err from None
            raise
        out = []
        for p in paths:
            if not p.endswith("/" + MANIFEST):
                continue
            rel = p[len(self._base) + 1 : -len(MANIFEST) - 1] if p.startswith(self._base) else None
            if rel is None:
                rel = p.split("://", 1)[-1][len(self._base.split("://", 1)[-1]) + 1 : -len(MANIFEST) - 1]
            if not _KEY_RE.fullmatch(rel):
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
        prefix, tail = base.split("://", 1)[-1] + "/", f"/{_LIVE}/{relpath}"
        out = []
        for p in paths:
            p = p.split("://", 1)[-1]
            if not (p.startswith(prefix) and p.endswith(tail)):
                continue
            key = f"{stage}/{p[len(prefix) : -len(tail)]}"
            if not _KEY_RE.match(key) or self.exists(key):
                continue
            data = self.read_live(key, relpath)
            if data is not None:  # else committed (and cleaned up) meanwhile
                out.append((key, data))
        return out

    def read_live(self, key: str, relpath: str) -> bytes | None:
        """What the in-flight writer of ``key`` last showed under ``relpath`` (None: nothing, or done)."""
        try:
            with self.fs.open(self._p(_check_key(key), _LIVE, _check_relpath(relpath)), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

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


def hash_file(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, int]:
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


class _CheckedReader(io.RawIOBase):
    """A committed file read through the store, hashed as it goes (see :meth:`Store.open`)."""

    def __init__(self, store: Store, key: str, entry: dict, path: str) -> None:
        super().__init__()
        self._store, self._key, self._entry, self._path = store, key, entry, path
        self._size = int(entry["size"])
        self._f = store.fs.open(path, "rb")
        try:
            actual = getattr(self._f, "size", None)
            if not isinstance(actual, int):
                actual = store.fs.size(path)
        except BaseException:
            self._f.close()
            raise
        if actual != self._size:
            self._f.close()
            raise ChecksumMismatchError(
                key, entry["relpath"], f"{actual} bytes, the manifest says {self._size}"
            )
        self._h = hashlib.sha256()
        self._hashed = 0  # bytes hashed so far, in order from the start
        self._pos = 0  # where the next read starts
        self._done = (path, entry["sha256"]) in store._verified

    def _fail(self, detail: str):
        self._done = True  # report once
        raise ChecksumMismatchError(self._key, self._entry["relpath"], detail)

    def _finish(self) -> None:
        if self._h.hexdigest() != self._entry["sha256"]:
            self._fail("its sha256 differs from the manifest's")
        self._done = True
        self._store._verified.add((self._path, self._entry["sha256"]))

    def _verify_whole(self) -> None:
        self._h = hashlib.sha256()
        try:
            self._store._check_whole(self._key, self._entry, self._path)
        finally:
            self._done = True  # checked (or reported) once

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END:
            target = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if target < 0:
            raise OSError(f"negative seek position {target}")
        if target != self._pos:
            self._f.seek(target)
            self._pos = target
        return self._pos

    def _read(self, n: int) -> bytes:
        if not self._done and self._pos != self._hashed:  # random access: check the whole file first
            self._verify_whole()
        data = self._f.read(n)
        self._account(data, n)
        return data

    def _account(self, data, asked: int) -> None:
        if not self._done:
            self._h.update(data)
            self._hashed += len(data)
            if self._hashed > self._size:
                self._fail(f"more than the manifest's {self._size} bytes")
            if self._hashed == self._size:
                self._finish()
            elif not len(data) and asked:
                self._fail(f"ends after {self._hashed} of {self._size} bytes")
        self._pos += len(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        return self._read(size)

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")
        direct = getattr(self._f, "readinto", None)
        if direct is None or (not self._done and self._pos != self._hashed):
            data = self._read(len(view))
            view[: len(data)] = data
            return len(data)
        n = direct(view) or 0
        self._account(view[:n], len(view))
        return n

    def readall(self) -> bytes:
        return bytes(self.read_rest())

    def read_rest(self) -> bytearray:
        """The rest of the file in one buffer (read and hashed in place: no extra copies)."""
        rest = max(0, self._size - self._pos)
        buf = bytearray(rest)
        view = memoryview(buf)
        got = 0
        while got < rest:
            n = self.readinto(view[got : got + _CHUNK])
            if not n:
                self._fail(f"ends after {self._pos} of {self._size} bytes")
            got += n
        if self.read(1):  # at the end: finishes the check (and catches a file grown since it was opened)
            self._fail(f"more than the manifest's {self._size} bytes")
        return buf

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._done and self._hashed and self._pos == self._hashed:
                while not self._done and self._read(_CHUNK):  # a partial read: check the rest too
                    pass
        finally:
            self._f.close()
            super().close()


class _HashingFile:
    """A staging file opened for writing that hashes what is written (so commit needs no re-read)."""

    def __init__(self, f, on_close) -> None:
        self._f = f
        self._h = hashlib.sha256()
        self._n = 0
        self._ok = True  # False once the writer seeks or truncates: the hash no longer matches
        self._on_close = on_close

    def write(self, data) -> int:
        if self._ok:
            self._h.update(data)
            self._n += memoryview(data).nbytes
        return self._f.write(data)

    def seek(self, *args):
        self._ok = False
        return self._f.seek(*args)

    def truncate(self, *args):
        self._ok = False
        return self._f.truncate(*args)

    def close(self) -> None:
        if getattr(self._f, "closed", False):
            return
        self._f.close()
        self._on_close((self._h.hexdigest(), self._n) if self._ok else None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


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
        self._written: dict[str, tuple[str, int] | None] = {}  # relpath -> (sha256, size) hashed on write
        self._active = False
        self.committed = False
        self._stage = key.split("/", 1)[0]

    # ---- context manager
    def __enter__(self) -> ArtifactWriter:
        if self.store.exists(self.key):  # a key names its content: a rebuild takes a new key
            raise ValueError(f"{self.key} is committed; a committed key is never rewritten")
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
        self._written.pop(relpath, None)  # written by someone else from here on: hash it at commit
        p = self.store._p(self.key, self._attempt_rel(relpath))
        if self.store.is_local:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        return self.store._to_uri(p)

    def open(self, relpath: str, mode: str = "wb"):
        """Open a staging file of this attempt for writing (hashed as it is written)."""
        relpath = _check_relpath(relpath)
        f = self.store.fs.open(self.store._p(self.key, self._attempt_rel(relpath)), mode)
        if mode not in ("wb", "xb"):
            self._written[relpath] = None
            return f
        self._written[relpath] = None  # until closed

        def on_close(result, relpath=relpath) -> None:
            self._written[relpath] = result

        return _HashingFile(f, on_close)

    def _digest(self, relpath: str, size: int | None = None) -> tuple[str, int]:
        """(sha256, size) of a staged file: the one hashed while writing, else by reading it back."""
        got = self._written.get(relpath)
        if got is not None:
            if size is None:
                size = self.store.fs.size(self.store._p(self.key, self._attempt_rel(relpath)))
            if size == got[1]:
                return got
        return hash_file(self.store.fs, self.store._p(self.key, self._attempt_rel(relpath)))

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
        path = entry.get("path", "")
        if not isinstance(path, str) or not path.startswith(_ATTEMPTS + "/") or ".." in path.split("/"):
            return False
        try:  # a reused part must match its recorded checksum, not just its size
            digest, size = hash_file(fs, self.store._p(self.key, path))
        except (FileNotFoundError, OSError):
            return False
        if size != entry.get("size") or digest != entry.get("sha256"):
            return False
        self._parts[relpath] = entry
        self.store._verified.add((self.store._p(self.key, path), digest))
        return True

    def open_part(self, relpath: str, mode: str = "rb"):
        """Open a finished part (this attempt's, or one reused via :meth:`part_done`) for reading."""
        relpath = _check_relpath(relpath)
        if relpath not in self._parts:
            raise ValueError(f"{relpath!r} is not a finished part of {self.key}; check part_done() first")
        if "r" not in mode or any(c in mode for c in "wax+"):
            raise ValueError(f"open_part is read-only (mode 'rb' or 'r'), got {mode!r}")
        return self.store._open_entry(self.key, self._parts[relpath], mode)

    def commit_part(self, relpath: str, rows: int | None = None) -> dict:
        """Mark one written part finished (checksum recorded); survives a crash of this process."""
        relpath = _check_relpath(relpath)
        rel_in_key = self._attempt_rel(relpath)
        try:
            digest, size = self._digest(relpath)
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

    def write_live(self, relpath: str, data: bytes) -> None:
        """Replace (atomically) what this in-flight artifact shows so far under ``relpath``: readable by
        :meth:`Store.live` until the key commits; never part of the committed artifact."""
        self.store._atomic_put(self.store._p(self.key, _LIVE, _check_relpath(relpath)), data)

    def set(self, **info: Any) -> None:
        """Extra manifest fields (counts, skipped lists, metrics, ``rows=`` to override the sum)."""
        reserved = {"key", "stage", "name", "files", "config", "upstream", "code", "created_at", "attempt"}
        bad = reserved & set(info)
        if bad:
            raise ValueError(f"manifest fields {sorted(bad)} are set by the store; use other names")
        self._info.update(_to_jsonable(info))

    # ---- commit
    def _own_files(self) -> dict[str, int | None]:
        """relpath -> size of the files this attempt staged."""
        base = self.store._p(self.key, _ATTEMPTS, self.attempt)
        self.store._refresh(base)
        try:
            found = self.store.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        prefix = base.split("://", 1)[-1].rstrip("/") + "/"
        out: dict[str, int | None] = {}
        for p, info in found.items():
            p = p.split("://", 1)[-1]
            if p.startswith(prefix):
                out[p[len(prefix) :]] = info.get("size") if isinstance(info, dict) else None
        return out

    def _commit(self) -> None:
        files: dict[str, dict] = {}
        own = self._own_files()
        for relpath in sorted(own):
            part = self._parts.get(relpath)
            if part is not None and part.get("attempt") == self.attempt:
                files[relpath] = part
                continue
            digest, size = self._digest(relpath, own[relpath])
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
        with contextlib.suppress(FileNotFoundError, OSError):  # the in-flight view is over
            self.store.fs.rm(self.store._p(self.key, _LIVE), recursive=True)
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


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _holder_died(body: dict) -> bool:
    """True only when a lease's holder provably died: it ran on this host, in this pid namespace, and
    its pid no longer exists. Anything else (another host or container, a recycled or foreign pid, no
    /proc) counts as alive, and its lease is honoured until it expires."""
    pid, ns = body.get("pid"), body.get("pidns")
    if body.get("host") != os.uname().nodename or ns is None or ns != _pid_namespace():
        return False
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: the pid exists (another user's process)
        return False
    return False


class Lease:
    """One builder per key at a time: ``with Lease(store, key) as lease: ...``.

    The holder writes ``<key>/_lease.json`` (owner, expiry) and a daemon thread renews it every ttl/3
    while the block runs; the file is removed on exit. A second process asking for the same key waits
    while the lease is live and (a) returns as soon as the key is committed (``committed`` is then
    True: reuse it, do not rebuild), or (b) takes the lease over once it has expired — its holder
    crashed — and builds, resuming from the parts the holder committed. A holder that provably died
    (same host and pid namespace, its pid gone: a SIGKILL, an OOM kill) is taken over at once instead of
    after its expiry. Taking over is a write followed by a read-back after a settle delay, so of two
    racing takers exactly one proceeds.
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
        body = {
            "owner": self.owner,
            "expires": time.time() + self.ttl_s,
            "ttl_s": self.ttl_s,
            "host": os.uname().nodename,
            "pidns": _pid_namespace(),
            "pid": os.getpid(),
        }
        self.store._atomic_put(self._path, json.dumps(body).encode())

    def _try_take(self) -> bool:
        cur = self._read()
        if (
            cur is not None
            and cur.get("owner") != self.owner
            and cur.get("expires", 0) > time.time()
            and not _holder_died(cur)
        ):
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
