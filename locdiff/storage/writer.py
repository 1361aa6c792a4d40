"""Writing one artifact: files staged in an attempt folder, finished parts marked for resume, live
files for in-flight views, and the manifest written last (see :mod:`locdiff.storage.store`)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import os
import secrets
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from locdiff import faults
from locdiff.storage.checked import hash_file
from locdiff.storage.keys import ATTEMPTS, LIVE, MANIFEST, PARTS, Key, check_relpath, make_key, to_jsonable

if TYPE_CHECKING:
    from locdiff.storage.store import Store


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


class ArtifactWriter:
    """Stages the files of one artifact; ``with store.writer(key, version=..., config=..., upstream=...)``.

    ``version``, ``config`` and ``upstream`` are what ``key`` hashes (checked here) and what the manifest
    records; the stage, name and hash are read from the key. Write files with :meth:`open` or to
    :meth:`path`; mark finished shards with :meth:`commit_part` so that a crashed run can skip them next
    time (:meth:`part_done`). On a clean exit every file is checksummed and ``manifest.json`` is written
    last. On an exception nothing becomes visible.
    """

    def __init__(
        self,
        store: Store,
        key: str,
        *,
        version: str,
        config: dict,
        upstream: Iterable[str] = (),
        resume: bool = True,
    ) -> None:
        self._key = Key.parse(key)
        upstream = list(upstream)
        if make_key(self._key.stage, self._key.name, version, config, upstream) != key:
            raise ValueError(f"{key} is not the key of this version, config and upstream")
        self.store = store
        self.key = key
        self.version = str(version)
        self.config = to_jsonable(config)
        self.upstream = sorted(str(u) for u in upstream)
        self.resume = resume
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
        self.attempt = f"{stamp}-{os.getpid()}-{secrets.token_hex(4)}"
        self._info: dict[str, Any] = {}
        self._parts: dict[str, dict] = {}  # relpath -> entry (finished parts, own or reused)
        self._written: dict[str, tuple[str, int] | None] = {}  # relpath -> (sha256, size) hashed on write

    # ---- context manager
    def __enter__(self) -> ArtifactWriter:
        if self.store.exists(self.key):  # a key names its content: a rebuild takes a new key
            raise ValueError(f"{self.key} is committed; a committed key is never rewritten")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self._commit()
        return False

    # ---- staging
    def _attempt_rel(self, relpath: str) -> str:
        return f"{ATTEMPTS}/{self.attempt}/{relpath}"

    def path(self, relpath: str) -> str:
        """Staging URI to write ``relpath`` to (parent folders exist for local stores)."""
        relpath = check_relpath(relpath)
        self._written.pop(relpath, None)  # written by someone else from here on: hash it at commit
        p = self.store._p(self.key, self._attempt_rel(relpath))
        if self.store.is_local:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        return self.store._to_uri(p)

    def open(self, relpath: str, mode: str = "wb"):
        """Open a staging file of this attempt for writing (hashed as it is written)."""
        relpath = check_relpath(relpath)
        f = self.store.fs.open(self.store._p(self.key, self._attempt_rel(relpath)), mode)
        self._written[relpath] = None  # until closed, and for good unless hashed as it is written
        if mode not in ("wb", "xb"):
            return f

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
        return self.store._p(self.key, PARTS, hashlib.sha1(relpath.encode()).hexdigest() + ".json")

    def part_done(self, relpath: str) -> bool:
        """True when this part is finished: by this writer, or (resume=True) by an earlier attempt.

        A part reported done by an earlier attempt is taken into this artifact as it is; skip writing it.
        """
        relpath = check_relpath(relpath)
        if relpath in self._parts:
            return True
        if not self.resume:
            return False
        fs = self.store.fs
        self.store._refresh(self.store._p(self.key, PARTS))
        try:
            with fs.open(self._marker(relpath), "rb") as f:
                entry = json.loads(f.read())
        except (FileNotFoundError, OSError, ValueError):
            return False
        if not isinstance(entry, dict) or entry.get("relpath") != relpath:
            return False
        path = entry.get("path", "")
        if not isinstance(path, str) or not path.startswith(ATTEMPTS + "/") or ".." in path.split("/"):
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
        relpath = check_relpath(relpath)
        if relpath not in self._parts:
            raise ValueError(f"{relpath!r} is not a finished part of {self.key}; check part_done() first")
        return self.store._open_entry(self.key, self._parts[relpath], mode)

    def commit_part(self, relpath: str, rows: int | None = None) -> dict:
        """Mark one written part finished (checksum recorded); survives a crash of this process."""
        relpath = check_relpath(relpath)
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
        faults.point(f"{self._key.stage}:part-written")
        self.store._atomic_put(self._marker(relpath), json.dumps(entry).encode())
        faults.point(f"{self._key.stage}:part-committed")
        self._parts[relpath] = entry
        return entry

    def write_live(self, relpath: str, data: bytes) -> None:
        """Replace (atomically) what this in-flight artifact shows so far under ``relpath``: readable by
        :meth:`Store.live` until the key commits; never part of the committed artifact."""
        self.store._atomic_put(self.store._p(self.key, LIVE, check_relpath(relpath)), data)

    def set(self, **info: Any) -> None:
        """Extra manifest fields (counts, skipped lists, metrics, ``rows=`` to override the sum)."""
        reserved = {"key", "stage", "name", "files", "config", "upstream", "code", "created_at", "attempt"}
        bad = reserved & set(info)
        if bad:
            raise ValueError(f"manifest fields {sorted(bad)} are set by the store; use other names")
        self._info.update(to_jsonable(info))

    # ---- commit
    def _own_files(self) -> dict[str, int | None]:
        """relpath -> size of the files this attempt staged."""
        base = self.store._p(self.key, ATTEMPTS, self.attempt)
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
        manifest = {
            "key": self.key,
            "stage": self._key.stage,
            "name": self._key.name,
            "hash": self._key.hash,
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
        faults.point(f"{self._key.stage}:before-manifest")
        self.store._atomic_put(self.store._p(self.key, MANIFEST), json.dumps(manifest, indent=1).encode())
        faults.point(f"{self._key.stage}:committed")
        with contextlib.suppress(FileNotFoundError, OSError):  # the in-flight view is over
            self.store.fs.rm(self.store._p(self.key, LIVE), recursive=True)
        self.store._refresh()
