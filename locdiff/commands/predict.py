"""Batch prediction with a trained run: used by `locdiff predict` (and, per image, by `locdiff serve`).

Inputs are expanded lazily (files, folders walked recursively, globs, CSV/Parquet manifests of paths or
URLs), decoded a batch at a time on a few threads, encoded with the run's encoder and predicted through
``locdiff.stages.runs.predict_embeddings`` — the one inference path. Memory is bounded by one batch of
images. An image that cannot be read (missing, not an image, too many pixels, a dead URL) becomes a row
whose ``error`` says why; it never stops the batch.

Output columns: ``id``, ``path``, ``error`` and then, flattened from what ``predict_embeddings``
returns, ``lat``/``lon`` (its ``pred_lat``/``pred_lon``), ``score``, ``mode{j}_lat``/``_lon``/``_mass``
for the top-k modes, and any further column it returns as it is (``NAME`` for per-image values,
``NAME_{j}`` for per-image vectors) — e.g. LocDiff-H and credible radii once they exist.
"""

from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from locdiff.datasets.images import ImageError
from locdiff.errors import UserError
from locdiff.storage import Store

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MANIFEST_EXTS = {".csv", ".parquet"}
OUT_EXTS = {".csv": "csv", ".parquet": "parquet", ".geojson": "geojson", ".json": "geojson"}
PATH_COLUMNS = ("path", "image_path", "image", "url", "image_url", "file", "filename")
ID_COLUMNS = ("id", "image_id")
MAX_DOWNLOAD_BYTES = 64 << 20


# ------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class Item:
    id: str
    path: str


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


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
                if p and not _is_url(p) and not os.path.isabs(p):
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
        if _is_url(arg):
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


# ------------------------------------------------------------------------------------------ decoding
def read_source(path: str, max_bytes: int = MAX_DOWNLOAD_BYTES, timeout: float = 30.0) -> bytes:
    """The bytes of a local file or an http(s) URL (size-capped; a download gets ``timeout`` per read
    and 4 x ``timeout`` in all, so a server that drips bytes cannot hold the batch)."""
    if not path:
        raise ImageError("empty path")
    if _is_url(path):
        import requests
        import urllib3

        deadline = time.monotonic() + 4 * timeout
        with requests.get(path, stream=True, timeout=timeout) as r:
            if r.status_code != 200:
                raise ImageError(f"HTTP {r.status_code} from {path}")
            buf = io.BytesIO()
            if hasattr(r.raw, "read1"):  # urllib3 2: what has arrived, so the deadline is checked
                chunks = iter(lambda: r.raw.read1(1 << 16, decode_content=True), b"")
            else:
                chunks = r.iter_content(1 << 16)
            try:
                for chunk in chunks:
                    buf.write(chunk)
                    if buf.tell() > max_bytes:
                        raise ImageError(f"download larger than {max_bytes >> 20} MiB")
                    if time.monotonic() > deadline:
                        raise ImageError(f"download took longer than {4 * timeout:g} s")
            except urllib3.exceptions.HTTPError as exc:  # a raw read's error (timeout, broken body)
                raise ImageError(f"download failed ({type(exc).__name__})") from None
            return buf.getvalue()
    from locdiff.datasets.images import read_user_file

    return read_user_file(path, max_bytes)  # a FIFO or device is a reason row, never a hang


def image_tensor(data: bytes, preprocess, max_pixels: int | None = None):
    """Image bytes -> the encoder's uint8 tensor ``[3, S, S]`` through the shared safe decoder
    (``locdiff.datasets.images``: bombs, non-images and broken files are an ``ImageError``). Large
    JPEGs are decoded at a reduced DCT scale no smaller than the encoder's input."""
    from locdiff.datasets.images import MAX_PIXELS, decode_image

    with decode_image(
        data, max_pixels=max_pixels or MAX_PIXELS, draft=getattr(preprocess, "size", None)
    ) as im:
        return preprocess(im)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ImageError):
        return exc.reason
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return msg[:300]


# ------------------------------------------------------------------------------------------ the model
@dataclass
class Model:
    """A run's predictor and encoder on one device."""

    predictor: object
    encoder: object
    run_key: str | None
    device: str
    columns: list[str] = field(default_factory=list)
    retrieval: object | None = None  # the run's gallery index: LocDiff-H columns (``--hybrid``)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"unknown --device {device!r}", "use cpu, cuda or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device {device} requested but CUDA is not available", "use --device cpu (or auto)"
        )
    return device


