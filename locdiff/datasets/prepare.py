"""Turn a validated metadata table into a committed ``datasets/<name>/<hash>`` artifact.

Images come from local paths (relative ones must resolve inside ``images_root``; absolute paths and
``file://`` only with ``allow_outside_root``) or HTTP(S) URLs (downloaded in parallel,
``downloader``; other fsspec protocols only when named in ``allow_protocols``). Dead links,
refused paths and undecodable/truncated images (decompression bombs included) are skipped and listed in
the manifest (``n_skipped``, ``skipped``, ``n_dead``), never fatal for the batch; but a build with no
usable image, or too many left out (``max_skip_share``), is not committed. The build resumes shard by
shard after a crash (same manifest, options and images = same key).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from locdiff.datasets.archives import check_archive
from locdiff.datasets.download import RetryPolicy, safe_extract
from locdiff.datasets.downloader import DownloadOptions, download_dataset
from locdiff.datasets.images import MAX_MANIFEST_BYTES, ImageError, read_user_file
from locdiff.datasets.registry import REGISTRY, hashed_val
from locdiff.datasets.shards import DEFAULT_SHARD_SIZE, ImageRecord, SkipImage, write_dataset
from locdiff.datasets.validate import validate_file
from locdiff.errors import UserError
from locdiff.stages import VERSIONS, get_or_build
from locdiff.storage import Store

STAGE = "datasets"
VERSION = VERSIONS[STAGE]  # the one version table (locdiff.stages)
MAX_SKIP_SHARE = 0.5  # default: refuse to commit a dataset that left out more than half of its rows
_EXTS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"}


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ext(ref: str) -> str:
    suffix = Path(ref.split("?", 1)[0]).suffix.lower().lstrip(".")
    return suffix if suffix in _EXTS else "jpg"


class DatasetBuildError(UserError):
    """A dataset build that must not be committed (nothing usable, or too much skipped)."""


def _count_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _extract_archive(archive: Path) -> tuple[Path, str]:
    """Extract ``archive`` (safely) next to itself, again whenever its content changed; returns the
    folder and the archive's sha256."""
    digest = _file_sha256(archive)
    target = archive.with_name(archive.name + ".extracted")
    marker = target / ".locdiff-extracted"
    if marker.is_file() and marker.read_text().strip() == digest:
        return target, digest
    tmp = archive.with_name(f".{archive.name}.extracting-{uuid.uuid4().hex[:8]}")
    check_archive(archive, tmp)  # compression ratio and free disk, from the headers, before any write
    try:
        safe_extract(archive, tmp)
        (tmp / ".locdiff-extracted").write_text(digest)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target, digest


class _Resolver:
    """Where an image reference may be read from: relative paths inside the images root; absolute paths
    and ``file://`` only with ``allow_outside_root``; remote URLs over http(s), or the protocols named in
    ``allow_protocols``. A refused reference is a skipped row with the reason."""

    def __init__(self, root: Path, allow_outside_root: bool, allow_protocols: tuple[str, ...]) -> None:
        self.root = root.resolve()
        self.allow_outside_root = allow_outside_root
        self.allow_protocols = tuple(p.lower() for p in allow_protocols)

    def local_path(self, ref: str) -> Path | None:
        """The local file a reference names (checked), or None when it is remote."""
        if "://" in ref:
            scheme = ref.split("://", 1)[0].lower()
            if scheme != "file":
                return None
            if not self.allow_outside_root:
                raise SkipImage("refused: file:// URL (pass --allow-outside-root to read it)")
            return Path(ref[len("file://") :])
        path = Path(ref)
        if path.is_absolute():
            if not self.allow_outside_root:
                raise SkipImage("refused: absolute path (pass --allow-outside-root to read it)")
            return path
        resolved = (self.root / path).resolve()
        if not resolved.is_relative_to(self.root) and not self.allow_outside_root:
            raise SkipImage("refused: path outside --images-root (pass --allow-outside-root to read it)")
        return resolved

    def check_remote(self, ref: str) -> None:
        scheme = ref.split("://", 1)[0].lower()
        if scheme not in ("http", "https") and scheme not in self.allow_protocols:
            raise SkipImage(
                f"refused: protocol {scheme!r} "
                f"(only http and https; pass --allow-protocol {scheme} to fetch it)"
            )

    def fingerprint(self, refs) -> str:
        """sha256 over each local image's size and mtime (remote ones count by their URL alone)."""
        h = hashlib.sha256()
        for ref in refs:
            try:
                path = self.local_path(ref)
            except SkipImage as exc:
                h.update(f"{ref}\0refused:{exc}\n".encode())
                continue
            if path is None:
                h.update(f"{ref}\0remote\n".encode())
                continue
            try:
                st = path.stat()
                h.update(f"{ref}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{ref}\0missing\n".encode())
        return h.hexdigest()


class NothingRecovered(Exception):
    """A retry build that fetched its failed samples again and got none of them: not committed."""


