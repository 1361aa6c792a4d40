"""Downloads that survive the real internet, and archive extraction that survives hostile archives.

- :func:`fetch_bytes` / :func:`download_file`: HTTP(S) with retries and exponential backoff (plus
  jitter) on transient failures (5xx, 429, connection resets, timeouts, truncated bodies), resume of
  partial bodies with ``Range``, optional SHA-256 verification. Dead links (404/410/403/451) are not
  retried: they come back as ``status="dead"`` so callers count and list them instead of failing.
- :func:`fetch_many`: bounded concurrency over many URLs (a thread pool; order preserved).
- :func:`safe_extract`: tar/zip extraction that refuses members escaping the target, links and
  device files, and absurd sizes or member counts.
Other fsspec URLs (``s3://…``, ``file://…``) are read through fsspec with the same retry policy.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import lzma
import os
import random
import stat
import tarfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import requests

from locdiff.errors import UserError, environment_error

DEAD_STATUSES = frozenset({403, 404, 410, 451})
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
USER_AGENT = "locdiff-downloader/1 (+research; respects robots via rate limits)"


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # extra attempts after the first
    backoff_s: float = 0.5  # first wait; doubles each attempt (docs/design.md §5: exponential backoff)
    max_backoff_s: float = 30.0
    timeout_s: float = 30.0  # connect and per-read timeout
    jitter: float = 0.25  # +- fraction of the wait, so parallel clients do not retry in lockstep

    def wait(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


@dataclass
class FetchResult:
    url: str
    status: str  # "ok" | "dead" | "failed"
    data: bytes | None = None
    http_status: int | None = None
    attempts: int = 0
    resumed: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class ChecksumError(UserError):
    """Downloaded bytes do not match the known SHA-256."""


class UnsafeArchiveError(UserError):
    """An archive member would escape the target, is a link/device, or is absurdly large."""


class CorruptArchiveError(UserError):
    """An archive that cannot be read to its end: truncated, or corrupt."""


_local = threading.local()


def _session() -> requests.Session:
    s = getattr(_local, "session", None)
    if s is None:
        s = requests.Session()
        s.headers["User-Agent"] = USER_AGENT
        _local.session = s
    return s


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _http_attempt(url: str, have: int, timeout: float, sink) -> tuple[int, bool]:
    """One GET, appending to ``sink`` (a callable taking bytes); resumes from ``have`` bytes with Range.

    Returns (HTTP status, whether the server honoured the Range). Raises on transport errors.
    """
    headers = {"Range": f"bytes={have}-"} if have else {}
    with _session().get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code >= 400:
            return r.status_code, False
        honoured = have > 0 and r.status_code == 206
        if have and not honoured:
            sink(None)  # server ignored Range: start over
        for chunk in r.iter_content(chunk_size=1 << 14):  # small: a cut body keeps most
            if chunk:
                sink(chunk)
        return r.status_code, honoured


def fetch_bytes(url: str, policy: RetryPolicy = RetryPolicy(), sha256: str | None = None) -> FetchResult:
    """Fetch a URL into memory (images); never raises for network trouble: see ``status``."""
    if not is_http(url):
        return _fetch_fsspec(url, policy, sha256)
    buf = bytearray()
    res = FetchResult(url, "failed")

    def sink(chunk):
        if chunk is None:
            buf.clear()
        else:
            buf.extend(chunk)

    for attempt in range(policy.retries + 1):
        res.attempts = attempt + 1
        try:
            status, honoured = _http_attempt(url, len(buf), policy.timeout_s, sink)
            res.http_status = status
            res.resumed |= honoured
            if status in DEAD_STATUSES:
                res.status, res.error = "dead", f"HTTP {status}"
                return res
            if status == 416 and buf:  # we already have everything
                status = 200
            if status >= 400:
                res.error = f"HTTP {status}"
                if status not in TRANSIENT_STATUSES:
                    return res
            else:
                data = bytes(buf)
                if sha256 and hashlib.sha256(data).hexdigest() != sha256:
                    buf.clear()
                    res.error = "checksum mismatch"
                else:
                    res.status, res.data, res.error = "ok", data, None
                    return res
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            res.error = f"{type(exc).__name__}: {exc}"[:300]
        if attempt < policy.retries:
            time.sleep(policy.wait(attempt))
    return res


def _fetch_fsspec(url: str, policy: RetryPolicy, sha256: str | None) -> FetchResult:
    import fsspec

    res = FetchResult(url, "failed")
    for attempt in range(policy.retries + 1):
        res.attempts = attempt + 1
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
            if sha256 and hashlib.sha256(data).hexdigest() != sha256:
                res.error = "checksum mismatch"
            else:
                res.status, res.data, res.error = "ok", data, None
                return res
        except FileNotFoundError as exc:
            res.status, res.error = "dead", f"not found: {exc}"
            return res
        except OSError as exc:
            res.error = f"{type(exc).__name__}: {exc}"[:300]
        if attempt < policy.retries:
            time.sleep(policy.wait(attempt))
    return res


def fetch_many(
    urls: Iterable[str],
    max_workers: int = 16,
    policy: RetryPolicy = RetryPolicy(),
    on_result: Callable[[FetchResult], None] | None = None,
) -> list[FetchResult]:
    """Fetch many URLs with at most ``max_workers`` in flight; results in input order."""
    urls = list(urls)
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    out: list[FetchResult] = []
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fetch") as pool:
        for res in pool.map(lambda u: fetch_bytes(u, policy), urls):
            if on_result is not None:
                on_result(res)
            out.append(res)
    return out


def download_file(
    url: str,
    dest: str | os.PathLike,
    policy: RetryPolicy = RetryPolicy(),
    sha256: str | None = None,
) -> FetchResult:
    """Download a (large) file to ``dest``: streams to ``dest.part``, resumes it with Range across
    attempts *and* across runs, verifies ``sha256`` when given, then renames. Raises UserError when
    the file is dead or still failing after the retries; ChecksumError on a mismatch."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    res = FetchResult(url, "failed")
    for attempt in range(policy.retries + 1):
        res.attempts = attempt + 1
        have = part.stat().st_size if part.exists() else 0
        try:
            with open(part, "ab") as f:

                def sink(chunk, f=f):
                    if chunk is None:
                        f.seek(0)
                        f.truncate()
                    else:
                        f.write(chunk)

                status, honoured = _http_attempt(url, have, policy.timeout_s, sink)
            res.http_status = status
            res.resumed |= honoured
            if status in DEAD_STATUSES:
                raise UserError(f"{url}: HTTP {status} (dead link)", "check the source URL in the registry")
            if status == 416 and have:
                status = 200
            if status < 400:
                break
            res.error = f"HTTP {status}"
            if status not in TRANSIENT_STATUSES:
                raise UserError(f"{url}: HTTP {status}")
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            res.error = f"{type(exc).__name__}: {exc}"[:300]
        if attempt < policy.retries:
            time.sleep(policy.wait(attempt))
    else:
        raise UserError(
            f"{url}: download failed after {res.attempts} attempts ({res.error})",
            "re-run to resume from the partial file",
        )
    if sha256:
        digest = hashlib.sha256()
        with open(part, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            part.unlink()
            raise ChecksumError(
                f"{url}: SHA-256 {digest.hexdigest()} does not match the expected {sha256}",
                "the partial file was removed; re-run to download it again",
            )
    os.replace(part, dest)
    res.status = "ok"
    return res


# --------------------------------------------------------------------------------------------- archives
def _check_member_name(name: str, archive: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} would be written outside the target folder",
            "refusing to extract this archive; only relative paths without '..' are allowed",
        )
    return p


