"""LocDiff-H: refine LocDiff's prediction with a retrieval gallery (DESIGN §3).

For each image, the gallery candidates within ``radius_km`` (default 200) of LocDiff's prediction are
scored by a pluggable retrieval scorer; the best-scoring candidate is returned, or LocDiff's own
prediction when no candidate lies within the radius.

A scorer is anything with ``gallery_lat_deg [G]``, ``gallery_lon_deg [G]`` and
``score(emb [B, E], gallery_idx [M]) -> [B, M]`` (higher is better), e.g. GeoCLIP's image–location
similarity (``locdiff.geoclip_scorer.GeoCLIPScorer``) or a cosine over gallery image embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .sphere import EARTH_RADIUS_KM, latlon_to_xyz


@runtime_checkable
class GalleryScorer(Protocol):
    gallery_lat_deg: Tensor
    gallery_lon_deg: Tensor

    def score(self, emb: Tensor, gallery_idx: Tensor) -> Tensor:  # [B, E], [M] -> [B, M]
        ...


@dataclass
class HybridResult:
    lat_deg: Tensor  # [B]
    lon_deg: Tensor  # [B]
    from_gallery: Tensor  # [B] bool: True where a gallery candidate replaced LocDiff's prediction
    gallery_idx: Tensor  # [B] long, -1 where none was within the radius
    n_candidates: Tensor  # [B] long


def candidates_within(
    pred_lat_deg: Tensor,
    pred_lon_deg: Tensor,
    gallery_lat_deg: Tensor,
    gallery_lon_deg: Tensor,
    radius_km: float,
    chunk: int = 256,
) -> Tensor:
    """Mask [B, G]: gallery points within ``radius_km`` (haversine) of each prediction."""
    # d <= R  <=>  <p, g> >= cos(R / Earth radius) for unit vectors: one float64 matmul per chunk
    g = latlon_to_xyz(gallery_lat_deg.double(), gallery_lon_deg.double())  # [G, 3]
    p = latlon_to_xyz(pred_lat_deg.double(), pred_lon_deg.double())  # [B, 3]
    cos_r = math.cos(min(radius_km / EARTH_RADIUS_KM, math.pi))
    out = [(p[s : s + chunk] @ g.T) >= cos_r for s in range(0, p.shape[0], chunk)]  # [b, G] each
    return torch.cat(out) if out else torch.zeros(0, g.shape[0], dtype=torch.bool)


@torch.inference_mode()
def hybrid_predict(
    emb: Tensor,
    pred_lat_deg: Tensor,
    pred_lon_deg: Tensor,
    scorer: GalleryScorer,
    radius_km: float = 200.0,
) -> HybridResult:
    """LocDiff-H: best-scoring gallery point within ``radius_km`` of each prediction, else the prediction."""
    if radius_km <= 0:
        raise ValueError(f"radius_km={radius_km} must be > 0")
    b = emb.shape[0]
    if pred_lat_deg.shape != (b,) or pred_lon_deg.shape != (b,):
        raise ValueError(
            f"predictions must have shape [{b}] to match the embeddings, got "
            f"{tuple(pred_lat_deg.shape)} and {tuple(pred_lon_deg.shape)}"
        )
    g_lat, g_lon = scorer.gallery_lat_deg, scorer.gallery_lon_deg
    mask = candidates_within(pred_lat_deg, pred_lon_deg, g_lat, g_lon, radius_km)  # [B, G]
    n_cand = mask.sum(dim=1)  # [B]
    union = mask.any(dim=0).nonzero().squeeze(1)  # [M] candidates of any image in the batch
    best = torch.full((b,), -1, dtype=torch.long)
    if union.numel():
        scores = scorer.score(emb, union).float().cpu()  # [B, M]
        scores = scores.masked_fill(~mask[:, union], float("-inf"))  # [B, M]
        arg = scores.argmax(dim=1)  # [B]
        best = torch.where(n_cand > 0, union[arg], best)
    use = best >= 0
    lat = torch.where(use, g_lat[best.clamp_min(0)].to(pred_lat_deg.dtype), pred_lat_deg)
    lon = torch.where(use, g_lon[best.clamp_min(0)].to(pred_lon_deg.dtype), pred_lon_deg)
    return HybridResult(lat_deg=lat, lon_deg=lon, from_gallery=use, gallery_idx=best, n_candidates=n_cand)


class CosineGalleryScorer:
    """Retrieval scorer by cosine similarity to gallery image embeddings (a GeoCLIP-free reference)."""

    def __init__(self, gallery_emb: Tensor, gallery_lat_deg: Tensor, gallery_lon_deg: Tensor):
        if gallery_emb.ndim != 2 or gallery_emb.shape[0] != gallery_lat_deg.shape[0]:
            raise ValueError(
                f"gallery_emb must be [G, E] with G = {gallery_lat_deg.shape[0]}, "
                f"got {tuple(gallery_emb.shape)}"
            )
        self.gallery = torch.nn.functional.normalize(gallery_emb.float(), dim=1)
        self.gallery_lat_deg, self.gallery_lon_deg = gallery_lat_deg, gallery_lon_deg

    def score(self, emb: Tensor, gallery_idx: Tensor) -> Tensor:
        q = torch.nn.functional.normalize(emb.float(), dim=1)  # [B, E]
        return q @ self.gallery[gallery_idx].T  # [B, M]
