"""Embedding stage throughput vs the encoder's bare forward pass (same images, batch size, run).

    .venv/bin/python benchmarks/bench_embed.py [--n 2000] [--size 128] [--batch-size 128] [--workers 1]

Measures, on a fresh Blue Marble sample of ``--n`` tiles in a temporary store:

1. dataset build (crop + JPEG + tar shards), tiles/s — the prototype of docs/design.md §6a managed 24 tiles/s
   for crop + embed together;
2. the whole embedding stage (``embed_dataset``: tar streaming, JPEG decode, preprocess in DataLoader
   workers, encoder, float16 Parquet parts, commits), images/s;
3. the encoder's bare forward on the same images already decoded into memory, same batch size, images/s;
4. the reference timm ``tf_efficientnet_lite0`` (unfused, TF padding) forward on the same tensors.

Prints the ratios stage/bare (1.0 = no pipeline overhead) and fused/reference (our encoder's speed-up).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the stage's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from PIL import Image

    from locdiff.datasets import shards as ds
    from locdiff.datasets.bluemarble import build_bluemarble, load_bluemarble
    from locdiff.encoders import build_efficientnet_lite0, efficientnet_weights_path, load_encoder
    from locdiff.stages.embeddings import default_workers, embed_dataset
    from locdiff.storage import Store

    enc = load_encoder(args.encoder, device=args.device, image_size=args.size)
    load_bluemarble()  # decode the source image once, outside the timings
    workers = default_workers() if args.workers is None else args.workers
    print(
        f"n={args.n} tiles of {args.size} px, batch {args.batch_size}, {workers} loader worker(s), "
        f"{torch.get_num_threads()} torch threads, encoder {enc.name} ({enc.weights}) on {args.device}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.from_uri(tmp)
        t = time.perf_counter()
        dkey = build_bluemarble(store, n=args.n, size_px=args.size, shard_size=500)
        t_build = time.perf_counter() - t

        t = time.perf_counter()
        embed_dataset(store, dkey, batch_size=args.batch_size, num_workers=workers, encoder=enc)
        t_stage = time.perf_counter() - t

        rows = ds.read_manifest(store, dkey).to_pylist()
        xs = []
        for r in rows:
            with Image.open(io.BytesIO(ds.read_image(store, dkey, r["shard"], r["offset"], r["size"]))) as im:
                xs.append(enc.preprocess(im))
        x = torch.stack(xs)
        batches = list(x.split(args.batch_size))
        enc(batches[0])  # warm-up
        t = time.perf_counter()
        for b in batches:
            enc(b)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t_bare = time.perf_counter() - t

        t_ref = None
        if args.encoder == "efficientnet-lite0" and args.device == "cpu":
            sd = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
            ref = build_efficientnet_lite0(sd, fast=False)
            n_ref = min(len(batches), 4)
            with torch.inference_mode():
                ref(((batches[0].float() / 255) - 0.5) / 0.5)
                t = time.perf_counter()
                for b in batches[:n_ref]:
                    ref(((b.float() / 255) - 0.5) / 0.5)
                t_ref = (time.perf_counter() - t) * len(batches) / n_ref

    n = len(rows)
    print(f"dataset build (crop+jpeg+shards): {n / t_build:10,.0f} tiles/s")
    print(f"embedding stage (end to end):     {n / t_stage:10,.1f} images/s")
    print(f"bare encoder forward:             {n / t_bare:10,.1f} images/s")
    print(
        f"ratio stage/bare: {t_bare / t_stage:.2f}  (pipeline overhead {100 * (1 - t_bare / t_stage):.0f} %)"
    )
    if t_ref is not None:
        print(f"reference tf_efficientnet_lite0:  {n / t_ref:10,.1f} images/s")
        print(f"ratio fused/reference forward: {t_ref / t_bare:.2f}x")
    print(f"build + embed together: {n / (t_build + t_stage):,.1f} tiles/s (prototype: 24 tiles/s)")


if __name__ == "__main__":
    main()
