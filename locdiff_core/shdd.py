"""Spherical Harmonics Dirac Delta (SHDD) codes: encode, filter, evaluate, compare (SHDD-KL) and decode.

A location w0 is encoded as the Dirac delta at w0 projected onto the real harmonics of degree <= L:
c(w0) = [Y_i(w0)], D = (L+1)**2 numbers. By the addition theorem its sphere function
f_c(w) = sum_i c_i Y_i(w) = sum_l (2l+1)/(4 pi) P_l(cos gamma) peaks exactly at w0 (gamma = angle to w0)
with height (L+1)**2 / (4 pi), and every clean code has norm (L+1)/sqrt(4 pi). Diffusion runs on
x = sqrt(4 pi) * c, whose coordinates have unit second moment for uniformly spread locations
(:attr:`SHDD.scale`). Every method here takes codes in c units (divide x by ``scale`` first).

Degree filters multiply degree l by a weight w_l: by the Funk-Hecke theorem that is a convolution of the
sphere function with a zonal kernel (DESIGN §3). They damp the truncation's ringing and set the decoder's
resolution rho.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from locdiff_core._checks import as_float_tensor, check_degree, check_latlon, check_positive
from locdiff_core.anchors import AnchorGrid
from locdiff_core.harmonics import degree_index, real_sph_harm
from locdiff_core.sphere import EARTH_RADIUS_KM, offset_km

FilterKind = Literal["none", "heat", "cap"]
FILTER_KINDS = ("none", "heat", "cap")


@dataclass(frozen=True)
class Decoded:
    """The decoder's answer for a batch of B codes (k = number of modes asked for).

    ``lat_deg``/``lon_deg`` ``[B]``: the refined strongest mode. ``score`` ``[B]``: its height relative to
    a clean code's peak under the same filter (1 for a clean code; ~w for a mixture component of
    weight w). ``modes_*`` ``[B, k]``: the k strongest separated modes (strongest first; mode 0 is the
    refined prediction, the others sit on the nearest anchor; NaN where fewer modes exist), their
    relative height, and their probability mass: the share of the positive part of the filtered sphere
    function lying in each mode's basin (anchors nearer to it than to any other mode and within
    ``min_separation_km``).
    """

    lat_deg: torch.Tensor
    lon_deg: torch.Tensor
    score: torch.Tensor
    modes_lat_deg: torch.Tensor
    modes_lon_deg: torch.Tensor
    modes_score: torch.Tensor
    modes_mass: torch.Tensor


def legendre_table(max_degree: int, x: torch.Tensor) -> torch.Tensor:
    """Legendre polynomials P_0..P_L at ``x``: ``[..., L+1]`` (Bonnet's recurrence, float64)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    ps = [torch.ones_like(x), x]
    for l in range(1, max_degree):
        ps.append(((2 * l + 1) * x * ps[l] - l * ps[l - 1]) / (l + 1))
    return torch.stack(ps[: max_degree + 1], -1)


class SHDD:
    """SHDD codes of maximum degree ``max_degree`` (L). ``dim`` = (L+1)**2."""

    def __init__(self, max_degree: int) -> None:
        self.max_degree = check_degree(max_degree)
        if self.max_degree < 1:
            raise ValueError(f"max_degree must be >= 1 for a usable SHDD code, got {max_degree}")
        self.dim = (self.max_degree + 1) ** 2
        self.scale = math.sqrt(4 * math.pi)
        self.peak = self.dim / (4 * math.pi)
        self._degree = degree_index(self.max_degree)
        self._grids: dict[tuple[int, torch.dtype], AnchorGrid] = {}

    def __repr__(self) -> str:
        return f"SHDD(max_degree={self.max_degree}, dim={self.dim})"

    # ----------------------------------------------------------------------------------- encode
    def encode(self, lat_deg, lon_deg) -> torch.Tensor:
        """Codes ``[..., D]`` of the given locations (dtype follows the inputs)."""
        return real_sph_harm(lat_deg, lon_deg, self.max_degree).contiguous()

    def check_coeffs(self, coeffs, name: str = "coeffs") -> torch.Tensor:
        coeffs = as_float_tensor(coeffs, name)
        if coeffs.ndim != 2 or coeffs.shape[1] != self.dim:
            raise ValueError(
                f"{name} must have shape [B, {self.dim}] (L={self.max_degree}), got {tuple(coeffs.shape)}"
            )
        return coeffs

    # ---------------------------------------------------------------------------------- filters
    def degree_weights(self, kind: FilterKind = "none", radius_km: float | None = None) -> torch.Tensor:
        """Per-degree weights ``[L+1]`` (float64) of a zonal smoothing kernel.

        ``none``: all ones. ``heat``: exp(-l(l+1) s^2 / 2) with s = radius_km / R (a spherical Gaussian of
        width ~radius_km). ``cap``: the normalised indicator of a cap of angular radius a = radius_km / R,
        w_l = (P_{l-1}(cos a) - P_{l+1}(cos a)) / ((2l+1)(1 - cos a)), w_0 = 1 (Funk-Hecke). A radius of 0
        means no filtering.
        """
        if kind not in FILTER_KINDS:
            raise ValueError(f"filter kind must be one of {FILTER_KINDS}, got {kind!r}")
        L = self.max_degree
        l = torch.arange(L + 1, dtype=torch.float64)
        if kind == "none":
            return torch.ones(L + 1, dtype=torch.float64)
        if radius_km is None:
            raise ValueError(f"filter kind {kind!r} needs radius_km (>= 0)")
        r = check_positive(radius_km, "radius_km", allow_zero=True)
        if r == 0:
            return torch.ones(L + 1, dtype=torch.float64)
        a = min(r / EARTH_RADIUS_KM, math.pi)
        if kind == "heat":
            return torch.exp(-l * (l + 1) * a * a / 2)
        c = math.cos(a)
        one_minus_c = 2 * math.sin(a / 2) ** 2
        p = legendre_table(L + 1, torch.tensor(c, dtype=torch.float64))  # [L+2]
        w = torch.empty(L + 1, dtype=torch.float64)
        w[0] = 1.0
        w[1:] = (p[:-2] - p[2:]) / ((2 * l[1:] + 1) * one_minus_c)
        return w

    def expand(self, weights: torch.Tensor) -> torch.Tensor:
        """Per-degree weights ``[L+1]`` -> per-coefficient weights ``[D]``."""
        return weights[self._degree]

    def filtered_peak(self, weights: torch.Tensor) -> float:
        """Height of a clean code's sphere function at its own point after filtering."""
        l = torch.arange(self.max_degree + 1, dtype=torch.float64)
        return float(((2 * l + 1) / (4 * math.pi) * weights).sum())

    # --------------------------------------------------------------------------------- evaluate
    def evaluate(self, coeffs, lat_deg, lon_deg) -> torch.Tensor:
        """Sphere functions at anchors: ``coeffs [B, D]``, anchors ``[A]`` -> ``[B, A]``."""
        coeffs = self.check_coeffs(coeffs)
        lat, lon = check_latlon(lat_deg, lon_deg, "anchor ")
        basis = real_sph_harm(
            lat.reshape(-1).to(coeffs.dtype), lon.reshape(-1).to(coeffs.dtype), self.max_degree
        )
        return coeffs @ basis.T  # [B, D] @ [D, A] -> [B, A]

    def kl_loss(self, pred_coeffs, true_coeffs, anchor_lat, anchor_lon, tau: float = 0.1) -> torch.Tensor:
        """SHDD-KL: mean over the batch of KL(p || q) between anchor softmaxes of true and predicted codes.

        p = softmax(f_true(A) / t), q = softmax(f_pred(A) / t), t = tau * (L+1)**2 / (4 pi) (tau is relative
        to the clean peak height). Zero when the codes are equal, positive otherwise; differentiable in
        ``pred_coeffs``. Anchors ``[A]`` are typically resampled every training step.
        """
        pred = self.check_coeffs(pred_coeffs, "pred_coeffs")
        true = self.check_coeffs(true_coeffs, "true_coeffs").to(pred.dtype)
        if pred.shape != true.shape:
            raise ValueError(
                f"pred_coeffs {tuple(pred.shape)} and true_coeffs {tuple(true.shape)} differ in shape"
            )
        t = check_positive(tau, "tau") * self.peak
        lat, lon = check_latlon(anchor_lat, anchor_lon, "anchor ")
        basis = real_sph_harm(lat.reshape(-1).to(pred.dtype), lon.reshape(-1).to(pred.dtype), self.max_degree)
        log_q = F.log_softmax(pred @ basis.T / t, dim=-1)  # [B, A]
        log_p = F.log_softmax(true @ basis.T / t, dim=-1)  # [B, A]
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)

    # ----------------------------------------------------------------------------------- decode
    def default_anchor_count(self) -> int:
        """Coarse-search anchors: spacing ~0.8 of the kernel's half-width (refinement does the rest)."""
        return max(10_000, 4 * self.dim)

    def default_grid(self, n: int | None = None, dtype: torch.dtype = torch.float32) -> AnchorGrid:
        n = n or self.default_anchor_count()
        key = (n, dtype)
        if key not in self._grids:
            self._grids[key] = AnchorGrid.fibonacci(n, self.max_degree, dtype=dtype)
        return self._grids[key]

    def half_width_km(self) -> float:
        """Half-width at half maximum of a clean code's peak (~14,130 km / (L+1))."""
        gam = torch.linspace(0, min(math.pi, 8 * math.pi / (self.max_degree + 1)), 4001, dtype=torch.float64)
        l = torch.arange(self.max_degree + 1, dtype=torch.float64)
        k = (legendre_table(self.max_degree, torch.cos(gam)) * (2 * l + 1)).sum(-1)
        below = torch.nonzero(k < k[0] / 2)
        return float(gam[below[0, 0]] * EARTH_RADIUS_KM) if below.numel() else math.pi * EARTH_RADIUS_KM

    @torch.no_grad()
    def decode(
        self,
        coeffs,
        rho_km: float = 0.0,
        filter: FilterKind = "cap",
        anchors: AnchorGrid | None = None,
        top_k: int = 5,
        min_separation_km: float | None = None,
        refine_iters: int = 4,
        batch_size: int | None = None,
    ) -> Decoded:
        """Modal search: the locations where the (filtered) sphere function of each code peaks.

        1. filter the codes with the degree weights of ``filter``/``rho_km`` (larger rho: coarser and
           stabler; 0: no filtering); 2. evaluate them on the anchor grid (one matmul against its cached
           basis); 3. take the top candidates and keep ``top_k`` modes at least ``min_separation_km`` apart
           (default: twice the kernel's half-width); 4. refine the best mode continuously by successive
           parabolic fits along the local north and east axes with a shrinking step; 5. measure each
           mode's probability mass. Memory is bounded by processing codes in batches.

        Args:
            coeffs: codes ``[B, D]`` in c units (x / sqrt(4 pi)).
        """
        coeffs = self.check_coeffs(coeffs)
        if coeffs.shape[0] == 0:
            raise ValueError("coeffs is an empty batch: decode needs at least one code")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        if isinstance(refine_iters, bool) or not isinstance(refine_iters, int) or refine_iters < 0:
            raise ValueError(f"refine_iters must be an int >= 0, got {refine_iters!r}")
        grid = anchors if anchors is not None else self.default_grid()
        if grid.max_degree != self.max_degree:
            raise ValueError(f"anchors were built for L={grid.max_degree}, codes have L={self.max_degree}")
        weights = self.degree_weights(filter, rho_km)
        w = self.expand(weights).to(grid.dtype)
        peak = self.filtered_peak(weights)
        sep = min_separation_km if min_separation_km is not None else 2 * self.half_width_km()
        cos_sep = math.cos(min(check_positive(sep, "min_separation_km") / EARTH_RADIUS_KM, math.pi))
        B = coeffs.shape[0]
        if batch_size is None:
            # densities [batch, A] of 16 MB; 256 MB when the basis is recomputed per batch (uncached grid)
            budget = 1 << 22 if grid.basis is not None else 1 << 26
            batch_size = max(1, min(B, budget // len(grid)))
        cf = coeffs.to(grid.dtype) * w
        parts = [
            self._coarse_modes(cf[start : start + batch_size], grid, top_k, cos_sep, peak)
            for start in range(0, B, batch_size)
        ]
        modes_lat, modes_lon, modes_score, modes_mass = (torch.cat(f) for f in zip(*parts, strict=True))
        # refine the best mode of every code at once (large batches keep the harmonics efficient)
        lat, lon, score = self._refine(
            cf, modes_lat[:, 0], modes_lon[:, 0], grid.spacing_km, refine_iters, peak
        )
        modes_lat[:, 0], modes_lon[:, 0], modes_score[:, 0] = lat, lon, score
        return Decoded(lat, lon, score, modes_lat, modes_lon, modes_score, modes_mass)

    def _coarse_modes(self, cf, grid: AnchorGrid, k: int, cos_sep: float, peak: float):
        dens = grid.evaluate(cf)  # [b, A]
        b = cf.shape[0]
        m = min(len(grid), max(8 * k, 64))
        cand_val, cand_idx = dens.topk(m, dim=1)  # [b, M], sorted descending
        cand_xyz = grid.xyz[cand_idx]  # [b, M, 3]
        # greedy non-maximum suppression, vectorised over the batch
        alive = torch.ones_like(cand_val, dtype=torch.bool)
        rows = torch.arange(b)
        chosen, found = [], []
        for _ in range(k):
            pos = torch.where(alive, torch.arange(m).expand(b, m), m).min(dim=1).values  # first alive
            ok = pos < m
            pos = pos.clamp_max(m - 1)
            chosen.append(pos)
            found.append(ok)
            centre = cand_xyz[rows, pos]  # [b, 3]
            near = (cand_xyz * centre[:, None]).sum(-1) >= cos_sep
            alive = alive & ~(near & ok[:, None])
        pos = torch.stack(chosen, 1)  # [b, k]
        ok = torch.stack(found, 1)  # [b, k]
        mode_idx = cand_idx.gather(1, pos)  # [b, k]
        modes_score = torch.where(ok, cand_val.gather(1, pos) / peak, torch.zeros((), dtype=cand_val.dtype))
        modes_lat = torch.where(ok, grid.lat_deg[mode_idx], torch.nan)
        modes_lon = torch.where(ok, grid.lon_deg[mode_idx], torch.nan)

        # probability mass: positive part of the density, shared among modes by nearest basin
        pos_dens = dens.clamp_min(0)  # [b, A]
        total = pos_dens.sum(1).clamp_min(torch.finfo(dens.dtype).tiny)
        mode_xyz = torch.where(ok[:, :, None], grid.xyz[mode_idx], 0.0).to(dens.dtype)  # [b, k, 3]
        # missing modes sit at the origin: cos = 0 < cos_sep, so they own nothing
        best_cos, owner = (mode_xyz @ grid.xyz.to(dens.dtype).T).max(dim=1)  # [b, k, A] -> [b, A]
        inside = best_cos >= cos_sep
        mass = torch.zeros((b, k), dtype=dens.dtype).scatter_add_(1, owner, pos_dens * inside)
        return modes_lat, modes_lon, modes_score, mass / total[:, None]

    def _refine(self, cf, lat, lon, step_km: float, iters: int, peak: float):
        """Successive parabolic fits along north and east with a step shrinking 4x per iteration."""
        lat = lat.to(torch.float64)
        lon = lon.to(torch.float64)
        h = step_km
        offsets = torch.tensor(
            [[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]], dtype=torch.float64
        )  # (north, east)

        chunk = max(1, (1 << 16) // 5)  # codes per harmonics call: ~64k points

        def values(la, lo):  # [B, P] points -> f values [B, P]
            out = []
            for i in range(0, la.shape[0], chunk):
                y = real_sph_harm(
                    la[i : i + chunk].to(cf.dtype), lo[i : i + chunk].to(cf.dtype), self.max_degree
                )
                out.append(torch.einsum("bpd,bd->bp", y, cf[i : i + chunk]))  # [b, P, D] . [b, D] -> [b, P]
            return torch.cat(out)

        for _ in range(iters):
            n_km = offsets[:, 0] * h  # [5]
            e_km = offsets[:, 1] * h
            pl, po = offset_km(lat[:, None].expand(-1, 5), lon[:, None].expand(-1, 5), n_km, e_km)
            f = values(pl, po).to(torch.float64)  # [b, 5]
            steps = []
            for plus, minus in ((1, 2), (3, 4)):
                curv = f[:, plus] + f[:, minus] - 2 * f[:, 0]
                vertex = h * (f[:, minus] - f[:, plus]) / (2 * curv.clamp(max=-1e-30))
                # where the fit is not concave, step to the better side (or stay)
                fallback = torch.where(f[:, plus] > f[:, 0], h, torch.where(f[:, minus] > f[:, 0], -h, 0.0))
                steps.append(torch.where(curv < 0, vertex.clamp(-h, h), fallback))
            lat, lon = offset_km(lat, lon, steps[0], steps[1])
            h = h / 4
        score = values(lat[:, None], lon[:, None])[:, 0] / peak
        return lat.to(cf.dtype), lon.to(cf.dtype), score