def load_model(
    model: str | None = None,
    storage: str | None = None,
    encoder: str | None = None,
    device: str = "cpu",
    checkpoint_file: str | None = None,
    hybrid: bool = False,
) -> Model:
    """The predictor + encoder of a model reference (run key, alias name, None: ``prod`` else the
    newest run) or of a checkpoint file (then ``encoder`` is required). Checkpoints are read only
    through the safe loaders."""
    from locdiff.encoders import encoder_kwargs, load_encoder
    from locdiff.stages import aliases, runs
    from locdiff_core.checkpoint import CheckpointError, from_bytes
    from locdiff_core.sampling import Predictor

    device = resolve_device(device)
    run_key = None
    run_enc = None
    if checkpoint_file:
        from locdiff.datasets.images import MAX_CHECKPOINT_BYTES, ImageError, read_user_file

        try:
            data = read_user_file(checkpoint_file, MAX_CHECKPOINT_BYTES)
        except ImageError as exc:
            raise UserError(f"checkpoint {checkpoint_file}: {exc.reason}", "pass a model.pt file") from None
        try:
            state = from_bytes(data, source=f"checkpoint file {checkpoint_file}")
        except CheckpointError as exc:
            raise UserError(str(exc), "pass a model.pt written by locdiff, or a run key") from None
        predictor = Predictor.from_checkpoint(state, device=device)
    else:
        store = Store.from_uri(storage)
        run_key = aliases.default_run(store) if model is None else aliases.resolve_run(store, model)
        try:
            run_enc = runs.run_encoder(store, run_key)
        except UserError:
            run_enc = None
        predictor = runs.load_predictor(store, run_key, device=device)
    spec = encoder or run_enc
    if not spec:
        raise UserError(
            "the encoder of this checkpoint is unknown", "pass --encoder NAME (e.g. efficientnet-lite0)"
        )
    kw = encoder_kwargs(spec)
    enc = load_encoder(
        kw["encoder_name"], pretrained=kw.get("pretrained"), checkpoint=kw.get("checkpoint"), device=device
    )
    if enc.dim != predictor.embed_dim:
        raise UserError(
            f"encoder {spec!r} gives {enc.dim}-d features but the model takes {predictor.embed_dim}-d",
            "pass the --encoder the run was trained with",
        )
    m = Model(predictor, enc, run_key, device)
    if hybrid:
        m.retrieval = _retrieval_index(checkpoint_file or run_key, storage)
    m.columns = list(flatten_predictions(predict_rows(m, np.zeros((1, enc.dim), np.float32), 0), 1)[0])
    return m


