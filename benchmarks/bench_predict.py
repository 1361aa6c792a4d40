"""Batch prediction end to end (`locdiff predict`): images/s and the share of each part.

Images: JPEG tiles of the embedded Blue Marble sample (4° around MP16-gallery coordinates, 256 px,
written to a temporary folder), so the run reads files like a user's batch would. Model: ``--model``
(a run key or name in the store), else the ``cpu`` preset (the demo's) with random weights and the
offline EfficientNet-Lite0 encoder (throughput does not depend on training).

Measured in one process, best of ``--repeats``:
- end to end through ``predict_batches`` (read + decode, encoder, diffusion sampling + SHDD decoding),
  with its own per-part timings;
- the split of "predict" into sampling (K samples × S DDIM steps) and decoding (modal search), timed
  separately on the same embeddings;
- reference: the same pipeline one image at a time (batch size 1), and the ratio batched / one-by-one.

Run: ``.venv/bin/python benchmarks/bench_predict.py [--images 256] [--batch 32] [--model prod]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _model(args):
    import torch

    from locdiff.encoders import load_encoder
    from locdiff.inference import Model, flatten_predictions, load_model, predict_rows
    from locdiff_core.checkpoint import build_model
    from locdiff_core.config import get_preset
    from locdiff_core.sampling import Predictor

    if args.model:
        return load_model(args.model, args.storage, None, args.device)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    enc = load_encoder("efficientnet-lite0", device=device)
    cfg = get_preset("cpu", embed_dim=enc.dim)
    torch.manual_seed(0)
    m = Model(Predictor(cfg, build_model(cfg).to(device)), enc, None, device)
    m.columns = list(
        flatten_predictions(predict_rows(m, __import__("numpy").zeros((1, enc.dim), "float32"), 0), 1)[0]
    )
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=256, help="tile size in pixels (JPEG files)")
    ap.add_argument("--model", default=None, help="run key or name (default: cpu preset, random weights)")
    ap.add_argument("--storage", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reference-images", type=int, default=32, help="images for the one-by-one run")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch

    from locdiff.datasets.bluemarble import crop_tiles, encode_jpeg, gallery_coordinates
    from locdiff.inference import Item, Timings, predict_batches
    from locdiff_core.sampling import sample_x0

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", str(min(2, os.cpu_count() or 1)))))
    m = _model(args)
    cfg = m.predictor.config
    lat, lon = gallery_coordinates()
    idx = np.random.default_rng(0).choice(len(lat), args.images, replace=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    t0 = time.perf_counter()
    tiles = crop_tiles(lat[idx], lon[idx], tile_deg=4.0, size_px=args.size)
    items = []
    for i, tile in enumerate(tiles):
        p = tmp / f"tile-{i:05d}.jpg"
        p.write_bytes(encode_jpeg(tile))
        items.append(Item(p.name, str(p)))
    print(
        f"torch {torch.__version__} on {m.device}, {torch.get_num_threads()} threads; model "
        f"{m.run_key or 'cpu preset (random weights)'}: L={cfg.max_degree}, K={cfg.infer.num_samples}, "
        f"S={cfg.infer.num_steps}; encoder {m.encoder.name} ({m.encoder.image_size} px); "
        f"{args.images} JPEG tiles of {args.size} px (made in {time.perf_counter() - t0:.1f} s)"
    )

    def run(items_, batch) -> tuple[float, Timings]:
        tm = Timings()
        t = time.perf_counter()
        n = sum(len(rows) for rows in predict_batches(items_, m, batch_size=batch, timings=tm))
        assert n == len(items_) and tm.errors == 0
        return time.perf_counter() - t, tm

    run(items[: args.batch], args.batch)  # warm-up
    best = min((run(items, args.batch) for _ in range(args.repeats)), key=lambda r: r[0])
    wall, tm = best
    n = args.images
    parts = {"read + decode": tm.read_decode, "encoder": tm.encode, "sampling + decoding": tm.predict}

    # split "sampling + decoding" on the same embeddings
    with torch.inference_mode():
        from locdiff.inference import image_tensor, read_source

        x = torch.stack([image_tensor(read_source(it.path), m.encoder.preprocess) for it in items])
        emb = torch.cat([m.encoder(x[s : s + args.batch]).cpu() for s in range(0, n, args.batch)])
    inf = cfg.infer
    t = time.perf_counter()
    codes = []
    for s in range(0, n, inf.batch_size):
        x0 = sample_x0(
            m.predictor.model,
            m.predictor.schedule,
            emb[s : s + inf.batch_size],
            num_samples=inf.num_samples,
            num_steps=inf.num_steps,
            sampler=inf.sampler,
            generator=torch.Generator().manual_seed(0),
        )
        codes.append(x0.mean(1).cpu() / m.predictor.shdd.scale)
    sampling = time.perf_counter() - t
    t = time.perf_counter()
    m.predictor.shdd.decode(
        torch.cat(codes).double(), rho_km=inf.rho_km, anchors=m.predictor.anchors, top_k=inf.top_k
    )
    decoding = time.perf_counter() - t

    ref_n = min(args.reference_images, n)
    ref_wall, _ = run(items[:ref_n], 1)

    total = sum(parts.values())
    print(f"end to end : {n / wall:7.1f} images/s ({wall / n * 1e3:.1f} ms/image, batch {args.batch})")
    for name, sec in parts.items():
        print(f"  {name:<20} {100 * sec / total:5.1f} %  ({sec / n * 1e3:6.2f} ms/image)")
    sd = sampling + decoding
    print(
        f"  of which sampling {100 * sampling / sd:.0f} % / SHDD decoding {100 * decoding / sd:.0f} % "
        f"(timed apart: {sampling / n * 1e3:.2f} + {decoding / n * 1e3:.2f} ms/image)"
    )
    print(f"reference  : {ref_n / ref_wall:7.1f} images/s one image at a time ({ref_n} images)")
    print(f"ratio batched / one-by-one: {(n / wall) / (ref_n / ref_wall):.2f}x")


if __name__ == "__main__":
    main()
