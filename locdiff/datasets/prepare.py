"""Turn a validated metadata table into a committed ``datasets/<name>/<hash>`` artifact.

Images come from local paths (relative ones resolve against ``images_root``), HTTP(S) URLs (downloaded
with retries, ``download.fetch_bytes``) or any fsspec URL. Dead links and undecodable/truncated images
are skipped and listed in the manifest (``n_skipped``, ``skipped``, ``n_dead``), never fatal. The build
resumes shard by shard after a crash (same manifest + options = same key).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from locdiff.datasets.download import RetryPolicy, fetch_bytes, is_http, safe_extract
from locdiff.datasets.shards import DEFAULT_SHARD_SIZE, ImageRecord, SkipImage, write_dataset
from locdiff.datasets.validate import validate_file
from locdiff.storage import Store

STAGE = "datasets"
VERSION = "1"
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
) -> str:
    """Validate ``manifest`` and build the dataset artifact; returns its key (reused when committed)."""
    manifest = Path(manifest)
    if archive is not None:  # extract once next to the archive (safely), then read images from there
        archive = Path(archive)
        images_root = archive.with_name(archive.name + ".extracted")
        done = images_root / ".locdiff-extracted"
        if not done.exists():
            safe_extract(archive, images_root)
            done.write_text(_file_sha256(archive))
    root = Path(images_root) if images_root is not None else manifest.parent
    config = {
        "name": name,
        "manifest_sha256": _file_sha256(manifest),
        "fix_swapped": fix_swapped,
        "default_split": default_split,
        "shard_size": shard_size,
        "limit": limit,
        "columns": [id_col, lat_col, lon_col, image_col],
    }
    key = store.key(STAGE, name, VERSION, config)
    if store.exists(key):
        return key
    val = validate_file(
        manifest,
        id_col=id_col,
        lat_col=lat_col,
        lon_col=lon_col,
        image_col=image_col,
        fix_swapped=fix_swapped,
        default_split=default_split,
    )
    table = val.table
    if limit is not None:
        table = table.iloc[:limit]

    def loader(ref: str):
        def load() -> bytes:
            if is_http(ref) or "://" in ref:
                res = fetch_bytes(ref, policy)
                if res.status == "dead":
                    raise SkipImage(f"dead link ({res.error})")
                if not res.ok:
                    raise SkipImage(f"download failed after {res.attempts} attempts ({res.error})")
                return res.data
            path = Path(ref) if Path(ref).is_absolute() else root / ref
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise SkipImage(f"file not found: {path}") from None

        return load

    def prefetch(batch: list[ImageRecord]) -> None:
        """Download a shard's images concurrently (bounded), before it is written."""

        def run(rec: ImageRecord):
            try:
                return rec.data() if callable(rec.data) else rec.data
            except SkipImage as exc:
                return exc

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

    with store.writer(key, config) as w:
        summary = write_dataset(w, records(), shard_size=shard_size, prefetch=prefetch, progress=progress)
        dead = [s for s in summary["skipped"] if s["reason"].startswith("dead link")]
        w.set(
            dataset=name,
            source_manifest=manifest.name,
            n_input_rows=len(val.table) + len(val.dropped),
            n_dropped_rows=len(val.dropped),
            dropped_rows=val.dropped[:1000],
            n_dead=summary["skip_reasons"].get("dead link", 0),
            dead_links=[d["source"] for d in dead],
            notes=val.notes,
        )
    return key


def _raiser(exc: Exception):
    def f():
        raise exc

    return f
