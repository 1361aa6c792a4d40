"""Parallel image download into dataset shards: img2dataset's job, inside our store and manifest.

One asyncio event loop (aiohttp) in this process keeps up to ``concurrency`` requests in flight over
*many shards at once*, so one stalled URL holds one slot, not a shard. Connections are reused
(keep-alive), at most ``per_host`` go to one host, DNS answers are cached for ``dns_cache_s``. Decoding,
the safety checks of :func:`locdiff.datasets.images.decode_image` and the resize run in ``processes``
worker processes (0: a thread of this process). A shard is written (tar + Parquet index) and committed
as a part as soon as its last sample is in: no truncated tar is ever committed (the store stages each
attempt's files and only a committed part is reused), so a killed build resumes shard by shard.

Sample outcomes: ``ok``; ``dead`` (HTTP 403/404/410/451: counted and listed, never retried, reused on
resume); ``failed`` (timeouts, resets, 5xx and 429 after ``retries`` retries with jittered exponential
backoff): the shard index marks the row ``failed`` and any later build over the same rows fetches only
those rows again (see :func:`plan_shard`); ``skipped`` (undecodable, too large, refused path).

Resize: the shortest side is brought down to ``image_size`` (aspect kept, never enlarged) and the
result re-encoded as JPEG; images already that small are kept byte for byte. ``image_size=None`` keeps
every original. The default, 224, is what the production encoder takes (ViT-L-14 resizes the shortest
side to 224 and centre-crops; see ``locdiff.encoders``); a larger encoder input needs a larger value.
Shards are plain tars of ``<key>.<ext>`` members, which webdataset reads as one sample per key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from locdiff.datasets.download import DEAD_STATUSES, TRANSIENT_STATUSES, USER_AGENT, RetryPolicy, fetch_bytes
from locdiff.datasets.shards import (
    ImageRecord,
    SkipImage,
    TransientFailure,
    _read_index,
    shard_relpath,
    summarize_dataset,
    write_shard,
)
from locdiff.errors import UserError
from locdiff.storage import ArtifactWriter, Store

DEFAULT_IMAGE_SIZE = 224


@dataclass(frozen=True)
class DownloadOptions:
    """How to download (validated). Only ``image_size`` and ``quality`` change the stored bytes, so
    only they enter the dataset key (:meth:`content_config`)."""

    processes: int = -1  # decode/resize worker processes; -1: one per CPU; 0: a thread of this process
    concurrency: int = 256  # requests in flight, over all shards
    per_host: int = 128  # requests in flight to one host
    image_size: int | None = DEFAULT_IMAGE_SIZE  # shortest side after resize; None keeps the original
    quality: int = 95  # JPEG quality of resized images
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 20.0  # per read: a stalled body is a transient failure after this
    dns_cache_s: int = 600
    retries: int = 2  # extra attempts in this run (a later run retries what still failed)
    backoff_s: float = 0.5
    max_image_bytes: int = 64 << 20
    shards_in_flight: int = 0  # 0: enough shards to keep `concurrency` busy (bounds memory)

    def __post_init__(self) -> None:
        checks = {
            "concurrency": self.concurrency >= 1,
            "per_host": self.per_host >= 1,
            "processes": self.processes >= -1,
            "image_size": self.image_size is None or 16 <= self.image_size <= 8192,
            "quality": 1 <= self.quality <= 100,
            "connect_timeout_s": self.connect_timeout_s > 0,
            "read_timeout_s": self.read_timeout_s > 0,
            "dns_cache_s": self.dns_cache_s >= 0,
            "retries": 0 <= self.retries <= 20,
            "backoff_s": self.backoff_s >= 0,
            "max_image_bytes": self.max_image_bytes >= 1024,
            "shards_in_flight": self.shards_in_flight >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise UserError(
                f"invalid download option {bad[0]}={getattr(self, bad[0])!r}",
                "concurrency/per_host >= 1, processes >= -1, image_size 16..8192 or none, quality 1..100, "
                "timeouts > 0, retries 0..20",
            )

    @classmethod
    def from_policy(cls, policy: RetryPolicy, **kw) -> DownloadOptions:
        """Options whose retries and timeouts follow a :class:`RetryPolicy` (prepare's ``policy``)."""
        return cls(
            retries=policy.retries,
            backoff_s=policy.backoff_s,
            connect_timeout_s=policy.timeout_s,
            read_timeout_s=policy.timeout_s,
            **kw,
        )

    @classmethod
    def parse(cls, value: DownloadOptions | dict | None) -> DownloadOptions | None:
        """Options from a flow parameter (a dict of field names) or as they are."""
        if value is None or isinstance(value, cls):
            return value
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise UserError(
                f"unknown download option {unknown[0]!r}", f"allowed: {', '.join(sorted(fields))}"
            )
        return cls(**value)

    def content_config(self) -> dict:
        return {"image_size": self.image_size, "quality": self.quality if self.image_size else None}

    def n_processes(self) -> int:
        return (os.cpu_count() or 1) if self.processes < 0 else self.processes


# --------------------------------------------------------------------------------------------- CPU side
def _process_job(args: tuple[bytes, int | None, int]) -> tuple[str, str | None, bytes | None, str]:
    """:func:`~locdiff.datasets.images.process_image` in a worker process, its refusal as a status."""
    from locdiff.datasets.images import ImageError, process_image

    try:
        data, ext = process_image(*args)
        return "ok", None, data, ext
    except ImageError as exc:
        return "skipped", exc.reason, None, ""


# --------------------------------------------------------------------------------------------- progress
class DownloadProgress:
    """images/s, dead and failed counts: a line on stderr every ``every_s`` seconds and, inside a Prefect
    run, a progress artifact (``progress-download``) whose description carries the same counts."""

    def __init__(self, total: int, every_s: float = 2.0, stream=None, quiet: bool = False) -> None:
        self.total = total
        self.every_s = every_s
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.counts = {"ok": 0, "dead": 0, "failed": 0, "skipped": 0, "reused": 0}
        self.t0 = time.monotonic()
        self._last = 0.0
        self._artifact = None
        try:
            from prefect.artifacts import create_progress_artifact
            from prefect.context import get_run_context

            get_run_context()
            self._artifact = create_progress_artifact(0.0, key="progress-download", description=self.text())
        except Exception:  # noqa: BLE001 - no run context / no API: stderr only
            self._artifact = None

    def add(self, status: str, n: int = 1) -> None:
        self.counts[status] = self.counts.get(status, 0) + n
        self.report()

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def rate(self) -> float:
        fetched = self.done - self.counts["reused"]
        return fetched / max(1e-9, time.monotonic() - self.t0)

    def text(self) -> str:
        c = self.counts
        return (
            f"{self.done}/{self.total} images, {self.rate():.0f} images/s, {c['ok']} ok, {c['dead']} dead, "
            f"{c['failed']} failed, {c['skipped']} skipped, {c['reused']} reused"
        )

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        if not self.quiet:
            try:
                print(f"download: {self.text()}", file=self.stream, flush=True)
            except (OSError, ValueError):
                pass
        if self._artifact is not None:
            try:
                from prefect.artifacts import update_progress_artifact

                pct = 100.0 * self.done / self.total if self.total else 100.0
                update_progress_artifact(self._artifact, min(100.0, pct), description=self.text())
            except Exception:  # noqa: BLE001 - progress is best effort
                pass


# --------------------------------------------------------------------------------------------- plans
# ("url", url) | ("fsspec", url) | ("file", path) | ("skip", reason) | ("data", bytes)
Job = tuple[str, object]


class PreviousShards:
    """Where a shard may already exist: a finished part of this key (an earlier attempt), else the same
    shard of ``previous_key`` (a committed build of the same rows that had transient failures)."""

    def __init__(self, writer: ArtifactWriter, store: Store, previous_key: str | None = None) -> None:
        self.writer = writer
        self.store = store
        self.previous_key = previous_key

    def get(self, rel: str) -> tuple[pa.Table, Callable[[], bytes], bool] | None:
        """(index, tar bytes, whether it is a part of this key) of shard ``rel``, or None."""
        idx = _read_index(self.writer, rel)
        if idx is not None:

            def own() -> bytes:
                with self.writer.open_part(rel) as f:
                    return f.read()

            return idx, own, True
        if self.previous_key is None:
            return None
        index_rel = rel[: -len(".tar")] + ".parquet"
        if index_rel not in self.store.files(self.previous_key):
            return None
        idx = self.store.read_table(self.previous_key, index_rel)
        return idx, lambda: self.store.read_bytes(self.previous_key, rel), False


def plan_shard(
    batch: list[ImageRecord], job_of: Callable[[ImageRecord], Job], previous: tuple | None
) -> tuple[list[Job], bool]:
    """The job of each record of a shard and whether the shard can be reused as it is.

    Without a previous shard every record gets ``job_of(record)``. With one (same rows, same order):
    ``ok`` rows take their bytes from it, ``skipped`` rows (dead links included) keep their reason, and
    only ``failed`` rows are fetched again. A part of this key without failed rows is reused whole; a
    shard of a previous key is copied (no request)."""
    if previous is None:
        return [job_of(r) for r in batch], False
    idx, tar_bytes, own = previous
    status = idx["status"].to_pylist()
    ids = idx["image_id"].to_pylist()
    if len(status) != len(batch) or ids != [str(r.image_id) for r in batch]:
        return [job_of(r) for r in batch], False  # not the same rows: fetch everything
    if own and "failed" not in status:
        return [], True
    blob = tar_bytes()
    jobs: list[Job] = []
    for rec, st, err, off, size in zip(
        batch,
        status,
        idx["error"].to_pylist(),
        idx["offset"].to_pylist(),
        idx["size"].to_pylist(),
        strict=True,
    ):
        if st == "ok":
            jobs.append(("data", blob[off : off + size]))
        elif st == "failed":
            jobs.append(job_of(rec))
        else:
            jobs.append(("skip", err or "skipped"))
    return jobs, False


# --------------------------------------------------------------------------------------------- engine
class _Engine:
    def __init__(self, opts: DownloadOptions, cpu: Executor, progress: DownloadProgress) -> None:
        import aiohttp

        self.opts = opts
        self.cpu = cpu
        self.io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="download-io")
        self.progress = progress
        self.sem = asyncio.Semaphore(opts.concurrency)
        connector = aiohttp.TCPConnector(
            limit=opts.concurrency,
            limit_per_host=opts.per_host,
            ttl_dns_cache=opts.dns_cache_s or None,
            use_dns_cache=opts.dns_cache_s > 0,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": USER_AGENT},
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=opts.connect_timeout_s, sock_read=opts.read_timeout_s
            ),
        )

    async def close(self) -> None:
        await self.session.close()
        self.io.shutdown(wait=True)

    async def fetch(self, url: str) -> tuple[str, str | None, bytes | None]:
        """(status, error, body): ok / dead / failed (after retries) / skipped (too large)."""
        import aiohttp

        opts = self.opts
        error = ""
        for attempt in range(opts.retries + 1):
            try:
                async with self.session.get(url) as r:
                    if r.status in DEAD_STATUSES:
                        return "dead", f"dead link (HTTP {r.status})", None
                    if r.status >= 400:
                        error = f"HTTP {r.status}"
                        if r.status not in TRANSIENT_STATUSES:
                            break
                    elif (r.content_length or 0) > opts.max_image_bytes:
                        return "skipped", f"too large ({r.content_length} bytes)", None
                    else:
                        body = bytearray()
                        async for chunk in r.content.iter_chunked(1 << 16):
                            body += chunk
                            if len(body) > opts.max_image_bytes:
                                return "skipped", f"too large (over {opts.max_image_bytes} bytes)", None
                        return "ok", None, bytes(body)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:200] if str(exc) else type(exc).__name__
            if attempt < opts.retries:
                wait = min(30.0, opts.backoff_s * 2**attempt) * random.uniform(0.75, 1.25)
                await asyncio.sleep(wait)
        return "failed", f"download failed after {attempt + 1} attempts ({error})", None

    async def one(self, job: Job) -> tuple[str, str | None, bytes | None, str]:
        """(status, error, bytes, extension) of one sample."""
        loop = asyncio.get_running_loop()
        kind, value = job
        if kind == "skip":
            return "skipped", str(value), None, ""
        if kind == "data":
            return "reused", None, value, ""
        async with self.sem:
            if kind == "url":
                status, error, data = await self.fetch(str(value))
            elif kind == "fsspec":
                res = await loop.run_in_executor(self.io, fetch_bytes, str(value), _policy(self.opts))
                status = {"ok": "ok", "dead": "dead"}.get(res.status, "failed")
                what = "dead link" if status == "dead" else "download failed"
                error = None if res.ok else f"{what} ({res.error})"
                data = res.data
            else:  # a local file, already checked by the caller
                try:
                    data = await loop.run_in_executor(self.io, Path(str(value)).read_bytes)
                    status, error = "ok", None
                except OSError as exc:
                    status, error, data = "skipped", f"unreadable ({type(exc).__name__}: {exc})", None
        if status != "ok":
            return status, error, None, ""
        args = (data, self.opts.image_size, self.opts.quality)
        return await loop.run_in_executor(self.cpu, _process_job, args)