def retry_target(
    store: Store, stage: str, name: str, version: str, config: dict
) -> tuple[str, dict, str | None]:
    """The key to build for ``config`` and the committed build it retries, if any.

    A committed build with transient failures (``n_failed``) is never rewritten: the next build of the
    same rows gets the key of ``config + {"retry_of": that key}``; it copies that build's shards and
    fetches only the failed samples. Returns (key, config, previous key); ``previous`` is None when the
    key is new, or committed without failures (then there is nothing to do)."""
    key = store.key(stage, name, version, config)
    previous = None
    while store.exists(key):
        if not store.manifest(key).get("n_failed"):
            return key, config, None
        previous = key
        config = {**config, "retry_of": key}
        key = store.key(stage, name, version, config)
    return key, config, previous


def prepare_from_manifest(
    store: Store,
    name: str,
    manifest: str | Path,
    images_root: str | Path | None = None,
    archive: str | Path | None = None,
    *,
    fix_swapped: bool = False,
    default_split: str = "test",
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_workers: int = 16,
    policy: RetryPolicy = RetryPolicy(),
    limit: int | None = None,
    id_col: str | None = None,
    lat_col: str | None = None,
    lon_col: str | None = None,
    image_col: str | None = None,
    progress=None,
    allow_outside_root: bool = False,
    allow_protocols: tuple[str, ...] = (),
    max_skip_share: float = MAX_SKIP_SHARE,
    force: bool = False,
    download: DownloadOptions | None = None,
) -> str:
    """Validate ``manifest`` and build the dataset artifact; returns its key (reused when committed).

    The key covers the manifest's bytes, the images root, the archive's sha256 and every local image's
    size and mtime, so changed inputs build a new artifact; ``force`` rebuilds a committed one under a new
    key (``config["rebuild_of"]`` names the one it replaces; a committed key is never rewritten). A build
    with no usable image, or whose share of rows left out (skipped or without coordinates) exceeds
    ``max_skip_share``, is not committed: :class:`DatasetBuildError` gives the counts of why.
    A manifest with remote images is downloaded by :mod:`locdiff.datasets.downloader` (``download``:
    its options; ``max_workers`` and ``policy`` set its concurrency and retries when it is None).
    """
    if not 0.0 <= max_skip_share <= 1.0:
        raise UserError(f"max_skip_share must be within [0, 1], got {max_skip_share}")
    manifest = Path(manifest)
    for what, path in (("--manifest", manifest), ("--archive", archive)):
        if path is not None and not Path(path).is_file():  # a FIFO or device would block the reader
            raise UserError(f"{what} {path} is not a regular file", f"pass {what} a file")
    if manifest.stat().st_size > MAX_MANIFEST_BYTES:  # loaded whole below
        raise UserError(
            f"--manifest {manifest} is over {MAX_MANIFEST_BYTES >> 30} GiB (it is loaded whole)",
            "split it into several datasets, or keep only the columns id, lat, lon, image",
        )
    archive_sha = None
    if archive is not None:  # extract next to the archive (safely), again when the archive changed
        images_root, archive_sha = _extract_archive(Path(archive))
    root = Path(images_root) if images_root is not None else manifest.parent
    if images_root is not None and not root.is_dir():
        raise UserError(f"--images-root {root} is not a folder", "pass the folder the image paths are in")
    resolver = _Resolver(root, allow_outside_root, tuple(allow_protocols))
    val = validate_file(
        manifest,
        id_col=id_col,
        lat_col=lat_col,
        lon_col=lon_col,
        image_col=image_col,
        fix_swapped=fix_swapped,
        default_split=default_split,
    )
    table = hashed_val(name, val.table)  # MP16: its deterministic val slice (registry.val_buckets)
    if limit is not None:
        table = table.iloc[:limit]
    n_input = len(val.table) + len(val.dropped)
    if len(table) == 0:
        why = f"{len(val.dropped)} without coordinates" if val.dropped else "the manifest has no rows"
        raise DatasetBuildError(
            f"dataset {name!r} not built: 0 of {n_input} rows usable ({why}); nothing was committed",
            "give a manifest with at least one row with an image and coordinates",
        )
    config = {
        "name": name,
        "manifest_sha256": _file_sha256(manifest),
        "images_root_sha256": hashlib.sha256(str(resolver.root).encode()).hexdigest(),
        "archive_sha256": archive_sha,
        "images_fingerprint": resolver.fingerprint(table["image"].tolist()),
        "allow_outside_root": bool(allow_outside_root),
        "allow_protocols": sorted(resolver.allow_protocols),
        "fix_swapped": fix_swapped,
        "default_split": default_split,
        "shard_size": shard_size,
        "limit": limit,
        "columns": [id_col, lat_col, lon_col, image_col],
    }
    if (spec := REGISTRY.get(name.lower())) is not None and spec.val_buckets:
        config["val_buckets"] = spec.val_buckets
    remote = any("://" in ref and not ref.lower().startswith("file://") for ref in table["image"])
    previous = None
    download = DownloadOptions.parse(download)
    if remote:  # resized downloads: the size is part of the content
        if download is None:
            download = DownloadOptions.from_policy(policy, concurrency=max(1, max_workers))
        config["download"] = download.content_config()
    key = store.key(STAGE, name, VERSION, config)
    if remote and not force:  # a committed build with transient failures is retried under a new key
        key, config, previous = retry_target(store, STAGE, name, VERSION, config)
    if store.exists(key):
        if not force:
            return key
        # --force never rewrites a committed key: the rebuild gets an identity of its own, so every
        # artifact keyed on the old dataset (embeddings, targets, runs, evaluations) is built anew
        config["rebuild_of"], config["rebuild_nonce"] = key, uuid.uuid4().hex
        key = store.key(STAGE, name, VERSION, config)

    def loader(ref: str):
        def load() -> bytes:
            path = resolver.local_path(ref)  # never None here: remote manifests go to _download
            try:
                return read_user_file(path)  # bounded; a FIFO or device is skipped, never read
            except ImageError as exc:
                raise SkipImage(f"{exc.reason} ({ref})") from None
            except FileNotFoundError:
                raise SkipImage(f"file not found ({ref})") from None
            except IsADirectoryError:
                raise SkipImage(f"not a file ({ref})") from None
            except PermissionError:
                raise SkipImage(f"permission denied ({ref})") from None

        return load

    def prefetch(batch: list[ImageRecord]) -> None:
        """Download a shard's images concurrently (bounded), before it is written."""

        def run(rec: ImageRecord):
            try:
                return rec.data() if callable(rec.data) else rec.data
            except (SkipImage, OSError, ValueError) as exc:
                return exc if isinstance(exc, SkipImage) else SkipImage(f"unreadable ({exc})")

        with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
            results = list(pool.map(run, batch))
        for rec, res in zip(batch, results, strict=True):
            if isinstance(res, Exception):
                rec.data = _raiser(res)
            else:
                rec.data = res

    extra_cols = [c for c in table.columns if c.startswith("src_")]

    def records():
        for row in table.itertuples(index=False):
            r = row._asdict()
            yield ImageRecord(
                image_id=r["image_id"],
                lat=r["lat"],
                lon=r["lon"],
                data=loader(r["image"]),
                split=r["split"],
                ext=_ext(r["image"]),
                source=r["image"],
                extra={c: (None if r[c] is None else str(r[c])) for c in extra_cols},
            )

    def build(w) -> None:
        if remote:
            summary = _download(w, records(), resolver, download, len(table), shard_size, previous)
        else:
            summary = write_dataset(w, records(), shard_size=shard_size, prefetch=prefetch, progress=progress)
        left_out = summary["n_skipped"] + len(val.dropped)
        counts = dict(summary["skip_reasons"])
        if val.dropped:
            counts["without coordinates"] = len(val.dropped)
        if summary["rows"] == 0 or left_out > max_skip_share * n_input:
            usable = f"{summary['rows']} of {n_input} rows usable"
            if summary["rows"] == 0:
                raise DatasetBuildError(
                    f"dataset {name!r} not committed: {usable}; left out: {_count_text(counts)}",
                    "fix the inputs (the manifest's paths/URLs, --images-root, --archive) and re-run",
                )
            raise DatasetBuildError(
                f"dataset {name!r} not committed: {usable}, {left_out / n_input:.0%} left out "
                f"(more than --max-skip-share {max_skip_share:g}); left out: {_count_text(counts)}",
                "fix the inputs and re-run, or accept it with a higher --max-skip-share (e.g. 1.0)",
            )
        dead = [s for s in summary["skipped"] if s["reason"].startswith("dead link")]
        w.set(
            dataset=name,
            source_manifest=manifest.name,
            n_input_rows=n_input,
            n_dropped_rows=len(val.dropped),
            dropped_rows=val.dropped[:1000],
            n_dead=summary["skip_reasons"].get("dead link", 0),
            n_failed=summary.get("n_failed", 0),
            retry_of=previous,
            dead_links=[d["source"] for d in dead],
            notes=val.notes,
        )

    with contextlib.suppress(NothingRecovered):  # the shared key -> committed? -> writer -> commit path
        get_or_build(store, STAGE, name, config, [], build)  # the key computed above
    if previous is not None and not store.exists(key):  # a retry that got none of its failures back
        print(f"{previous}: none of its failed downloads came back; kept as it is", file=sys.stderr)
        return previous
    return key


def _download(
    writer, records, resolver: _Resolver, opts: DownloadOptions, total: int, shard_size: int, previous
):
    """Build the shards with the parallel downloader; local references are read through the same path."""

    def job_of(rec: ImageRecord):
        try:
            path = resolver.local_path(rec.source)
            if path is None:
                resolver.check_remote(rec.source)
                scheme = rec.source.split("://", 1)[0].lower()
                return ("url" if scheme in ("http", "https") else "fsspec", rec.source)
            return ("file", str(path))
        except SkipImage as exc:
            return ("skip", str(exc))

    summary = download_dataset(
        writer, records, job_of, total=total, shard_size=shard_size, opts=opts, previous_key=previous
    )
    if previous is not None and summary["recovered"] == 0:
        raise NothingRecovered(previous)
    return summary


def _raiser(exc: Exception):
    def f():
        raise exc

    return f
