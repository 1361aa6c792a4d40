"""Exact inner-product search for the retrieval index: chunked torch matmul vs faiss ``IndexFlatIP``.

Usage (from the project root)::

    .venv/bin/python benchmarks/bench_retrieval.py [--gallery 200000] [--dim 768] [--queries 1000] [--k 256]

Both search the same L2-normalised random gallery (float32 for faiss; torch also in float16, the
index's stored dtype) for the same queries. Before timing, their top-k indices are checked to agree
(ties aside) and their similarities to match. Prints each one's queries/s, its share of the machine's
matmul peak (the fp32 GEMM of the same shape, timed in the same run) and the ratio torch / faiss.
The figure for MP16 (4.7 M × 768) is extrapolated linearly from the gallery size measured (search is
one pass over the gallery per query block).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from locdiff_core.retrieval import search_inner_product  # noqa: E402


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gallery", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import faiss
    except ImportError:
        print("faiss is not installed (pip install faiss-cpu): only torch is measured")
        faiss = None
    if faiss is not None:
        faiss.omp_set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(args.gallery, args.dim, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=g), dim=1)
    # make the neighbours meaningful: queries are noisy copies of gallery rows
    pick = torch.randint(0, args.gallery, (args.queries,), generator=g)
    queries = torch.nn.functional.normalize(gallery[pick] + 0.5 * queries, dim=1)
    gallery16 = gallery.half()
    print(
        f"gallery {args.gallery:,} x {args.dim}, {args.queries:,} queries, k = {args.k}, "
        f"{args.threads} threads"
    )

    # agreement first (on the same float32 data)
    s_t, i_t = search_inner_product(queries, gallery, args.k)
    if faiss is not None:
        index = faiss.IndexFlatIP(args.dim)
        index.add(gallery.numpy())
        s_f, i_f = index.search(queries.numpy(), args.k)
        assert np.allclose(s_t.numpy(), s_f, atol=1e-4), "torch and faiss similarities differ"
        same = float((i_t.numpy() == i_f).mean())
        assert same > 0.99, f"torch and faiss disagree on {100 * (1 - same):.2f} % of neighbours"
        assert (i_t[:, 0].numpy() == i_f[:, 0]).all(), "torch and faiss disagree on the nearest neighbour"
        print(f"agreement: top-{args.k} identical on {100 * same:.2f} % of slots, 1-NN on all queries")

    flops = 2.0 * args.gallery * args.dim * args.queries
    gemm = best_of(lambda: queries @ gallery.T, args.repeat)
    print(f"reference fp32 GEMM of the same shape: {gemm:.3f} s ({flops / gemm / 1e9:.0f} GFLOP/s)")
    t32 = best_of(lambda: search_inner_product(queries, gallery, args.k), args.repeat)
    t16 = best_of(lambda: search_inner_product(queries, gallery16, args.k), args.repeat)
    scale = 4.7e6 / args.gallery
    for name, t in (("torch fp32", t32), ("torch fp16 store", t16)):
        print(
            f"{name:18s}: {t:.3f} s = {args.queries / t:,.0f} queries/s, {gemm / t:.2f} of GEMM peak; "
            f"MP16 (4.7 M) ~ {t * scale / args.queries * 1e3:.1f} ms/query"
        )
    if faiss is not None:
        tf = best_of(lambda: index.search(queries.numpy(), args.k), args.repeat)
        print(
            f"{'faiss IndexFlatIP':18s}: {tf:.3f} s = {args.queries / tf:,.0f} queries/s, "
            f"{gemm / tf:.2f} of GEMM peak; MP16 (4.7 M) ~ {tf * scale / args.queries * 1e3:.1f} ms/query"
        )
        print(
            f"ratio torch fp32 / faiss time: {t32 / tf:.2f} (fp16 store: {t16 / tf:.2f}); < 1 = torch faster"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
