"""LocDiff-H: refine LocDiff's prediction with a retrieval gallery (docs/design.md §3).

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


HYBRID_RULES = ("best", "vote")


@dataclass
class ModeHybridResult:
    lat_deg: Tensor  # [B]
    lon_deg: Tensor  # [B]
    from_gallery: Tensor  # [B] bool: a gallery neighbour replaced LocDiff's prediction
    n_candidates: Tensor  # [B] long: neighbours that fell within the radius of a mode


def gate_modes(
    modes_lat_deg: Tensor, modes_lon_deg: Tensor, modes_mass: Tensor | None, min_mass: float
) -> tuple[Tensor, Tensor]:
    """The modes ``[B, M]`` that propose a region: those after the first whose mass ``[B, M]`` is below
    ``min_mass`` become NaN (no region); the first mode always proposes. ``min_mass`` 0 or no masses:
    every mode, as given."""
    if not 0.0 <= min_mass < 1.0:
        raise ValueError(f"min_mass={min_mass} must be in [0, 1)")
    if modes_mass is None or min_mass <= 0.0:
        return modes_lat_deg, modes_lon_deg
    if modes_mass.shape != modes_lat_deg.shape:
        raise ValueError(
            f"modes_mass must match the modes' shape {tuple(modes_lat_deg.shape)}, "
            f"got {tuple(modes_mass.shape)}"
        )
    weak = modes_mass < min_mass  # NaN masses compare False: such modes are NaN already
    weak[:, :1] = False
    nan = torch.tensor(float("nan"), dtype=modes_lat_deg.dtype)
    return torch.where(weak, nan, modes_lat_deg), torch.where(weak, nan, modes_lon_deg)


@torch.inference_mode()
def hybrid_from_neighbours(
    pred_lat_deg: Tensor,
    pred_lon_deg: Tensor,
    modes_lat_deg: Tensor,
    modes_lon_deg: Tensor,
    nb_sim: Tensor,
    nb_lat_deg: Tensor,
    nb_lon_deg: Tensor,
    *,
    radius_km: float = 200.0,
    rule: str = "best",
    vote_km: float = 25.0,
    modes_mass: Tensor | None = None,
    min_mass: float = 0.0,
) -> ModeHybridResult:
    """LocDiff-H over an image's nearest gallery neighbours (by embedding similarity).

    LocDiff's modes ``[B, M]`` (NaN where fewer exist) propose regions; a neighbour ``[B, N]`` is a
    candidate when it lies within ``radius_km`` of any mode. ``rule="best"``: the most similar candidate;
    ``rule="vote"``: the candidate whose ``vote_km`` neighbourhood (among candidates) carries the most
    similarity (clamped at 0), ties to the more similar one. No candidate: LocDiff's own prediction.
    With ``modes_mass`` ``[B, M]``, modes after the first with mass below ``min_mass`` propose nothing
    (:func:`gate_modes`).
    With the neighbours sorted by similarity and the exact top-N, ``best`` equals the exact answer over
    the whole gallery whenever at least one of the N lies in a proposed region.
    """
    if rule not in HYBRID_RULES:
        raise ValueError(
            f"rule={rule!r} is not allowed; allowed values: {', '.join(map(repr, HYBRID_RULES))}"
        )
    if radius_km <= 0:
        raise ValueError(f"radius_km={radius_km} must be > 0")
    b, n = nb_sim.shape
    if modes_lat_deg.ndim != 2 or modes_lat_deg.shape[0] != b or pred_lat_deg.shape != (b,):
        raise ValueError(
            f"modes must be [B, M] and predictions [B] with B = {b}, got {tuple(modes_lat_deg.shape)} and "
            f"{tuple(pred_lat_deg.shape)}"
        )
    modes_lat_deg, modes_lon_deg = gate_modes(modes_lat_deg, modes_lon_deg, modes_mass, min_mass)
    cos_r = math.cos(min(radius_km / EARTH_RADIUS_KM, math.pi))
    m_ok = torch.isfinite(modes_lat_deg) & torch.isfinite(modes_lon_deg)  # [B, M]
    m_xyz = latlon_to_xyz(
        torch.nan_to_num(modes_lat_deg.double()), torch.nan_to_num(modes_lon_deg.double())
    )  # [B, M, 3]
    g_xyz = latlon_to_xyz(nb_lat_deg.double(), nb_lon_deg.double())  # [B, N, 3]
    near = (torch.einsum("bnc,bmc->bnm", g_xyz, m_xyz) >= cos_r) & m_ok[:, None, :]  # [B, N, M]
    cand = near.any(dim=2)  # [B, N]
    sim = nb_sim.double()
    if rule == "best":
        score = sim.masked_fill(~cand, float("-inf"))  # [B, N]
    else:
        cos_v = math.cos(min(vote_km / EARTH_RADIUS_KM, math.pi))
        close = torch.einsum("bnc,bjc->bnj", g_xyz, g_xyz) >= cos_v  # [B, N, N]
        w = (sim.clamp_min(0) * cand)[:, None, :]  # [B, 1, N]
        votes = (close * w).sum(-1)  # [B, N]
        score = (votes + 1e-9 * sim).masked_fill(~cand, float("-inf"))  # ties -> the more similar one
    arg = score.argmax(dim=1, keepdim=True)  # [B, 1]
    use = cand.any(dim=1)
    lat = torch.where(use, nb_lat_deg.double().gather(1, arg)[:, 0], pred_lat_deg.double())
    lon = torch.where(use, nb_lon_deg.double().gather(1, arg)[:, 0], pred_lon_deg.double())
    return ModeHybridResult(lat, lon, use, cand.sum(dim=1))


@torch.inference_mode()
def hybrid_modes_with_scorer(
    emb: Tensor,
    pred_lat_deg: Tensor,
    pred_lon_deg: Tensor,
    modes_lat_deg: Tensor,
    modes_lon_deg: Tensor,
    scorer: GalleryScorer,
    radius_km: float = 200.0,
    modes_mass: Tensor | None = None,
    min_mass: float = 0.0,
) -> HybridResult:
    """LocDiff-H with a gallery scorer (e.g. GeoCLIP's image–location similarity): the scorer's gallery
    points within ``radius_km`` of any of LocDiff's modes ``[B, M]`` (NaN = none) are candidates; the
    best-scoring one answers, else LocDiff's own prediction. ``modes_mass``/``min_mass``: as
    :func:`hybrid_from_neighbours`."""
    if radius_km <= 0:
        raise ValueError(f"radius_km={radius_km} must be > 0")
    modes_lat_deg, modes_lon_deg = gate_modes(modes_lat_deg, modes_lon_deg, modes_mass, min_mass)
    b = emb.shape[0]
    g_lat, g_lon = scorer.gallery_lat_deg, scorer.gallery_lon_deg
    mask = torch.zeros(b, g_lat.shape[0], dtype=torch.bool)
    for j in range(modes_lat_deg.shape[1]):
        ok = torch.isfinite(modes_lat_deg[:, j]) & torch.isfinite(modes_lon_deg[:, j])  # [B]
        m_lat = torch.nan_to_num(modes_lat_deg[:, j].double())
        m_lon = torch.nan_to_num(modes_lon_deg[:, j].double())
        mask |= candidates_within(m_lat, m_lon, g_lat, g_lon, radius_km) & ok[:, None]  # [B, G]
    n_cand = mask.sum(dim=1)
    union = mask.any(dim=0).nonzero().squeeze(1)  # [M']
    best = torch.full((b,), -1, dtype=torch.long)
    if union.numel():
        scores = scorer.score(emb, union).float().cpu().masked_fill(~mask[:, union], float("-inf"))
        best = torch.where(n_cand > 0, union[scores.argmax(dim=1)], best)
    use = best >= 0
    lat = torch.where(use, g_lat[best.clamp_min(0)].double(), pred_lat_deg.double())
    lon = torch.where(use, g_lon[best.clamp_min(0)].double(), pred_lon_deg.double())
    return HybridResult(lat_deg=lat, lon_deg=lon, from_gallery=use, gallery_idx=best, n_candidates=n_cand)
