"""Official sources: `locdiff datasets download NAME` fetches a dataset's published lists, joins them into
one manifest and prepares it (images downloaded by :mod:`locdiff.datasets.downloader`, or extracted from
the published archives).

Every file a source needs is a (name, default URL) pair: the URLs are configuration. ``mirror`` (an
http(s) base URL or a local folder) replaces every default with ``<mirror>/<name>``; ``urls`` names one
file's replacement (``{"urls": "/data/mp16_urls.csv"}``). A local path is used where it is, without a
copy. Fetched lists are kept in the downloads folder (``$LOCDIFF_DOWNLOADS``, default
``<project>/data/downloads``) and resumed or reused by the next run.

The published formats (checked against the publishers' repositories):

- MP16 and YFCC26k (TIBHannover/GeoEstimation, README of the ``pytorch`` branch, "Training from
  Scratch"): ``mp16_urls.csv`` / ``yfcc25600_urls.csv`` have no header and two columns, image id and
  Flickr URL (``download_images.py`` reads them with ``names=["image_id", "url"], header=None``);
  ``mp16_places365.csv`` / ``yfcc25600_places365.csv`` have a header ``IMG_ID,AUTHOR,LAT,LON,S3_Label,
  S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban``. GeoEstimation fetches MP16 at Flickr's
  ``_z`` size (640 px on the long side) rather than the original: so do we (``flickr_size``).
- Im2GPS3k: the images are ``im2gps3ktest.zip`` (lugiavn/revisiting-im2gps README, a MediaFire page,
  not a direct link: name a mirror); coordinates in GeoEstimation's ``meta/im2gps3k_places365.csv``,
  whose header says ``LON,LAT`` for columns that hold latitude, longitude (checked from the values
  and swapped: see ``fix_swapped`` in :mod:`locdiff.datasets.validate`).
- YFCC4k: ``yfcc4k.zip`` and ``yfcc4k_places365.csv`` (same columns as above) circulate together in
  later work; revisiting-im2gps only lists the image ids. No canonical direct URL: name a mirror.
- OSV-5M (huggingface.co/datasets/osv5m/osv5m, dataset card): ``test.csv``/``train.csv`` with columns
  ``id,latitude,longitude,thumb_original_url,country,...`` and the images as ``images/<split>/NN.zip``
  (5 for test, from the card's own test-only script; 98 for train is not checked against the hub
  listing: a different count is a change to ``OSV5M_TRAIN``), each image ``<id>.jpg`` inside.
- GWS15k was never published: bring your own manifest (``locdiff datasets prepare gws15k --manifest``).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from locdiff import project_dir
from locdiff.datasets.download import RetryPolicy, download_file, is_http
from locdiff.errors import UserError

_GEO = "https://github.com/TIBHannover/GeoEstimation/releases/download"
_HF_OSV = "https://huggingface.co/datasets/osv5m/osv5m/resolve/main"


@dataclass(frozen=True)
class Source:
    """Where a registry dataset's files are published and how they become a manifest."""

    name: str
    files: dict[str, tuple[str, str]]  # role -> (published file name, default URL)
    kind: str  # "urls": a URL list joined with coordinates; "archive": images in archives + a CSV
    split: str = "test"
    flickr_size: str = ""  # Flickr size suffix appended to each URL ("z": 640 px); "" for the original
    swapped_header: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


def _osv_files(split: str, n: int) -> dict[str, tuple[str, str]]:
    files = {"meta": (f"{split}.csv", f"{_HF_OSV}/{split}.csv")}
    for i in range(n):
        files[f"images{i:02d}"] = (f"images/{split}/{i:02d}.zip", f"{_HF_OSV}/images/{split}/{i:02d}.zip")
    return files


SOURCES: dict[str, Source] = {
    "mp16": Source(
        "mp16",
        {
            "urls": ("mp16_urls.csv", f"{_GEO}/v1.0/mp16_urls.csv"),
            "meta": ("mp16_places365.csv", f"{_GEO}/v1.0/mp16_places365.csv"),
        },
        "urls",
        split="train",
        flickr_size="z",
    ),
    "yfcc26k": Source(
        "yfcc26k",
        {
            "urls": ("yfcc25600_urls.csv", f"{_GEO}/pytorch/yfcc25600_urls.csv"),
            "meta": ("yfcc25600_places365.csv", f"{_GEO}/pytorch/yfcc25600_places365.csv"),
        },
        "urls",
    ),
    "im2gps3k": Source(
        "im2gps3k",
        {
            "images": ("im2gps3ktest.zip", "http://www.mediafire.com/file/7ht7sn78q27o9we/im2gps3ktest.zip"),
            "meta": (
                "im2gps3k_places365.csv",
                "https://raw.githubusercontent.com/TIBHannover/GeoEstimation/original_tf/meta/im2gps3k_places365.csv",
            ),
        },
        "archive",
        swapped_header=True,
    ),
    "yfcc4k": Source(
        "yfcc4k",
        {
            "images": ("yfcc4k.zip", "https://www.mediafire.com/file/3og8y3o6c9de3ye/yfcc4k.zip"),
            "meta": ("yfcc4k_places365.csv", ""),  # no canonical URL: a mirror or --url meta=FILE
        },
        "archive",
    ),
    "osv5m": Source("osv5m", _osv_files("test", 5), "archive"),
}
OSV5M_TRAIN = Source("osv5m", _osv_files("train", 98), "archive", split="train")


