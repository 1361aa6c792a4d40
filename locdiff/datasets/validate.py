"""Validate a dataset's metadata table (CSV/Parquet): columns, coordinates, ids, swapped LAT/LON.

Every error names the file, the row (the line number in a CSV, counting the header as line 1; the
0-based row index in a Parquet file) and what is allowed. The result is a normalised pandas DataFrame
with columns ``image_id, lat, lon, image, split`` (+ the other source columns, prefixed ``src_``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from locdiff.errors import UserError

ID_ALIASES = ("image_id", "img_id", "id", "photo_id", "imgid")
LAT_ALIASES = ("lat", "latitude", "gps_lat")
LON_ALIASES = ("lon", "lng", "long", "longitude", "gps_lon")
IMAGE_ALIASES = ("image", "path", "image_path", "filepath", "file", "url", "image_url", "img_url")
SPLIT_ALIASES = ("split",)


class DataValidationError(UserError):
    """A dataset table is not usable as it is; the message names the file and row."""


@dataclass
class Validated:
    table: pd.DataFrame
    source: str
    notes: list[str] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)  # rows left out (e.g. no coordinates), listed


def read_table(path: str | Path, storage_options: dict | None = None) -> pd.DataFrame:
    """Read a CSV or Parquet file (local path or fsspec URI) as strings-preserving DataFrame."""
    path = str(path)
    lower = path.lower()
    try:
        if lower.endswith((".parquet", ".pq")):
            return pd.read_parquet(path, storage_options=storage_options)
        if lower.endswith((".csv", ".csv.gz", ".tsv", ".txt")):
            sep = "\t" if lower.endswith(".tsv") else ","
            return pd.read_csv(
                path, sep=sep, dtype=str, keep_default_na=False, storage_options=storage_options
            )
    except FileNotFoundError:
        raise DataValidationError(f"{path}: file not found", "check the --manifest path") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise DataValidationError(f"{path}: cannot be read as a table ({exc})") from exc
    raise DataValidationError(
        f"{path}: unsupported manifest format",
        "use .csv, .csv.gz, .tsv or .parquet (columns: id, lat, lon, image)",
    )


def _find(df: pd.DataFrame, aliases: tuple[str, ...], explicit: str | None) -> str | None:
    if explicit:
        return explicit if explicit in df.columns else None
    lower = {c.lower().strip(): c for c in df.columns}
    for a in aliases:
        if a in lower:
            return lower[a]
    return None


def _row_label(df_index: int, source: str) -> str:
    if source.lower().endswith((".csv", ".csv.gz", ".tsv", ".txt")):
        return f"line {df_index + 2}"  # header is line 1
    return f"row {df_index}"


SWAP_MIN_ROWS = 3  # strong evidence of a swapped header needs at least this many rows ...
SWAP_MIN_SHARE = 0.10  # ... and this share of the rows with coordinates


def swap_evidence(lat: np.ndarray, lon: np.ndarray) -> tuple[int, int, bool]:
    """(rows whose LAT is out of ±90 but a valid longitude, rows with coordinates, whether the whole
    columns support a swap: every LON value is a valid latitude and every LAT value a valid longitude).
    """
    ok = np.isfinite(lat) & np.isfinite(lon)
    n = int(ok.sum())
    if not n:
        return 0, 0, False
    la, lo = np.abs(lat[ok]), np.abs(lon[ok])
    n_out = int(((la > 90) & (la <= 180)).sum())
    columns_fit = bool((lo <= 90).all() and (la <= 180).all())
    return n_out, n, columns_fit


def _swap_suspected(lat: np.ndarray, lon: np.ndarray) -> bool:
    """The LAT column holds longitudes and LON latitudes, on evidence from the whole columns: every LON
    value is within ±90, every LAT within ±180, and at least SWAP_MIN_ROWS rows (and SWAP_MIN_SHARE of
    them) have |LAT| > 90. One or two out-of-range values are those rows' errors, not a swap."""
    n_out, n, columns_fit = swap_evidence(lat, lon)
    return columns_fit and n_out >= max(SWAP_MIN_ROWS, SWAP_MIN_SHARE * n)


