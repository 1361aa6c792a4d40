"""Inference: load a trained run and predict where images (or their embeddings) were taken.

What ``locdiff predict``, ``locdiff serve`` and evaluation share: a run's predictor with the calibration
it fitted on ``val`` (:func:`load_predictor`), the one path from embeddings to predictions
(:func:`predict_embeddings`: point estimate, top-k modes, credible radii, LocDiff-H), and the path from
image bytes to rows (:func:`load_model`, :func:`predict_batches`). Images are decoded a batch at a time
on a few threads, encoded with the run's encoder and predicted; memory is bounded by one batch of
images. An image that cannot be read (missing, not an image, too many pixels, a dead URL) becomes a row
whose ``error`` says why; it never stops the batch.

Rows: ``id``, ``path``, ``error`` and then, flattened from what ``predict_embeddings`` returns,
``lat``/``lon`` (its ``pred_lat``/``pred_lon``), ``score``, ``mode{j}_lat``/``_lon``/``_mass`` for the
top-k modes, and every further column as it is (``NAME`` for per-image values, ``NAME_{j}`` for
per-image vectors): the credible radii, and LocDiff-H with ``--hybrid``.

Checkpoints are read only through ``locdiff_core.checkpoint.from_bytes`` (``weights_only`` loading): a
file in the store cannot run code, whoever put it there.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from locdiff.datasets.images import ImageError
from locdiff.errors import UserError
from locdiff.storage import Store

MODEL_FILE = "model.pt"  # a committed run's final checkpoint
MAX_DOWNLOAD_BYTES = 64 << 20


# ------------------------------------------------------------------------------------------ a run
def load_checkpoint(store: Store, run_key: str, relpath: str = MODEL_FILE) -> dict:
    """A checkpoint of a run, loaded safely (``weights_only``); a bad file is a one-line error."""
    from locdiff_core.checkpoint import CheckpointError, from_bytes

    with store.open(run_key, relpath) as f:
        data = f.read()
    try:
        return from_bytes(data, source=f"artifact {run_key}, file {relpath}")
    except CheckpointError as exc:
        raise UserError(str(exc), "delete the artifact and retrain, or restore it from a backup") from None


def load_predictor(store: Store, run_key: str, device: str | None = None, calibrated: bool = True):
    """A ``Predictor`` from the run's EMA weights, decoding on the run's own anchor set.

    ``calibrated``: the credible radii use the scales the run fitted on its ``val`` split when it was
    trained (manifest ``radius_calibration``), unless the run's config sets its own
    ``infer.radius50_scale``/``radius90_scale`` (anything but 1); likewise the mode masses go through
    the map fitted there (``mass_calibration``) unless the config sets one. ``predict``, ``serve`` and
    evaluation all load runs through here."""
    man = store.manifest(run_key)
    anchors = (man.get("anchors") or {}).get("uniform")
    predictor = checkpoint_predictor(store, load_checkpoint(store, run_key), anchors, device)
    calib = man.get("radius_calibration") or {}
    inf = predictor.config.infer
    fitted: dict = {}
    if calibrated and calib and (inf.radius50_scale, inf.radius90_scale) == (1.0, 1.0):
        fitted.update({k: float(calib[k]) for k in ("radius50_scale", "radius90_scale")})
    if calibrated and calib.get("mass_calibration") and not inf.mass_calibration:
        fitted["mass_calibration"] = calib["mass_calibration"]
    if fitted:
        predictor.config = predictor.config.replace(infer=fitted)
    return predictor


def checkpoint_predictor(store: Store, ckpt: dict, anchors_key: str | None, device: str | None = None):
    """A ``Predictor`` of a checkpoint on ``device`` (None: CUDA when available), decoding on the anchor
    set ``anchors_key`` when given."""
    from locdiff.stages.anchors import anchor_grid
    from locdiff_core.sampling import Predictor

    predictor = Predictor.from_checkpoint(ckpt, device=device)
    if anchors_key:
        predictor.anchors = anchor_grid(store, anchors_key, predictor.config.max_degree)
    return predictor


def predict_embeddings(
    predictor, emb: np.ndarray, seed: int = 0, progress=None, retrieval=None, generator=None
) -> dict[str, np.ndarray]:
    """Predict image embeddings ``[N, E]`` in chunks of ``infer.batch_size``: per image the point
    estimate (``pred_lat``, ``pred_lon``, ``score``), the top-k modes (``modes_lat``/``_lon``/``_mass``
    ``[N, k]``) of the predicted distribution and its 50 %/90 % credible radii (``radius50_km``,
    ``radius90_km``: quantiles of the K samples' distances to the point estimate, times
    ``infer.radius50_scale``/``radius90_scale``, the 90 % one at least the 50 % one). With a
    ``retrieval`` index (``locdiff.stages.retrieval.RetrievalIndex``) also LocDiff-H (``hybrid_lat``,
    ``hybrid_lon``, ``hybrid_from_gallery``) and the nearest gallery image (``nn_lat``, ``nn_lon``,
    ``nn_sim``). Evaluation, ``locdiff predict`` and serving all use this. ``generator`` (instead of
    ``seed``) carries the random state across calls, so consecutive blocks of whole batches draw what
    one call would."""
    import torch

    inf = predictor.config.infer
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    chunk = max(1, inf.batch_size)
    outs = []
    emb_t = torch.from_numpy(np.ascontiguousarray(emb))
    for i in range(0, len(emb), chunk):
        outs.append(predictor.predict(emb_t[i : i + chunk], generator=gen, with_samples=True))
        if progress:
            progress(min(i + chunk, len(emb)), len(emb))
    cat = lambda name: torch.cat([getattr(o.decoded, name).detach().cpu() for o in outs]).numpy()  # noqa: E731
    radii = torch.cat([o.radii_km((0.5, 0.9), (inf.radius50_scale, inf.radius90_scale)) for o in outs])
    radii[:, 1] = torch.maximum(radii[:, 1], radii[:, 0])  # scaled apart, the 90 % one still holds the 50 %
    out = {
        "pred_lat": cat("lat_deg"),
        "pred_lon": cat("lon_deg"),
        "score": cat("score"),
        "modes_lat": cat("modes_lat_deg"),
        "modes_lon": cat("modes_lon_deg"),
        "modes_mass": cat("modes_mass"),  # the decoder's masses, through the run's val fit if it has one
        "radius50_km": radii[:, 0].numpy(),
        "radius90_km": radii[:, 1].numpy(),
    }
    if inf.mass_calibration:
        from locdiff_core.metrics import apply_mass_calibration

        out["modes_mass"] = apply_mass_calibration(out["modes_mass"], inf.mass_calibration)
    if retrieval is not None:
        from locdiff_core.hybrid import hybrid_from_neighbours

        sim, idx = retrieval.search(emb, inf.hybrid_candidates)  # [N, C], best first
        nb_lat, nb_lon = retrieval.lat_deg[idx], retrieval.lon_deg[idx]  # [N, C]
        m = inf.hybrid_modes
        mass = torch.from_numpy(np.asarray(out["modes_mass"][:, :m], dtype=np.float64))
        h = hybrid_from_neighbours(
            torch.from_numpy(out["pred_lat"]).double(),
            torch.from_numpy(out["pred_lon"]).double(),
            torch.from_numpy(out["modes_lat"][:, :m]).double(),
            torch.from_numpy(out["modes_lon"][:, :m]).double(),
            sim,
            nb_lat,
            nb_lon,
            radius_km=inf.hybrid_radius_km,
            rule=inf.hybrid_rule,
            modes_mass=mass,
            min_mass=inf.hybrid_min_mass,
        )
        if inf.hybrid_scorer == "geoclip":
            h = _geoclip_hybrid(predictor, emb_t, out, m, inf.hybrid_radius_km, inf.hybrid_min_mass)
        out.update(
            hybrid_lat=h.lat_deg.numpy(),
            hybrid_lon=h.lon_deg.numpy(),
            hybrid_from_gallery=h.from_gallery.numpy(),
            nn_lat=nb_lat[:, 0].numpy(),
            nn_lon=nb_lon[:, 0].numpy(),
            nn_sim=sim[:, 0].double().numpy(),
        )
    return out


def _geoclip_hybrid(predictor, emb_t, out: dict, n_modes: int, radius_km: float, min_mass: float):
    """LocDiff-H scored by GeoCLIP (its image head + location encoder over its 100 K gallery)."""
    import torch

    from locdiff.geoclip_scorer import GEOCLIP_IMAGE_DIM, GeoCLIPScorer
    from locdiff_core.hybrid import hybrid_modes_with_scorer

    if predictor.embed_dim != GEOCLIP_IMAGE_DIM:
        raise UserError(
            f"infer.hybrid_scorer='geoclip' needs CLIP ViT-L/14 features (768-d); this run takes "
            f"{predictor.embed_dim}-d embeddings",
            "use infer.hybrid_scorer='similarity' (the run's own training gallery)",
        )
    return hybrid_modes_with_scorer(
        emb_t.float(),
        torch.from_numpy(out["pred_lat"]).double(),
        torch.from_numpy(out["pred_lon"]).double(),
        torch.from_numpy(out["modes_lat"][:, :n_modes]).double(),
        torch.from_numpy(out["modes_lon"][:, :n_modes]).double(),
        GeoCLIPScorer(),
        radius_km=radius_km,
        modes_mass=torch.from_numpy(np.asarray(out["modes_mass"][:, :n_modes], dtype=np.float64)),
        min_mass=min_mass,
    )


def run_encoder(store: Store, run_key: str) -> str:
    """The encoder spec of the embeddings the run was trained on."""
    from locdiff.encoders import encoder_spec

    emb_key = store.manifest(run_key).get("embeddings")
    if not emb_key:
        raise UserError(f"{run_key}: the run's manifest does not name its embeddings", "retrain it")
    enc = encoder_spec(store.manifest(emb_key))
    if not enc:
        raise UserError(f"{emb_key}: the embeddings manifest does not name its encoder", "re-embed")
    return enc


# ------------------------------------------------------------------------------------------ images
@dataclass(frozen=True)
class Item:
    id: str
    path: str


def is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def read_source(path: str, max_bytes: int = MAX_DOWNLOAD_BYTES, timeout: float = 30.0) -> bytes:
    """The bytes of a local file or an http(s) URL (size-capped; a download gets ``timeout`` per read
    and 4 x ``timeout`` in all, so a server that drips bytes cannot hold the batch)."""
    if not path:
        raise ImageError("empty path")
    if is_url(path):
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
    from locdiff.stages import aliases
    from locdiff_core.checkpoint import CheckpointError, from_bytes
    from locdiff_core.device import resolve_device
    from locdiff_core.sampling import Predictor

    device = str(resolve_device(device, "--device"))
    run_key = None
    run_enc = None
    if checkpoint_file:
        from locdiff.datasets.images import MAX_CHECKPOINT_BYTES, read_user_file

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
            run_enc = run_encoder(store, run_key)
        except UserError:
            run_enc = None
        predictor = load_predictor(store, run_key, device=device)
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