def get_source(name: str, split: str | None = None) -> Source:
    """The published source of a registry dataset; a UserError for GWS15k and unknown names."""
    key = name.lower()
    if key == "osv5m" and split == "train":
        return OSV5M_TRAIN
    if key in SOURCES:
        return SOURCES[key]
    if key == "gws15k":
        raise UserError(
            "gws15k was never published: there is nothing to download",
            "bring your own copy: `locdiff datasets prepare gws15k --manifest my_gws15k.csv`",
        )
    raise UserError(
        f"no published source for dataset {name!r}",
        f"downloadable: {', '.join(sorted(SOURCES))}; others: `locdiff datasets prepare NAME --manifest F`",
    )


def downloads_dir() -> Path:
    env = os.environ.get("LOCDIFF_DOWNLOADS")
    if env:
        return Path(env)
    return project_dir() / "data" / "downloads"


def resolve_urls(
    src: Source, mirror: str | None = None, urls: dict[str, str] | None = None
) -> dict[str, str]:
    """role -> where to fetch it: ``urls`` overrides, then ``mirror/<file name>``, then the default."""
    urls = dict(urls or {})
    unknown = sorted(set(urls) - set(src.files))
    if unknown:
        raise UserError(f"{src.name} has no file {unknown[0]!r}", f"its files: {', '.join(src.files)}")
    out = {}
    for role, (fname, default) in src.files.items():
        if role in urls:
            out[role] = urls[role]
        elif mirror:
            out[role] = f"{mirror.rstrip('/')}/{fname}" if is_http(mirror) else str(Path(mirror) / fname)
        else:
            out[role] = default
    return out


def _hint(src: Source, role: str) -> str:
    fname = src.files[role][0]
    return (
        f"fetch {fname} on a machine with internet and pass --url {role}=/path/to/{Path(fname).name}, "
        f"or --mirror DIR_OR_URL holding {fname}"
    )


def fetch(src: Source, role: str, where: str, dest_dir: Path, policy: RetryPolicy) -> Path:
    """The local copy of one published file: a local path as it is, else downloaded (resumably) into
    ``dest_dir``. Unreachable: a UserError at once, naming the URL and how to give a local copy."""
    fname = src.files[role][0]
    if not is_http(where):
        path = Path(where[len("file://") :] if where.startswith("file://") else where)
        if not path.is_file():
            raise UserError(f"{src.name}: {path} not found (for {fname})", _hint(src, role))
        return path
    dest = dest_dir / fname
    if dest.is_file():
        return dest
    import requests

    try:  # one quick probe: offline or no such host fails now, not after the retries
        with requests.get(where, stream=True, timeout=min(10.0, policy.timeout_s)) as r:
            status = r.status_code
    except requests.RequestException as exc:
        raise UserError(f"cannot reach {where} ({type(exc).__name__}); offline?", _hint(src, role)) from None
    if status >= 400:
        raise UserError(f"{where}: HTTP {status}", _hint(src, role))
    download_file(where, dest, policy)
    return dest


# --------------------------------------------------------------------------------------------- joins
def _read_url_list(path: Path):
    """A GeoEstimation URL list: no header, (image id, URL); a header row is tolerated."""
    import pandas as pd

    df = pd.read_csv(path, header=None, names=["IMG_ID", "URL"], usecols=[0, 1], dtype=str)
    if len(df) and not str(df["URL"].iloc[0]).startswith(("http://", "https://")):
        df = df.iloc[1:]  # a header row
    return df.dropna()


def flickr_sized(url: str, size: str) -> str:
    """A Flickr static URL at another size: ``…/123_abc.jpg`` -> ``…/123_abc_z.jpg``."""
    if not size:
        return url
    m = re.match(r"^(.*/\d+_[0-9a-f]+)(_[a-z0-9])?(\.\w+)$", url)
    return f"{m.group(1)}_{size}{m.group(3)}" if m else url


