"""`locdiff predict`'s options and files: expand the inputs (files, folders walked recursively, globs,
CSV/Parquet manifests of paths or URLs) lazily into ``locdiff.inference.Item``s, and write the rows that
``locdiff.inference.predict_batches`` gives (CSV, Parquet or GeoJSON, chosen by the extension) or a
static map of them; and the Blue Marble tiles of ``locdiff sample-images``. Loading the run, decoding,
encoding and predicting live in ``locdiff.inference``.
"""

from __future__ import annotations

import csv
import glob
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from locdiff.errors import UserError
from locdiff.inference import Item, is_url

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MANIFEST_EXTS = {".csv", ".parquet"}
OUT_EXTS = {".csv": "csv", ".parquet": "parquet", ".geojson": "geojson", ".json": "geojson"}
PATH_COLUMNS = ("path", "image_path", "image", "url", "image_url", "file", "filename")
ID_COLUMNS = ("id", "image_id")


# ------------------------------------------------------------------------------------------ inputs
def _walk(folder: Path) -> Iterator[Item]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            if Path(f).suffix.lower() in IMAGE_EXTS:
                p = Path(root) / f
                yield Item(str(p.relative_to(folder)), str(p))


def _manifest_column(names: list[str], wanted: tuple[str, ...]) -> str | None:
    lower = {n.lower(): n for n in names}
    return next((lower[w] for w in wanted if w in lower), None)