def validate_table(
    df: pd.DataFrame,
    source: str,
    *,
    id_col: str | None = None,
    lat_col: str | None = None,
    lon_col: str | None = None,
    image_col: str | None = None,
    require_image: bool = True,
    fix_swapped: bool = False,
    drop_missing_coords: bool = True,
    default_split: str = "test",
) -> Validated:
    """Check and normalise a metadata table; raises DataValidationError naming file and row."""
    notes: list[str] = []
    cols = {
        "image_id": _find(df, ID_ALIASES, id_col),
        "lat": _find(df, LAT_ALIASES, lat_col),
        "lon": _find(df, LON_ALIASES, lon_col),
        "image": _find(df, IMAGE_ALIASES, image_col),
    }
    if cols["image_id"] is None and cols["image"] is not None:
        cols["image_id"] = cols["image"]  # e.g. MP16's IMG_ID is itself a relative path
        notes.append(f"no id column: using {cols['image']!r} as image_id")
    if cols["image"] is None and cols["image_id"] is not None and require_image:
        cols["image"] = cols["image_id"]  # Im2GPS3k / MP16: IMG_ID is the image's relative path
        notes.append(f"no image column: using {cols['image_id']!r} as the image path")
    required = ["image_id", "lat", "lon"] + (["image"] if require_image else [])
    missing = [c for c in required if cols[c] is None]
    if missing:
        aliases = {"image_id": ID_ALIASES, "lat": LAT_ALIASES, "lon": LON_ALIASES, "image": IMAGE_ALIASES}
        wanted = "; ".join(f"{m}: one of {', '.join(aliases[m])}" for m in missing)
        raise DataValidationError(
            f"{source}: missing column(s) {', '.join(missing)} (has: {', '.join(map(str, df.columns))})",
            f"expected {wanted} (case-insensitive), or name them with "
            "--id-col/--lat-col/--lon-col/--image-col",
        )
    out = pd.DataFrame({"image_id": df[cols["image_id"]].astype(str).str.strip()})
    dropped: list[dict] = []
    coords = {}
    for name in ("lat", "lon"):
        raw = df[cols[name]]
        text = raw.astype(str).str.strip()
        num = pd.to_numeric(text.where(text != "", None), errors="coerce")
        bad = num.isna() & (text != "") & (text.str.lower() != "nan")
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataValidationError(
                f"{source}, {_row_label(i, source)}: {name} value {text.iloc[i]!r} is not a number "
                f"({int(bad.sum())} such row(s))",
                "coordinates must be decimal degrees",
            )
        coords[name] = num.to_numpy(dtype=float)
    lat, lon = coords["lat"], coords["lon"]
    if fix_swapped and not _swap_suspected(lat, lon):
        n_out, n, columns_fit = swap_evidence(lat, lon)
        why = (
            f"only {n_out} of {n} row(s) have |{cols['lat']}| > 90"
            if columns_fit
            else f"{cols['lon']!r} has values beyond ±90 or {cols['lat']!r} beyond ±180"
        )
        raise DataValidationError(
            f"{source}: --fix-swapped refused: the evidence that {cols['lat']!r}/{cols['lon']!r} are "
            f"swapped is weak ({why}; a swap needs at least {SWAP_MIN_ROWS} rows and "
            f"{SWAP_MIN_SHARE:.0%} of them with a LAT outside ±90 while every LON is within ±90)",
            "drop --fix-swapped and fix the out-of-range row(s) named without it",
        )
    if _swap_suspected(lat, lon):
        n_out, n, _ = swap_evidence(lat, lon)
        i = int(np.flatnonzero(np.abs(np.nan_to_num(lat)) > 90)[0])
        if not fix_swapped:
            raise DataValidationError(
                f"{source}: columns {cols['lat']!r}/{cols['lon']!r} look swapped: {cols['lat']!r} has "
                f"{lat[i]} at {_row_label(i, source)} (|lat| must be <= 90; {int(n_out)} of {n} rows are "
                f"like it) while every {cols['lon']!r} value is within ±90 (the old Im2GPS3k CSV has this "
                "header bug)",
                "pass --fix-swapped to swap them, or fix the header",
            )
        lat, lon = lon, lat
        notes.append(f"swapped columns {cols['lat']!r} and {cols['lon']!r} (header had them reversed)")
    for name, values, limit in (("lat", lat, 90.0), ("lon", lon, 180.0)):
        bad = np.isfinite(values) & (np.abs(values) > limit)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataValidationError(
                f"{source}, {_row_label(i, source)}: {name} = {values[i]} is out of range "
                f"[-{limit:g}, {limit:g}] ({int(bad.sum())} such row(s))",
                "latitude must be in [-90, 90] and longitude in [-180, 180] degrees",
            )
    out["lat"], out["lon"] = lat, lon
    out["image"] = df[cols["image"]].astype(str).str.strip() if cols["image"] else ""
    split_col = _find(df, SPLIT_ALIASES, None)
    out["split"] = df[split_col].astype(str) if split_col else default_split
    empty_id = out["image_id"] == ""
    if empty_id.any():
        i = int(np.flatnonzero(empty_id.to_numpy())[0])
        raise DataValidationError(f"{source}, {_row_label(i, source)}: empty image id")
    dup = out["image_id"].duplicated(keep=False)
    if dup.any():
        first = out["image_id"][dup].iloc[0]
        rows = np.flatnonzero((out["image_id"] == first).to_numpy())[:2]
        raise DataValidationError(
            f"{source}: duplicate image id {first!r} at {_row_label(int(rows[0]), source)} and "
            f"{_row_label(int(rows[1]), source)} ({int(out['image_id'][dup].nunique())} duplicated id(s))",
            "image ids must be unique; de-duplicate the manifest",
        )
    if require_image:
        no_img = out["image"] == ""
        if no_img.any():
            i = int(np.flatnonzero(no_img.to_numpy())[0])
            raise DataValidationError(f"{source}, {_row_label(i, source)}: empty image path/URL")
    no_coord = ~(np.isfinite(lat) & np.isfinite(lon))
    if no_coord.any():
        if not drop_missing_coords:
            i = int(np.flatnonzero(no_coord)[0])
            raise DataValidationError(f"{source}, {_row_label(i, source)}: missing coordinates")
        for i in np.flatnonzero(no_coord):
            dropped.append(
                {
                    "image_id": out["image_id"].iloc[i],
                    "source": out["image"].iloc[i],
                    "reason": f"missing coordinates ({_row_label(int(i), source)})",
                }
            )
        out = out[~no_coord].reset_index(drop=True)
        df = df[~no_coord].reset_index(drop=True)
    used = {c for c in cols.values() if c} | ({split_col} if split_col else set())
    for c in df.columns:
        if c not in used:
            out["src_" + str(c)] = df[c].to_numpy()
    return Validated(out, source, notes, dropped)


def validate_file(path: str | Path, **kwargs) -> Validated:
    """Read and validate a manifest file (see :func:`validate_table` for the keyword arguments)."""
    storage_options = kwargs.pop("storage_options", None)
    return validate_table(read_table(path, storage_options), str(path), **kwargs)
