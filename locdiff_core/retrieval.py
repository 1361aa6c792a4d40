"""Exact inner-product search over a gallery of image embeddings (retrieval 1-NN and LocDiff-H).

The gallery is stored L2-normalised (so inner product = cosine similarity), in float16 or float32. A
search runs one float32 matmul per (query block, gallery block) and keeps a running top-k, so memory is
bounded by ``query_block × gallery_block`` whatever the gallery's size (4.7 M × 768 for MP16 with CLIP
ViT-L/14 is 7.2 GB in float16). ``benchmarks/bench_retrieval.py`` measures it against faiss'
``IndexFlatIP`` (the same exact search) on the same data.
"""

from __future__ import annotations

from collections.abc import Callable

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
    gallery,
    k: int,
    *,
    query_block: int = 1024,
    gallery_block: int = 65_536,
    after_block: Callable[[], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner products of each query against the gallery.

    The gallery is read once, a block of rows at a time (outer loop), and every query block is scored
    against it (inner loop) with a running top-k per query: memory is one gallery block in float32 plus
    ``query_block x gallery_block`` scores, whatever the gallery's size, so a memory-mapped gallery
    (a ``numpy`` array, e.g. the retrieval index's ``gallery.npy``) is never held whole.

    Args:
        queries: ``[B, E]`` (any float dtype; compared in float32, on the queries' device).
        gallery: ``[G, E]`` tensor or numpy array (float16 or float32; converted block by block).
        after_block: called after each gallery block (the index drops the block's mapped pages).
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
    dev, B = q_all.device, q_all.shape[0]
    best_s = torch.full((B, 0), float("-inf"), device=dev)
    best_i = torch.zeros((B, 0), dtype=torch.long, device=dev)
    for gs in range(0, gallery.shape[0], gallery_block):
        block = gallery[gs : gs + gallery_block]
        if isinstance(block, Tensor):
            g = block.to(device=dev, dtype=torch.float32)
        else:
            g = torch.from_numpy(np.asarray(block, dtype=np.float32)).to(dev)  # [g, E]
        new_s, new_i = [], []
        for qs in range(0, B, query_block):
            s = q_all[qs : qs + query_block] @ g.T  # [b, g]
            top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
            cat_s = torch.cat([best_s[qs : qs + query_block], top_s], dim=1)
            cat_i = torch.cat([best_i[qs : qs + query_block], top_i + gs], dim=1)
            keep = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
            new_s.append(keep.values)
            new_i.append(cat_i.gather(1, keep.indices))
        best_s, best_i = torch.cat(new_s), torch.cat(new_i)
        del g
        if after_block is not None:
            after_block()
    return best_s, best_i