def predict_rows(model: Model, emb: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    from locdiff.stages.runs import predict_embeddings

    return predict_embeddings(model.predictor, emb, seed=seed, retrieval=model.retrieval)


def _column_name(name: str, j: int | None) -> str:
    base = {"pred_lat": "lat", "pred_lon": "lon"}.get(name, name)
    if j is None:
        return base
    if base.startswith("modes_"):
        return f"mode{j + 1}_{base[len('modes_') :]}"
    return f"{base}_{j + 1}"


def flatten_predictions(out: dict[str, np.ndarray], n: int) -> list[dict]:
    """Per-image rows of ``predict_embeddings``' arrays: 1-d -> one column, 2-d -> one per index."""
    cols: dict[str, np.ndarray] = {}
    for name, arr in out.items():
        arr = np.asarray(arr)
        if arr.ndim == 1:
            cols[_column_name(name, None)] = arr
        elif arr.ndim == 2:
            for j in range(arr.shape[1]):
                cols[_column_name(name, j)] = arr[:, j]
    return [{k: _scalar(v[i]) for k, v in cols.items()} for i in range(n)]


def _scalar(v):
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ------------------------------------------------------------------------------------------ streaming
@dataclass
class Timings:
    """Seconds spent in each part of the pipeline (sampling + decoding = ``predict``)."""

    read_decode: float = 0.0
    encode: float = 0.0
    predict: float = 0.0
    images: int = 0
    errors: int = 0

    def as_dict(self) -> dict:
        total = self.read_decode + self.encode + self.predict
        return {
            "images": self.images,
            "errors": self.errors,
            "read_decode_s": self.read_decode,
            "encode_s": self.encode,
            "predict_s": self.predict,
            "images_per_s": self.images / total if total else None,
        }


def predict_batches(
    items: Iterable[Item],
    model: Model,
    *,
    batch_size: int = 32,
    seed: int = 0,
    workers: int | None = None,
    timings: Timings | None = None,
) -> Iterator[list[dict]]:
    """Rows (``id``, ``path``, ``error`` + the model's columns), one list per batch of ``batch_size``."""
    import torch

    timings = timings or Timings()
    errors = (ImageError, OSError)  # OSError: unreadable files, failed downloads (requests' errors too)
    workers = workers or min(2, os.cpu_count() or 1)  # decoding is <1 % of the time (bench_predict)
    preprocess = model.encoder.preprocess

    def load(item: Item):
        try:
            return image_tensor(read_source(item.path), preprocess)
        except errors as exc:
            return exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        batch: list[Item] = []
        it = iter(items)
        while True:
            batch = [x for _, x in zip(range(batch_size), it, strict=False)]
            if not batch:
                return
            t0 = time.perf_counter()
            loaded = list(pool.map(load, batch))
            t1 = time.perf_counter()
            ok = [i for i, x in enumerate(loaded) if not isinstance(x, BaseException)]
            preds: list[dict] = []
            if ok:
                with torch.inference_mode():
                    emb = model.encoder(torch.stack([loaded[i] for i in ok])).cpu().numpy()
                t2 = time.perf_counter()
                preds = flatten_predictions(predict_rows(model, emb, seed), len(ok))
                t3 = time.perf_counter()
                timings.encode += t2 - t1
                timings.predict += t3 - t2
            timings.read_decode += t1 - t0
            timings.images += len(batch)
            timings.errors += len(batch) - len(ok)
            by_index = dict(zip(ok, preds, strict=True))
            rows = []
            for i, item in enumerate(batch):
                row = {"id": item.id, "path": item.path, "error": None}
                if i in by_index:
                    row.update(by_index[i])
                else:
                    row["error"] = _reason(loaded[i])
                    row.update(dict.fromkeys(model.columns))
                rows.append(row)
            yield rows


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


# ------------------------------------------------------------------------------------------ compatibility
def predict_images(
    paths: list[str],
    checkpoint: str | None = None,
    encoder: str | None = None,
    samples: int | None = None,
    storage: str | None = None,
    seed: int = 0,
    hybrid: bool = False,
) -> list[dict]:
    """Per image: lat, lon, score and the top-k modes (lat, lon, mass) — lists, for the map."""
    is_file = bool(checkpoint) and Path(checkpoint).is_file()
    model = load_model(
        None if is_file else checkpoint, storage, encoder, "cpu", checkpoint if is_file else None, hybrid
    )
    if samples:
        model.predictor.config = model.predictor.config.replace(infer={"num_samples": int(samples)})
    out = []
    for rows in predict_batches([Item(Path(p).name, p) for p in paths], model, seed=seed):
        out.extend(as_result(r) for r in rows)
    return out


def as_result(row: dict) -> dict:
    """A flat row -> {lat, lon, score, modes_lat, modes_lon, modes_mass, error, + other columns}."""
    res = {k: v for k, v in row.items() if not k.startswith("mode")}
    k = 1
    modes: dict[str, list] = {"modes_lat": [], "modes_lon": [], "modes_mass": []}
    while f"mode{k}_lat" in row:
        for part in ("lat", "lon", "mass"):
            v = row.get(f"mode{k}_{part}")
            modes[f"modes_{part}"].append(float("nan") if v is None else v)
        k += 1
    res.update(modes)
    return res


def _retrieval_index(checkpoint: str | None, storage: str | None):
    """The retrieval index (gallery) of a run in the store: its training split, built once and reused."""
    from locdiff.stages.retrieval import build_index, load_index

    if checkpoint and Path(checkpoint).is_file():
        raise UserError(
            "--hybrid needs a run in the store (its training embeddings are the gallery)",
            "pass --checkpoint RUN_KEY instead of a .pt file",
        )
    store = Store.from_uri(storage)
    run_key = checkpoint or store.latest("runs")
    emb_key = store.manifest(run_key).get("embeddings")
    if not emb_key:
        raise UserError(f"{run_key}: the run's manifest does not name its embeddings", "retrain it")
    return load_index(store, build_index(store, emb_key))


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