def _manifest(path: Path) -> Iterator[Item]:
    """Rows of a CSV/Parquet manifest: a path/URL column (relative paths: against the manifest's
    folder) and an optional id column; streamed in record batches."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            batches = lambda cols: pf.iter_batches(batch_size=4096, columns=cols)  # noqa: E731
        else:
            reader = pcsv.open_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
            names = reader.schema.names
            batches = lambda cols: (b.select(cols) for b in reader)  # noqa: E731
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError on a malformed file
        raise UserError(
            f"cannot read manifest {path}: {exc}".splitlines()[0], "pass a CSV or Parquet file"
        ) from None
    path_col = _manifest_column(names, PATH_COLUMNS)
    if path_col is None:
        raise UserError(
            f"manifest {path} has no image column (columns: {', '.join(names)})",
            f"name the column of image paths or URLs one of: {', '.join(PATH_COLUMNS)}",
        )
    id_col = _manifest_column(names, ID_COLUMNS)
    base = path.resolve().parent
    row = 0

    def gen() -> Iterator[Item]:
        nonlocal row
        for batch in batches([path_col, *([id_col] if id_col else [])]):
            paths = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if id_col else [None] * len(paths)
            for p, i in zip(paths, ids, strict=True):
                row += 1
                p = "" if p is None else str(p)
                if p and not is_url(p) and not os.path.isabs(p):
                    p = str(base / p)
                yield Item(str(i) if i is not None else f"{path.name}:{row}", p)

    return gen()


def expand_inputs(inputs: Iterable[str]) -> Iterator[Item]:
    """Items for files, folders (recursive), globs, CSV/Parquet manifests and URLs. Every argument is
    checked before anything is yielded, so a typo fails in one line before the batch starts."""
    plans: list[Callable[[], Iterator[Item]]] = []
    for arg in inputs:
        arg = str(arg)
        p = Path(arg)
        if is_url(arg):
            name = arg.rstrip("/").rsplit("/", 1)[-1] or arg
            plans.append(lambda a=arg, n=name: iter([Item(n, a)]))
        elif p.is_dir():
            plans.append(lambda d=p: _walk(d))
        elif p.is_file() and p.suffix.lower() in MANIFEST_EXTS:
            _manifest(p)  # validate the columns now
            plans.append(lambda m=p: _manifest(m))
        elif p.exists():  # a file; a FIFO or device becomes a row with the reason it was not read
            plans.append(lambda f=p: iter([Item(f.name, str(f))]))
        elif glob.has_magic(arg):
            matches = sorted(m for m in glob.glob(arg, recursive=True) if not os.path.isdir(m))
            if not matches:
                raise UserError(
                    f"the pattern {arg!r} matches no file", "quote the pattern, e.g. 'photos/**/*.jpg'"
                )
            plans.append(lambda ms=matches: (Item(Path(m).name, m) for m in ms))
        else:
            raise UserError(
                f"no such file, folder or URL: {arg}",
                "pass image files, folders, globs or a CSV/Parquet manifest",
            )
    return itertools.chain.from_iterable(plan() for plan in plans)


# ------------------------------------------------------------------------------------------ writers
def output_format(path: Path) -> str:
    fmt = OUT_EXTS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(
            f"cannot tell the output format of {path} from its extension",
            "use --out FILE.csv, FILE.parquet or FILE.geojson",
        )
    return fmt


class RowWriter:
    """Streams rows to CSV, Parquet or GeoJSON (chosen by the file's extension); write to a temporary
    name and rename on close, so a crash never leaves a half file under the requested name."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = Path(path)
        self.fmt = output_format(self.path)
        self.columns = ["id", "path", "error", *columns]
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.count = 0
        self._pq = None
        self._f = None
        if self.fmt == "csv":
            self._f = open(self.tmp, "w", newline="")
            self._csv = csv.DictWriter(self._f, fieldnames=self.columns, extrasaction="ignore")
            self._csv.writeheader()
        elif self.fmt == "geojson":
            self._f = open(self.tmp, "w")
            self._f.write('{"type": "FeatureCollection", "features": [\n')

    def _schema(self):
        import pyarrow as pa

        fields = [pa.field(c, pa.string()) for c in ("id", "path", "error")]
        fields += [pa.field(c, pa.float64()) for c in self.columns[3:]]
        return pa.schema(fields)

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        if self.fmt == "csv":
            self._csv.writerows(rows)
        elif self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = self._schema()
            if self._pq is None:
                self._pq = pq.ParquetWriter(self.tmp, schema)
            cols = {c: [r.get(c) for r in rows] for c in self.columns}
            self._pq.write_table(pa.table(cols, schema=schema))
        else:
            for r in rows:
                geom = None
                if r.get("error") is None and r.get("lat") is not None:
                    geom = {"type": "Point", "coordinates": [r["lon"], r["lat"]]}
                feat = {
                    "type": "Feature",
                    "geometry": geom,
                    "properties": {c: r.get(c) for c in self.columns},
                }
                self._f.write(("" if self.count == 0 else ",\n") + json.dumps(feat))
                self.count += 1
            return
        self.count += len(rows)

    def close(self) -> None:
        if self.fmt == "parquet":
            if self._pq is None:
                import pyarrow.parquet as pq

                self._pq = pq.ParquetWriter(self.tmp, self._schema())
            self._pq.close()
        else:
            if self.fmt == "geojson":
                self._f.write("\n]}\n")
            self._f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            if self._pq is not None:
                self._pq.close()
            if self._f is not None:
                self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ sample images
def write_sample_images(folder: Path, n: int = 8, seed: int = 0, size: int = 256) -> Path:
    """``n`` JPEG tiles of the embedded Blue Marble imagery around MP16-gallery coordinates, plus
    ``manifest.csv`` (image_id, path relative to the folder, true lat, lon): something to try
    ``predict``, ``datasets prepare --manifest`` and ``evaluate`` on, offline."""
    from locdiff.datasets.bluemarble import crop_tiles, encode_jpeg, gallery_coordinates

    lat, lon = gallery_coordinates()
    idx = np.random.default_rng(seed).choice(len(lat), n, replace=False)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    tiles = crop_tiles(lat[idx], lon[idx], size_px=size)
    for i, (la, lo, tile) in enumerate(zip(lat[idx], lon[idx], tiles, strict=True)):
        name = f"tile-{i:03d}.jpg"
        (folder / name).write_bytes(encode_jpeg(tile))
        rows.append((f"tile-{i:03d}", name, float(la), float(lo)))
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "path", "lat", "lon"])
        w.writerows(rows)
    return manifest


def predictions_map_png(results: list[dict], labels: list[str]) -> bytes:
    """Blue Marble map of each image's prediction and its modes (marker size ~ mass)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from locdiff.report import blue_marble, png_bytes

    fig, ax = plt.subplots(figsize=(10, 5.2), dpi=90)
    ax.imshow(blue_marble(), extent=(-180, 180, -90, 90), origin="upper")
    for r, label in zip(results, labels, strict=True):
        if r.get("lat") is None or r.get("lon") is None:
            continue
        mass = np.asarray(r["modes_mass"], dtype=float)
        ok = np.isfinite(np.asarray(r["modes_lat"], dtype=float)) & (mass > 0)
        mlon, mlat = np.asarray(r["modes_lon"], dtype=float)[ok], np.asarray(r["modes_lat"], dtype=float)[ok]
        ax.scatter(mlon, mlat, s=20 + 300 * mass[ok], facecolors="none", edgecolors="#ffd400")
        ax.scatter([r["lon"]], [r["lat"]], marker="x", c="#ff3b30", s=40)
        ax.annotate(
            label, (r["lon"], r["lat"]), color="white", fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_title("predictions (x) and modes (circles, size ~ mass)", fontsize=10)
    png = png_bytes(fig)
    plt.close(fig)
    return png