def safe_extract(
    archive: str | os.PathLike,
    target: str | os.PathLike,
    max_member_bytes: int = 2 << 30,
    max_total_bytes: int = 1 << 40,
    max_members: int = 10_000_000,
) -> list[str]:
    """Extract a tar (any compression) or zip archive into ``target``; returns the extracted files.

    Refuses (UnsafeArchiveError, naming the member) absolute paths, '..', symlinks, hardlinks, device
    files, members larger than ``max_member_bytes``, more than ``max_members`` members or more than
    ``max_total_bytes`` in all. Checks every member before writing anything. A truncated or corrupt
    archive raises :class:`CorruptArchiveError`; a full or read-only disk a ``StoreAccessError``.
    """
    if not os.path.isfile(archive):
        raise UserError(f"archive not found: {archive}", "check the --archive path")
    try:
        return _extract(archive, target, max_member_bytes, max_total_bytes, max_members)
    except UserError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
        env = environment_error(exc, str(target))
        if env is not None:
            raise env from None
        raise CorruptArchiveError(
            f"{archive}: truncated or corrupt archive ({type(exc).__name__}: {exc})"[:400],
            "download the archive again (and check its checksum)",
        ) from None


def _extract(archive, target, max_member_bytes: int, max_total_bytes: int, max_members: int) -> list[str]:
    archive = str(archive)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    out: list[str] = []

    def too_big(name: str, size: int, total: int, count: int) -> None:
        if size > max_member_bytes:
            raise UnsafeArchiveError(
                f"{archive}: member {name!r} is {size} bytes (limit {max_member_bytes})",
                "raise max_member_bytes if this archive is trusted",
            )
        if total > max_total_bytes:
            raise UnsafeArchiveError(f"{archive}: more than {max_total_bytes} bytes in total")
        if count > max_members:
            raise UnsafeArchiveError(f"{archive}: more than {max_members} members")

    with _members(archive) as members:
        total = 0
        for count, (name, size, kind, _) in enumerate(members, 1):
            _check_member_name(name, archive)
            if kind != "file" and kind != "dir":
                raise UnsafeArchiveError(
                    f"{archive}: member {name!r} is a {kind}",
                    "links and special files are refused: they can point outside the target folder",
                )
            total += size
            too_big(name, size, total, count)
        for name, size, kind, open_member in members:  # every member checked before anything is written
            dest = target / _check_member_name(name, archive)
            if kind == "dir":
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open_member() as src, open(dest, "wb") as dst:
                # the declared size may lie (zip bombs): copy at most one byte beyond it
                _copy_capped(src, dst, size, f"{archive}: {name}")
            out.append(str(dest))
    return out