def join_url_list(src: Source, urls_csv: Path, meta_csv: Path, out: Path) -> Path:
    """``IMG_ID,URL,LAT,LON`` for the rows of the URL list that have coordinates in the metadata."""
    import pandas as pd

    urls = _read_url_list(urls_csv)
    meta = pd.read_csv(meta_csv, usecols=lambda c: c in ("IMG_ID", "LAT", "LON"), dtype={"IMG_ID": str})
    missing = {"IMG_ID", "LAT", "LON"} - set(meta.columns)
    if missing:
        raise UserError(
            f"{meta_csv}: no column(s) {sorted(missing)}", "expected GeoEstimation's IMG_ID,…,LAT,LON"
        )
    joined = urls.merge(meta, on="IMG_ID", how="inner")
    if src.flickr_size:
        joined["URL"] = [flickr_sized(u, src.flickr_size) for u in joined["URL"]]
    joined[["IMG_ID", "URL", "LAT", "LON"]].to_csv(out, index=False)
    return out


def join_archive(src: Source, root: Path, meta_csv: Path, out: Path) -> Path:
    """The metadata with a ``path`` column: each id's image found (by file name) under ``root``."""
    import pandas as pd

    meta = pd.read_csv(meta_csv, dtype=str)
    id_col = next((c for c in ("IMG_ID", "id") if c in meta.columns), None)
    if id_col is None:
        raise UserError(f"{meta_csv}: no IMG_ID or id column", "expected the publisher's metadata CSV")
    found: dict[str, str] = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), root)
            found.setdefault(n, rel)
            found.setdefault(os.path.splitext(n)[0], rel)
    meta["path"] = [found.get(os.path.basename(str(i)), f"missing/{i}") for i in meta[id_col]]
    meta.to_csv(out, index=False)
    return out


def download_dataset(
    store,
    name: str,
    *,
    mirror: str | None = None,
    urls: dict[str, str] | None = None,
    split: str | None = None,
    downloads: str | Path | None = None,
    policy: RetryPolicy = RetryPolicy(),
    **prepare_kwargs,
) -> str:
    """Fetch ``name``'s published files, join them and prepare the dataset; returns its key."""
    from locdiff.datasets.download import safe_extract
    from locdiff.datasets.downloader import DownloadOptions
    from locdiff.datasets.prepare import prepare_from_manifest
    from locdiff.datasets.validate import DataValidationError

    src = get_source(name, split)
    where = resolve_urls(src, mirror, urls)
    folder = Path(downloads) if downloads else downloads_dir()
    folder = folder / src.name
    folder.mkdir(parents=True, exist_ok=True)
    for role, url in where.items():  # before any request
        if not url:
            raise UserError(f"{src.name}: {src.files[role][0]} has no public direct URL", _hint(src, role))
    local = {role: fetch(src, role, where[role], folder, policy) for role in src.files}
    prepare_kwargs.setdefault("default_split", src.split)
    if src.kind == "urls":  # Flickr lists: many dead links; the downloader's own defaults (256 in flight)
        prepare_kwargs.setdefault("max_skip_share", 1.0)
        prepare_kwargs.setdefault("download", DownloadOptions())
        manifest = join_url_list(src, local["urls"], local["meta"], folder / f"{src.name}_{src.split}.csv")
        return prepare_from_manifest(store, src.name, manifest, **prepare_kwargs)
    root = folder / f"images_{src.split}"
    marker = root / ".locdiff-extracted"
    archives = sorted(str(p) for role, p in local.items() if role.startswith("images"))
    if not (marker.is_file() and marker.read_text() == "\n".join(archives)):
        if root.exists():
            shutil.rmtree(root)
        for a in archives:
            try:
                safe_extract(a, root)
            except UserError as exc:
                role = next(r for r, p in local.items() if str(p) == a)
                raise UserError(f"{src.name}: {a}: {exc.message}", _hint(src, role)) from None
        marker.write_text("\n".join(archives))
    manifest = join_archive(src, root, local["meta"], folder / f"{src.name}_{src.split}.csv")
    prepare_kwargs.setdefault("image_col", "path")

    def build(fix: bool) -> str:
        return prepare_from_manifest(
            store, src.name, manifest, images_root=root, fix_swapped=fix, **prepare_kwargs
        )

    try:
        return build(False)
    except DataValidationError as exc:
        if src.swapped_header and "look swapped" in str(exc):
            return build(True)
        raise