def _policy(opts: DownloadOptions) -> RetryPolicy:
    return RetryPolicy(retries=opts.retries, backoff_s=opts.backoff_s, timeout_s=opts.read_timeout_s)


def _to_record(rec: ImageRecord, result: tuple[str, str | None, bytes | None, str]) -> ImageRecord:
    status, error, data, ext = result
    if status in ("ok", "reused"):
        return dataclasses.replace(rec, data=data, ext=ext or rec.ext)
    exc = TransientFailure(error) if status == "failed" else SkipImage(error or status)

    def raise_it():
        raise exc

    return dataclasses.replace(rec, data=raise_it)


def _reused_ext(rec: ImageRecord, idx: pa.Table, i: int) -> str:
    member = idx["member"][i].as_py()
    return member.rsplit(".", 1)[-1] if member else rec.ext


def download_dataset(
    writer: ArtifactWriter,
    records: Iterable[ImageRecord],
    job_of: Callable[[ImageRecord], Job],
    *,
    total: int,
    shard_size: int,
    opts: DownloadOptions = DownloadOptions(),
    previous_key: str | None = None,
    progress: DownloadProgress | None = None,
) -> dict:
    """Download ``records`` (their sources through ``job_of``) into shards of ``writer``; returns the
    summary of :func:`locdiff.datasets.shards.summarize_dataset` plus ``recovered`` (failed rows of a
    previous shard that are ok now) and ``fetched`` (samples requested in this run)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    progress = progress or DownloadProgress(total)
    n_proc = opts.n_processes()
    if n_proc > 0:
        import multiprocessing as mp

        cpu: Executor = ProcessPoolExecutor(n_proc, mp_context=mp.get_context("forkserver"))
    else:
        cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="download-cpu")
    try:
        return asyncio.run(_download(writer, records, job_of, shard_size, opts, cpu, progress, previous_key))
    finally:
        cpu.shutdown(wait=True, cancel_futures=True)
        progress.report(force=True)


async def _download(writer, records, job_of, shard_size, opts, cpu, progress, previous_key) -> dict:
    engine = _Engine(opts, cpu, progress)
    prev = PreviousShards(writer, writer.store, previous_key)
    loop = asyncio.get_running_loop()
    write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="download-write")
    window = opts.shards_in_flight or max(2, -(-2 * opts.concurrency // shard_size) + 1)
    indexes: dict[int, pa.Table] = {}
    stats = {"reused": 0, "recovered": 0, "fetched": 0}

    async def do_shard(n: int, rel: str, batch: list[ImageRecord], jobs: list[Job], old) -> None:
        async def counted(job: Job):
            res = await engine.one(job)
            dead = res[0] == "skipped" and (res[1] or "").startswith("dead link")
            progress.add("dead" if dead else res[0])
            return res

        results = await asyncio.gather(*(counted(j) for j in jobs))
        recs = []
        for i, (rec, res) in enumerate(zip(batch, results, strict=True)):
            if res[0] == "reused":  # keep the extension it was stored with
                res = ("reused", None, res[2], _reused_ext(rec, old[0], i))
            recs.append(_to_record(rec, res))
        stats["fetched"] += sum(1 for j in jobs if j[0] in ("url", "fsspec", "file"))
        if old is not None:
            old_status = old[0]["status"].to_pylist()
            stats["recovered"] += sum(
                1 for s, r in zip(old_status, results, strict=True) if s == "failed" and r[0] == "ok"
            )
        indexes[n] = await loop.run_in_executor(write_pool, write_shard, writer, rel, recs, False)

    tasks: set[asyncio.Task] = set()

    async def drain(until: int) -> None:
        nonlocal tasks
        while len(tasks) > until:
            done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # re-raise a failed shard write (disk full, store down)

    try:
        n = 0
        for batch in _batches(records, shard_size):
            rel = shard_relpath(n)
            old = prev.get(rel)
            jobs, reuse = plan_shard(batch, job_of, old)
            if reuse:
                indexes[n] = old[0]
                stats["reused"] += 1
                progress.add("reused", len(batch))
            else:
                await drain(window - 1)
                tasks.add(asyncio.create_task(do_shard(n, rel, batch, jobs, old)))
            n += 1
        await drain(0)
        if n == 0:
            empty = (writer, shard_relpath(0), [], False)
            indexes[0] = await loop.run_in_executor(write_pool, write_shard, *empty)
    finally:
        for t in tasks:
            t.cancel()
        await engine.close()
        write_pool.shutdown(wait=True)
    summary = summarize_dataset(writer, [indexes[i] for i in sorted(indexes)], stats["reused"])
    summary.update(recovered=stats["recovered"], fetched=stats["fetched"])
    return summary


def _batches(records: Iterable[ImageRecord], size: int):
    batch: list[ImageRecord] = []
    for rec in records:
        batch.append(rec)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
