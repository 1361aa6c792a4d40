"""Predicting image files with a trained run: encoder from the run's embeddings, Predictor from its
checkpoint. Used by `locdiff predict`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from locdiff.errors import UserError
from locdiff.storage import Store


def _predictor_and_encoder(checkpoint: str | None, storage: str | None):
    """(Predictor, encoder spec or None) of a checkpoint file or a run in the store (default: newest)."""
    from locdiff.stages import runs
    from locdiff_core.checkpoint import CheckpointError, from_bytes
    from locdiff_core.sampling import Predictor

    if checkpoint and Path(checkpoint).is_file():
        try:
            state = from_bytes(Path(checkpoint).read_bytes(), source=f"checkpoint file {checkpoint}")
        except CheckpointError as exc:
            raise UserError(str(exc), "pass a model.pt written by locdiff, or a run key") from None
        return Predictor.from_checkpoint(state, device="cpu"), None
    store = Store.from_uri(storage)
    run_key = checkpoint or store.latest("runs")
    if run_key is None:
        raise UserError(
            "no trained run in the store", "run `locdiff demo` first, or pass --checkpoint FILE.pt"
        )
    try:
        store.manifest(run_key)
    except ValueError:
        raise UserError(
            f"--checkpoint {checkpoint!r} is neither a file nor a run key", "e.g. runs/NAME/HASH"
        ) from None
    try:
        encoder = runs.run_encoder(store, run_key)
    except UserError:
        encoder = None
    return runs.load_predictor(store, run_key, device="cpu"), encoder


def predict_images(
    paths: list[str],
    checkpoint: str | None = None,
    encoder: str | None = None,
    samples: int | None = None,
    storage: str | None = None,
    seed: int = 0,
    hybrid: bool = False,
) -> list[dict]:
    """Per image: lat, lon, score, the top-k modes (lat, lon, mass) of the predicted distribution and its
    50 %/90 % credible radii (km); with ``hybrid`` also LocDiff-H's answer (``hybrid_lat``/``_lon``)."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from locdiff.encoders import encoder_kwargs, load_encoder

    predictor, run_encoder = _predictor_and_encoder(checkpoint, storage)
    enc_spec = encoder or run_encoder
    if not enc_spec:
        raise UserError(
            "the encoder of this checkpoint is unknown", "pass --encoder NAME (e.g. efficientnet-lite0)"
        )
    kw = encoder_kwargs(enc_spec)
    enc = load_encoder(kw["encoder_name"], pretrained=kw.get("pretrained"), checkpoint=kw.get("checkpoint"))
    if enc.dim != predictor.embed_dim:
        raise UserError(
            f"encoder {enc_spec!r} gives {enc.dim}-d features but the model takes {predictor.embed_dim}-d",
            "pass the --encoder the run was trained with",
        )
    batch = []
    for p in paths:
        try:
            with Image.open(p) as im:
                batch.append(enc.preprocess(im))
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"cannot read image {p}: {exc}", "pass JPEG or PNG files") from None
    emb = enc(torch.stack(batch))  # [B, dim]
    if samples:
        predictor.config = predictor.config.replace(infer={"num_samples": int(samples)})
    index = _retrieval_index(checkpoint, storage) if hybrid else None
    from locdiff.stages.runs import predict_embeddings

    pred = predict_embeddings(predictor, emb.detach().float().numpy(), seed, retrieval=index)
    out = []
    for i in range(len(paths)):
        r = {
            "lat": float(pred["pred_lat"][i]),
            "lon": float(pred["pred_lon"][i]),
            "score": float(pred["score"][i]),
            "modes_lat": [float(v) for v in pred["modes_lat"][i]],
            "modes_lon": [float(v) for v in pred["modes_lon"][i]],
            "modes_mass": [float(v) for v in pred["modes_mass"][i]],
            "radius50_km": float(pred["radius50_km"][i]),
            "radius90_km": float(pred["radius90_km"][i]),
        }
        if index is not None:
            r.update(hybrid_lat=float(pred["hybrid_lat"][i]), hybrid_lon=float(pred["hybrid_lon"][i]))
        out.append(r)
    return out


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