@contextlib.contextmanager
def _members(archive: str):
    """The members of a zip or tar archive as (name, declared size, kind, opener); kind is "file",
    "dir", "symbolic link (to …)", "hard link (to …)" or "device/fifo/special file"."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            yield [
                (
                    i.filename,
                    i.file_size,
                    "symbolic link"
                    if stat.S_ISLNK(i.external_attr >> 16)
                    else ("dir" if i.is_dir() else "file"),
                    functools.partial(zf.open, i),
                )
                for i in zf.infolist()
            ]
        return
    try:
        tf = tarfile.open(archive, "r:*")
    except tarfile.TarError as exc:
        raise UnsafeArchiveError(f"{archive}: not a tar or zip archive ({exc})") from exc

    def kind(m: tarfile.TarInfo) -> str:
        if m.issym() or m.islnk():
            return f"{'symbolic' if m.issym() else 'hard'} link (to {m.linkname!r})"
        return "dir" if m.isdir() else "file" if m.isfile() else "device/fifo/special file"

    with tf:
        yield [(m.name, m.size, kind(m), functools.partial(tf.extractfile, m)) for m in tf.getmembers()]


def _copy_capped(src, dst, limit: int, label: str) -> int:
    n = 0
    while True:
        chunk = src.read(min(1 << 20, limit - n + 1))
        if not chunk:
            return n
        n += len(chunk)
        if n > limit:
            raise UnsafeArchiveError(f"{label}: more data than its declared size {limit}")
        dst.write(chunk)
