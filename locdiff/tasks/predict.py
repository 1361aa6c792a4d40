"""Predicting image files with a trained run: encoder from the run's embeddings, Predictor from its
checkpoint. Used by `locdiff predict`."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from locdiff.errors import UserError
from locdiff.tasks.common import open_store


def split_encoder(spec: str) -> tuple[str, str | None]:
    """'ViT-L-14/openai' -> ('ViT-L-14', 'openai'); 'efficientnet-lite0' -> ('efficientnet-lite0', None)."""
    name, _, pretrained = spec.partition("/")
    return name, (pretrained or None)


def encoder_spec(manifest: dict) -> str | None:
    """Encoder spec ('NAME', 'NAME/PRETRAINED' or 'NAME@CHECKPOINT') of an embeddings manifest."""
    enc = manifest.get("encoder") or (manifest.get("config") or {}).get("encoder")
    if isinstance(enc, str) or enc is None:
        return enc
    name, weights = enc.get("name"), str(enc.get("weights") or "")
    if weights.startswith("open_clip:"):
        return f"{name}/{weights.split(':', 1)[1]}"
    if weights.startswith("file:"):
        return f"{name}@{weights.split(':', 1)[1]}"
    return name


def encoder_kwargs(spec: str) -> dict:
    """'ViT-L-14/openai' -> encoder_name + pretrained; 'NAME@PATH' -> encoder_name + checkpoint."""
    if "@" in spec:
        name, ckpt = spec.split("@", 1)
        return {"encoder_name": name, "checkpoint": ckpt}
    name, pretrained = split_encoder(spec)
    return {"encoder_name": name, "pretrained": pretrained}


def _checkpoint_and_encoder(checkpoint: str | None, storage: str | None) -> tuple[dict, str | None]:
    import torch

    if checkpoint and Path(checkpoint).is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        return state, None
    store = open_store(storage)
    run_key = checkpoint or store.latest("runs")
    if run_key is None:
        raise UserError(
            "no trained run in the store", "run `locdiff demo` first, or pass --checkpoint FILE.pt"
        )
    try:
        man = store.manifest(run_key)
    except ValueError:
        raise UserError(
            f"--checkpoint {checkpoint!r} is neither a file nor a run key", "e.g. runs/NAME/HASH"
        ) from None
    with store.open(run_key, "model.pt") as f:
        state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)
    encoder = None
    emb_key = man.get("embeddings")
    if emb_key and store.exists(emb_key):
        encoder = encoder_spec(store.manifest(emb_key))
    return state, encoder


def predict_images(
    paths: list[str],
    checkpoint: str | None = None,
    encoder: str | None = None,
    samples: int | None = None,
    storage: str | None = None,
    seed: int = 0,
) -> list[dict]:
    """Per image: lat, lon, score and the top-k modes (lat, lon, mass) of the predicted distribution."""
    import torch

    from locdiff.datasets.images import ImageError, decode_image
    from locdiff.encoders import load_encoder
    from locdiff_core.sampling import Predictor

    state, run_encoder = _checkpoint_and_encoder(checkpoint, storage)
    enc_spec = encoder or run_encoder
    if not enc_spec:
        raise UserError(
            "the encoder of this checkpoint is unknown", "pass --encoder NAME (e.g. efficientnet-lite0)"
        )
    kw = encoder_kwargs(enc_spec)
    enc = load_encoder(kw["encoder_name"], pretrained=kw.get("pretrained"), checkpoint=kw.get("checkpoint"))
    predictor = Predictor.from_checkpoint(state, device="cpu")
    if enc.dim != predictor.embed_dim:
        raise UserError(
            f"encoder {enc_spec!r} gives {enc.dim}-d features but the model takes {predictor.embed_dim}-d",
            "pass the --encoder the run was trained with",
        )
    batch = []
    for p in paths:
        try:
            with decode_image(p) as im:
                batch.append(enc.preprocess(im))
        except ImageError as exc:
            raise UserError(f"cannot read image {p}: {exc.reason}", "pass JPEG or PNG files") from None
    emb = enc(torch.stack(batch))  # [B, dim]
    dec = predictor.predict(emb, K=samples, generator=torch.Generator().manual_seed(seed))
    out = []
    for i in range(len(paths)):
        out.append(
            {
                "lat": float(dec.lat_deg[i]),
                "lon": float(dec.lon_deg[i]),
                "score": float(dec.score[i]),
                "modes_lat": [float(v) for v in dec.modes_lat_deg[i]],
                "modes_lon": [float(v) for v in dec.modes_lon_deg[i]],
                "modes_mass": [float(v) for v in dec.modes_mass[i]],
            }
        )
    return out


def predictions_map_png(results: list[dict], labels: list[str]) -> bytes:
    """Blue Marble map of each image's prediction and its modes (marker size ~ mass)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from locdiff.report import _png, blue_marble

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
    png = _png(fig)
    plt.close(fig)
    return png
