"""Exact inner-product search over a gallery of image embeddings (retrieval 1-NN and LocDiff-H).

The gallery is stored L2-normalised (so inner product = cosine similarity), in float16 or float32. A
search runs one float32 matmul per (query block, gallery block) and keeps a running top-k, so memory is
bounded by ``query_block × gallery_block`` whatever the gallery's size (4.7 M × 768 for MP16 with CLIP
ViT-L/14 is 7.2 GB in float16). ``benchmarks/bench_retrieval.py`` measures it against faiss'
``IndexFlatIP`` (the same exact search) on the same data.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def normalize_rows(x) -> Tensor:
    """Rows scaled to unit L2 norm (float32); an all-zero row stays zero."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).float()
    if t.ndim != 2:
        raise ValueError(f"embeddings must have shape [N, E], got {tuple(t.shape)}")
    return torch.nn.functional.normalize(t, dim=1)


@torch.inference_mode()
def search_inner_product(
    queries: Tensor,
    gallery: Tensor,
    k: int,
    *,
    query_block: int = 1024,
    gallery_block: int = 262_144,
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner products of each query against the gallery.

    Args:
        queries: ``[B, E]`` (any float dtype; compared in float32).
        gallery: ``[G, E]`` (float16 or float32; converted block by block).
    Returns:
        ``(similarity [B, k] float32, index [B, k] int64)``, best first; ``k`` is capped at ``G``.
    """
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"queries [B, E] and gallery [G, E] must share E, got {tuple(queries.shape)} and "
            f"{tuple(gallery.shape)}"
        )
    if gallery.shape[0] == 0:
        raise ValueError("the gallery is empty")
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    k = min(int(k), gallery.shape[0])
    q_all = queries.float()
    sims, idxs = [], []
    for qs in range(0, q_all.shape[0], query_block):
        q = q_all[qs : qs + query_block]  # [b, E]
        best_s = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for gs in range(0, gallery.shape[0], gallery_block):
            g = gallery[gs : gs + gallery_block].float()  # [g, E]
            s = q @ g.T  # [b, g]
            kk = min(k, s.shape[1])
            top_s, top_i = s.topk(kk, dim=1)  # [b, kk]
            cat_s = torch.cat([best_s, top_s], dim=1)
            cat_i = torch.cat([best_i, top_i + gs], dim=1)
            keep = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
            best_s, best_i = keep.values, cat_i.gather(1, keep.indices)
        sims.append(best_s)
        idxs.append(best_i)
    return torch.cat(sims), torch.cat(idxs)
