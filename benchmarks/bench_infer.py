"""Inference throughput: LocDiff's K × S sampling + decoding vs a GeoCLIP-style gallery retrieval.

In one process, for a preset (default ``cpu``: L=16, 1280-d; ``default``: L=32, 768-d):
- LocDiff: images/s of ``Predictor.predict`` (K samples × S DDIM steps, batched over images × samples,
  coefficient averaging, ``SHDD.decode``), with the sampling and decoding parts timed separately;
- reference: GeoCLIP-style retrieval — a 768 → 768 → 512 image head, then cosine top-1 against a
  gallery of 100 K precomputed 512-d location features (random here: speed does not depend on
  the values) — images/s, and the ratio LocDiff / retrieval.
Weights are random (throughput does not depend on training).

Run: ``.venv/bin/python benchmarks/bench_infer.py [--preset cpu] [--K 8] [--steps 25] [--images 256]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="images per chunk (each runs images × K)")
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings (robust to a shared machine)")
    args = ap.parse_args()

    import torch

    from locdiff_core.checkpoint import build_model
    from locdiff_core.config import get_preset
    from locdiff_core.sampling import Predictor, sample_x0

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    cfg = get_preset(
        args.preset, infer={"num_samples": args.K, "num_steps": args.steps, "batch_size": args.batch}
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = Predictor(cfg, build_model(cfg).to(device))
    emb = torch.randn(args.images, cfg.embed_dim)
    print(
        f"torch {torch.__version__} on {device}; preset {args.preset}: L={cfg.max_degree} (D={cfg.dim}), "
        f"E={cfg.embed_dim}, widths={list(cfg.model.widths)}; K={args.K}, S={args.steps} DDIM, "
        f"{args.images} images in chunks of {args.batch}"
    )

    predictor.predict(emb[:8], generator=torch.Generator().manual_seed(0))  # warm-up

    def best_of(fn) -> float:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)

    # LocDiff end to end
    dec = predictor.predict(emb, generator=torch.Generator().manual_seed(0))
    assert dec.lat_deg.shape == (args.images,)
    total = best_of(lambda: predictor.predict(emb, generator=torch.Generator().manual_seed(0)))

    # sampling alone, then decoding alone
    codes: list = []

    def sample_all() -> None:
        codes.clear()
        for s in range(0, args.images, args.batch):
            x0 = sample_x0(
                predictor.model,
                predictor.schedule,
                emb[s : s + args.batch],
                num_samples=args.K,
                num_steps=args.steps,
                generator=torch.Generator().manual_seed(0),
            )
            codes.append(x0.mean(1).cpu() / predictor.shdd.scale)

    sampling = best_of(sample_all)
    coeffs = torch.cat(codes).double()
    decoding = best_of(lambda: predictor.shdd.decode(coeffs, rho_km=cfg.infer.rho_km, top_k=cfg.infer.top_k))

    # GeoCLIP-style retrieval over a gallery of the same size
    head = torch.nn.Sequential(torch.nn.Linear(768, 768), torch.nn.ReLU(), torch.nn.Linear(768, 512))
    head = head.to(device)
    gallery = torch.nn.functional.normalize(torch.randn(args.gallery, 512, device=device), dim=1)
    q = torch.randn(args.images, 768, device=device)

    def retrieve() -> None:
        with torch.inference_mode():
            for s in range(0, args.images, args.batch):
                f = torch.nn.functional.normalize(head(q[s : s + args.batch]), dim=1)
                (f @ gallery.T).argmax(dim=1)

    retrieve()
    retrieval = best_of(retrieve)

    n = args.images
    print(f"LocDiff  : {n / total:8.1f} images/s end to end ({total / n * 1e3:.1f} ms/image)")
    print(f"           sampling {n / sampling:8.1f} images/s; decoding {n / decoding:8.1f} images/s")
    print(
        f"           = {n * args.K / sampling:.0f} samples/s, "
        f"{n * args.K * args.steps / sampling:.0f} network rows/s"
    )
    print(f"Retrieval: {n / retrieval:8.1f} images/s (cosine top-1 over {args.gallery:,} gallery features)")
    print(
        f"ratio LocDiff / retrieval throughput: {retrieval / total:.3f}  "
        f"(retrieval is {total / retrieval:.1f}x faster)"
    )


if __name__ == "__main__":
    main()
