"""Synthetic conditional data: embeddings that are a noisy function of the location."""

import torch

from locdiff_core.data import GeoEmbeddings
from locdiff_core.sphere import latlon_to_xyz, sample_uniform


def location_embeddings(n: int, dim: int = 32, noise: float = 0.05, seed: int = 0) -> GeoEmbeddings:
    """emb = sin(3 · random projection of the unit vector) + Gaussian noise; locations uniform."""
    g = torch.Generator().manual_seed(seed)
    lat, lon = sample_uniform(n, generator=g)
    xyz = latlon_to_xyz(lat, lon).float()
    proj = torch.randn(3, dim, generator=torch.Generator().manual_seed(123))
    emb = torch.sin(3 * xyz @ proj) + noise * torch.randn(n, dim, generator=g)
    return GeoEmbeddings(emb, lat, lon)
