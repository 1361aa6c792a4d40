"""Sphere functions of band-limited codes on a regular latitude-longitude grid, by a fast synthesis.

For a code ``c`` of degree <= L, the sphere function on ring theta_j at longitude phi is

    f(theta_j, phi) = sum_{m>=0} A_m(theta_j) cos(m phi) + sum_{m>0} B_m(theta_j) sin(m phi),
    A_m(theta_j) = sum_{l>=m} c_{l,m} N_lm(theta_j),   B_m(theta_j) = sum_{l>=m} c_{l,-m} N_lm(theta_j),

with N_lm = the real harmonic's latitude factor (sqrt(2) Pbar_l^m for m > 0, Pbar_l^0 for m = 0): the
usual separation of a spherical-harmonic synthesis into a Legendre step per order m and one real FFT per
ring (as in libsharp/ducc0 or torch-harmonics). The Legendre step is one batched matmul over the orders
(``[m, B, l] @ [m, l, rings]``) and the FFT step is ``torch.fft.irfft`` over the longitudes, so a batch of
codes costs ~B * (L+1)**2 * rings multiply-adds instead of B * (L+1)**2 * points for an anchor matmul.
"""

from __future__ import annotations

import math

import torch

from locdiff_core._checks import check_degree
from locdiff_core.harmonics import real_sph_harm
from locdiff_core.sphere import EARTH_RADIUS_KM, latlon_to_xyz


class RegularGrid:
    """``n_theta`` rings at colatitudes (j + 1/2) pi / n_theta by ``2 * n_theta`` equally spaced longitudes.

    The rings avoid the poles, and the point spacing (along a meridian, and along the equator) is
    pi R / n_theta. Points are flattened ring by ring: index = j * n_phi + k.
    """

    def __init__(self, max_degree: int, n_theta: int | None = None, dtype: torch.dtype = torch.float32):
        self.max_degree = L = check_degree(max_degree)
        self.n_theta = n_theta or 2 * (L + 1)
        self.n_phi = 2 * self.n_theta
        if self.n_phi <= 2 * L or self.n_theta <= L:
            raise ValueError(f"a grid for L={L} needs n_theta > L, got {self.n_theta}")
        self.dtype = dtype
        self.dim = (L + 1) ** 2
        colat = (torch.arange(self.n_theta, dtype=torch.float64) + 0.5) * math.pi / self.n_theta
        ring_lat = 90.0 - torch.rad2deg(colat)
        ring_lon = torch.arange(self.n_phi, dtype=torch.float64) * 360.0 / self.n_phi
        ring_lon = torch.where(ring_lon > 180.0, ring_lon - 360.0, ring_lon)
        self.lat_deg = ring_lat[:, None].expand(-1, self.n_phi).reshape(-1)
        self.lon_deg = ring_lon[None, :].expand(self.n_theta, -1).reshape(-1)
        self.xyz = latlon_to_xyz(self.lat_deg, self.lon_deg)  # [G, 3] float64
        # quadrature-like area weights (sin(theta) per ring), normalised to sum to 1
        w = torch.sin(colat)[:, None].expand(-1, self.n_phi).reshape(-1)
        self.area = (w / w.sum()).to(dtype)

        # latitude factors N_lm(theta_j): the real harmonics at longitude 0, column l*l + l + m (m >= 0)
        y = real_sph_harm(ring_lat, torch.zeros_like(ring_lat), L)  # [n_theta, D] float64
        l_idx = torch.arange(L + 1)
        m_idx = torch.arange(L + 1)
        valid = l_idx[None, :] >= m_idx[:, None]  # [m, l]
        pos = torch.where(valid, l_idx[None, :] ** 2 + l_idx[None, :] + m_idx[:, None], self.dim)  # [m, l]
        neg = torch.where(valid & (m_idx[:, None] > 0), l_idx[None, :] ** 2 + l_idx[None, :] - m_idx[:, None],
                          self.dim)
        y_pad = torch.cat([y, torch.zeros(self.n_theta, 1, dtype=y.dtype)], 1)  # column D is zero
        self._legendre = y_pad[:, pos].permute(1, 2, 0).contiguous().to(dtype)  # [m, l, n_theta]
        self._pos = pos  # coefficient index of (l, +m), D where l < m
        self._neg = neg  # coefficient index of (l, -m), D where l < m or m = 0

    def __len__(self) -> int:
        return self.n_theta * self.n_phi

    @property
    def spacing_km(self) -> float:
        return math.pi * EARTH_RADIUS_KM / self.n_theta

    def evaluate(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Sphere functions on the grid: ``coeffs [B, D] -> [B, G]`` (flattened ring by ring)."""
        if coeffs.ndim != 2 or coeffs.shape[1] != self.dim:
            raise ValueError(f"coeffs must have shape [B, {self.dim}], got {tuple(coeffs.shape)}")
        B = coeffs.shape[0]
        c = torch.cat([coeffs.to(self.dtype), torch.zeros(B, 1, dtype=self.dtype)], 1)
        cos_part = c[:, self._pos].transpose(0, 1)  # [m, B, l]
        sin_part = c[:, self._neg].transpose(0, 1)
        a = torch.bmm(cos_part, self._legendre)  # [m, B, n_theta]
        b = torch.bmm(sin_part, self._legendre)
        # irfft(X)[k] = (1/n) (X_0 + 2 Re sum_m X_m e^{2 pi i m k / n}); X_m = n/2 (A_m - i B_m), X_0 = n A_0
        spec = torch.zeros((B, self.n_theta, self.n_phi // 2 + 1), dtype=torch.complex64 if self.dtype
                           == torch.float32 else torch.complex128)
        half = self.n_phi / 2
        spec[:, :, : self.max_degree + 1] = torch.complex(a, -b).permute(1, 2, 0) * half
        spec[:, :, 0] = spec[:, :, 0].real * 2
        return torch.fft.irfft(spec, n=self.n_phi, dim=-1).reshape(B, -1)

    def peaks(self, dens: torch.Tensor) -> torch.Tensor:
        """``dens [B, G]`` with every point that is not a local maximum (>= its 8 neighbours on the grid;
        longitudes wrap, the first and last rings have no neighbour across the pole) set to -inf, so that a
        top-k over it lists distinct peaks. Without it, the strongest peak's shoulders fill the top-k when
        the peak is wide (a filter) or the rings are dense (near a pole) and weaker modes go missing."""
        B = dens.shape[0]
        d = dens.reshape(B, self.n_theta, self.n_phi)
        low = torch.full((B, 1, self.n_phi), -torch.inf, dtype=d.dtype)
        padded = torch.cat([low, d, low], 1)  # [B, n_theta + 2, n_phi]
        keep = torch.ones_like(d, dtype=torch.bool)
        for dj in (0, 1, 2):
            ring = padded[:, dj : dj + self.n_theta]
            for dk in (-1, 0, 1):
                if dj == 1 and dk == 0:
                    continue
                keep &= d >= torch.roll(ring, dk, dims=2)
        return torch.where(keep, d, -torch.inf).reshape(B, -1)
