"""Anchor sets: finite point sets on which sphere functions are evaluated.

Training resamples anchors every step (uniform + data-distribution + near-target, docs/design.md §3);
the decoder uses a fixed :class:`AnchorGrid` whose basis matrix is computed once and cached when it fits
a memory budget (otherwise it is recomputed chunk by chunk, so memory stays bounded at any anchor count).
"""

from __future__ import annotations

import math

import torch

from locdiff_core._checks import check_degree, check_latlon, check_positive
from locdiff_core.harmonics import real_sph_harm
from locdiff_core.sphere import (
    EARTH_RADIUS_KM,
    fibonacci_lattice,
    latlon_to_xyz,
    sample_cap,
    sample_uniform,
)


def _check_count(n, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    return n


def uniform_anchors(
    n: int, jitter: bool = False, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` equal-area anchors: a Fibonacci lattice, optionally jittered by a random rotation.

    The jitter applies one uniformly random rotation to the whole lattice (keeping its equal-area
    property) so that successive training steps see different points.
    """
    n = _check_count(n)
    lat, lon = fibonacci_lattice(n)
    if not jitter:
        return lat.to(dtype), lon.to(dtype)
    q = torch.randn(4, generator=generator, dtype=torch.float64)
    q = q / q.norm()
    w, x, y, z = q.tolist()
    rot = torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ],
        dtype=torch.float64,
    )
    p = latlon_to_xyz(lat, lon) @ rot.T
    out_lat = torch.rad2deg(torch.asin(p[:, 2].clamp(-1, 1)))
    out_lon = torch.rad2deg(torch.atan2(p[:, 1], p[:, 0]))
    return out_lat.to(dtype), out_lon.to(dtype)


def random_uniform_anchors(
    n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` i.i.d. uniform points on the sphere."""
    return sample_uniform(_check_count(n), generator=generator, dtype=dtype)


def from_coordinates(
    lat_deg, lon_deg, n: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` anchors drawn from given coordinates (e.g. the training set): the data distribution.

    Draws without replacement when there are at least ``n`` coordinates, with replacement otherwise.
    """
    lat, lon = check_latlon(lat_deg, lon_deg)
    lat, lon = lat.reshape(-1), lon.reshape(-1)
    n = _check_count(n)
    if lat.numel() == 0:
        raise ValueError("from_coordinates needs at least one coordinate, got an empty set")
    if lat.numel() >= n:
        idx = torch.randperm(lat.numel(), generator=generator)[:n]
    else:
        idx = torch.randint(lat.numel(), (n,), generator=generator)
    return lat[idx], lon[idx]


def near_target_anchors(
    lat_deg, lon_deg, radius_km: float, n_per: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per`` anchors uniform in a cap of ``radius_km`` around each target, flattened to ``[N*n_per]``."""
    lat, lon = sample_cap(lat_deg, lon_deg, radius_km, n_per, generator=generator)
    return lat.reshape(-1), lon.reshape(-1)


class AnchorGrid:
    """A fixed anchor set with its spherical-harmonic basis, for evaluating many codes at once.

    Args:
        lat_deg, lon_deg: anchors ``[A]`` in degrees.
        max_degree: L of the codes it evaluates.
        max_cache_bytes: keep the ``[A, (L+1)**2]`` basis in memory when it fits this budget; otherwise
            :meth:`evaluate` recomputes it in chunks of ``chunk_size`` anchors (bounded memory).
        dtype: dtype of the basis and of the evaluation.
    """

    def __init__(
        self,
        lat_deg,
        lon_deg,
        max_degree: int,
        max_cache_bytes: int = 1 << 30,
        dtype: torch.dtype = torch.float32,
        chunk_size: int = 16384,
    ) -> None:
        lat, lon = check_latlon(lat_deg, lon_deg, "anchor ")
        self.lat_deg = lat.reshape(-1).to(dtype)
        self.lon_deg = lon.reshape(-1).to(dtype)
        if self.lat_deg.numel() == 0:
            raise ValueError("AnchorGrid needs at least one anchor")
        self.max_degree = check_degree(max_degree)
        self.dim = (self.max_degree + 1) ** 2
        self.dtype = dtype
        self.chunk_size = _check_count(chunk_size, "chunk_size")
        self.max_cache_bytes = int(check_positive(max_cache_bytes, "max_cache_bytes", allow_zero=True))
        self.xyz = latlon_to_xyz(self.lat_deg.to(torch.float64), self.lon_deg.to(torch.float64))
        self._basis: torch.Tensor | None = None

    @classmethod
    def fibonacci(cls, n: int, max_degree: int, **kwargs) -> AnchorGrid:
        lat, lon = fibonacci_lattice(_check_count(n))
        return cls(lat, lon, max_degree, **kwargs)

    def __len__(self) -> int:
        return self.lat_deg.numel()

    @property
    def spacing_km(self) -> float:
        """Typical distance between neighbouring anchors if they were spread evenly over the sphere."""
        return math.sqrt(4 * math.pi / len(self)) * EARTH_RADIUS_KM

    @property
    def basis_bytes(self) -> int:
        return len(self) * self.dim * torch.finfo(self.dtype).bits // 8

    @property
    def basis(self) -> torch.Tensor | None:
        """The cached basis ``[A, D]``, or None when it exceeds ``max_cache_bytes``."""
        if self._basis is None and self.basis_bytes <= self.max_cache_bytes:
            with torch.no_grad():
                self._basis = real_sph_harm(self.lat_deg, self.lon_deg, self.max_degree)
        return self._basis

    def evaluate(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Sphere functions ``f_b(a) = sum_i coeffs[b, i] * Y_i(a)`` at every anchor: ``[B, D] -> [B, A]``."""
        if coeffs.ndim != 2 or coeffs.shape[1] != self.dim:
            raise ValueError(
                f"coeffs must have shape [B, {self.dim}] for L={self.max_degree}, got {tuple(coeffs.shape)}"
            )
        coeffs = coeffs.to(self.dtype)
        basis = self.basis
        if basis is not None:
            return coeffs @ basis.T  # [B, D] @ [D, A] -> [B, A]
        out = torch.empty((coeffs.shape[0], len(self)), dtype=self.dtype)
        for start in range(0, len(self), self.chunk_size):
            stop = min(start + self.chunk_size, len(self))
            with torch.no_grad():
                chunk = real_sph_harm(self.lat_deg[start:stop], self.lon_deg[start:stop], self.max_degree)
            out[:, start:stop] = coeffs @ chunk.T
        return out
