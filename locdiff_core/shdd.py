"""Spherical Harmonics Dirac Delta (SHDD) codes: encode, filter, evaluate, compare (SHDD-KL) and decode.

A location w0 is encoded as the Dirac delta at w0 projected onto the real harmonics of degree <= L:
c(w0) = [Y_i(w0)], D = (L+1)**2 numbers. By the addition theorem its sphere function
f_c(w) = sum_i c_i Y_i(w) = sum_l (2l+1)/(4 pi) P_l(cos gamma) peaks exactly at w0 (gamma = angle to w0)
with height (L+1)**2 / (4 pi), and every clean code has norm (L+1)/sqrt(4 pi). Diffusion runs on
x = sqrt(4 pi) * c, whose coordinates have unit second moment for uniformly spread locations
(:attr:`SHDD.scale`). Every method here takes codes in c units (divide x by ``scale`` first).

Degree filters multiply degree l by a weight w_l: by the Funk-Hecke theorem that is a convolution of the
sphere function with a zonal kernel (docs/design.md §3). They damp the truncation's ringing and set the
decoder's resolution rho.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from locdiff_core._checks import as_float_tensor, check_degree, check_latlon, check_positive
from locdiff_core.anchors import AnchorGrid
from locdiff_core.harmonics import _kernels, degree_index, evaluate_at_points, kernel_tables, real_sph_harm
from locdiff_core.shgrid import RegularGrid
from locdiff_core.sphere import EARTH_RADIUS_KM, latlon_to_xyz, tangent_frame, xyz_to_latlon

FilterKind = Literal["none", "heat", "cap"]
FILTER_KINDS = ("none", "heat", "cap")


@dataclass(frozen=True)
class Decoded:
    """The decoder's answer for a batch of B codes (k = number of modes asked for).

    ``lat_deg``/``lon_deg`` ``[B]``: the refined strongest mode. ``score`` ``[B]``: its height relative to
    a clean code's peak under the same filter (1 for a clean code; ~w for a mixture component of
    weight w). ``modes_*`` ``[B, k]``: the k strongest separated modes (strongest first; mode 0 is the
    refined prediction; the modes found among the 4 strongest distinct grid peaks are refined too, any
    others sit on their grid point; NaN where fewer modes exist), their
    relative height, and their probability mass: the non-negative weights of point masses at the modes
    that best reproduce the code at a Hann-tapered resolution (:meth:`SHDD._mode_mass`), as shares of the
    code's total mass, so they sum to <= 1 and a clean w / (1 - w) mixture gets masses w and 1 - w.
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
        self._regular: RegularGrid | None = None

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
        width ~radius_km). ``cap``: a tapered cap of angular radius a = radius_km / R, the raised-cosine
        profile K(g) = (1 + cos(pi g / a)) / 2 for g <= a, 0 beyond (K = 1, 0.85, 0.5, 0.15, 0 at g = 0,
        a/4, a/2, 3a/4, a); w_l = int_0^a K(g) P_l(cos g) sin g dg / int_0^a K(g) sin g dg (Funk-Hecke), by
        Gauss-Legendre quadrature. The taper makes the filtered peak of a clean code a strict maximum at its
        point: a hard cap's indicator is flat inside the cap, so after truncation its Gibbs ripples put the
        maximum anywhere up to ~a away (e.g. 694 km at L = 16, rho = 2,000 km; benchmarks/bench_rho.py). A
        radius of 0 means no filtering.
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
        # P_l(cos g) has <= l a / pi + 1 oscillations on [0, a]: 2 (L + 1) + 32 nodes integrate them exactly
        # enough (the integrand is smooth; the taper is C1 at g = a)
        x, wq = np.polynomial.legendre.leggauss(2 * (L + 1) + 32)
        g = torch.as_tensor((x + 1) * a / 2, dtype=torch.float64)
        profile = 0.5 + 0.5 * torch.cos(math.pi * g / a)
        wq = torch.as_tensor(wq, dtype=torch.float64) * profile * torch.sin(g)
        w = (legendre_table(L, torch.cos(g)) * wq[:, None]).sum(0)  # [L+1]
        return w / w[0]

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
        # anchors are drawn on the CPU (one seeded generator): the basis goes where the predictions are
        lat, lon = (x.reshape(-1).to(pred.device, pred.dtype) for x in (lat, lon))
        basis = real_sph_harm(lat, lon, self.max_degree)
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

    def decode_tolerance_km(self, refine_iters: int = 4, grid: AnchorGrid | RegularGrid | None = None
                            ) -> float:
        """The decoder's documented precision: the step of the refinement's last stencil, half the coarse
        grid's spacing shrunk 4x per Newton iteration (``refine_iters`` >= 1), e.g. 2.4 km at L = 32. Clean
        codes decode within it at every filter and rho (tests/core/test_shdd.py, benchmarks/bench_rho.py)."""
        spacing = (grid or self.search_grid()).spacing_km
        return 0.5 * spacing / 4 ** max(refine_iters - 1, 0)

    def mass_weights(self) -> torch.Tensor:
        """Per-degree taper ``[L+1]`` of the resolution at which mode masses are fitted
        (:meth:`_mode_mass`): a Hann window cos^2(pi l / (2 (L + 1))). It damps the truncated delta's
        ringing, so that masses do not hinge on a mode's exact position at the top degrees."""
        l = torch.arange(self.max_degree + 1, dtype=torch.float64)
        return torch.cos(math.pi * l / (2 * (self.max_degree + 1))) ** 2

    def search_grid(self) -> RegularGrid:
        """The decoder's default coarse grid: 2(L+1) x 4(L+1) points evaluated by a fast synthesis
        (:class:`~locdiff_core.shgrid.RegularGrid`); built once per SHDD and cached."""
        if self._regular is None:
            self._regular = RegularGrid(self.max_degree)
        return self._regular

    @torch.no_grad()
    def decode(
        self,
        coeffs,
        rho_km: float = 0.0,
        filter: FilterKind = "cap",
        anchors: AnchorGrid | RegularGrid | None = None,
        top_k: int = 5,
        min_separation_km: float | None = None,
        refine_iters: int = 4,
        batch_size: int | None = None,
    ) -> Decoded:
        """Modal search: the locations where the (filtered) sphere function of each code peaks.

        1. filter the codes with the degree weights of ``filter``/``rho_km`` (larger rho: coarser and
           stabler; 0: no filtering); 2. evaluate them on a coarse grid: by default a regular grid by a
           fast synthesis (:meth:`search_grid`), or the given ``anchors`` (an :class:`AnchorGrid`: one
           matmul against its cached basis); 3. take the grid's strongest distinct peaks (several, not only
           the best, so that near-ties between modes are settled by refined values) and refine each
           continuously (Newton steps on a 3x3 stencil in the local tangent plane with a shrinking step,
           in float64, on the exact sphere function); 4. keep ``top_k`` modes at least
           ``min_separation_km`` apart (default: twice the kernel's half-width); 5. measure each mode's
           probability mass (:meth:`_mode_mass`). Codes are processed in chunks of ``batch_size``, so
           memory does not grow with the batch.

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
        grid = anchors if anchors is not None else self.search_grid()
        if grid.max_degree != self.max_degree:
            raise ValueError(f"anchors were built for L={grid.max_degree}, codes have L={self.max_degree}")
        weights = self.degree_weights(filter, rho_km)
        peak = self.filtered_peak(weights)
        sep = min_separation_km if min_separation_km is not None else 2 * self.half_width_km()
        cos_sep = math.cos(min(check_positive(sep, "min_separation_km") / EARTH_RADIUS_KM, math.pi))
        B = coeffs.shape[0]
        if batch_size is None:
            # densities [chunk, grid] of ~8 MB; 256 MB when an uncached anchor basis is recomputed per chunk
            cached = not isinstance(grid, AnchorGrid) or grid.basis is not None
            budget = 1 << 21 if cached else 1 << 26
            batch_size = max(1, min(B, budget // len(grid)))
        cf = coeffs.to(torch.float64) * self.expand(weights)
        raw = coeffs.to(torch.float64)  # masses are measured on the unfiltered codes
        parts = [
            self._decode_chunk(cf[s : s + batch_size], raw[s : s + batch_size], grid, top_k, cos_sep, peak,
                               refine_iters)
            for s in range(0, B, batch_size)
        ]
        lat, lon, score, modes_lat, modes_lon, modes_score, modes_mass = (
            torch.cat(f) for f in zip(*parts, strict=True)
        )
        return Decoded(lat, lon, score, modes_lat, modes_lon, modes_score, modes_mass)

    def _decode_chunk(self, cf, raw, grid, k: int, cos_sep: float, peak: float, iters: int):
        """Decode a chunk of filtered codes ``cf [b, D]`` (float64) whose unfiltered codes are ``raw``;
        see :meth:`decode`."""
        dens = grid.evaluate(cf.to(grid.dtype))  # [b, G]
        b, G = dens.shape
        out_dtype = dens.dtype
        xyz = grid.xyz  # [G, 3] float64
        m = min(G, max(8 * k, 64))
        # on a regular grid: the strongest local maxima; on anchors: the strongest points
        peaks = grid.peaks(dens) if isinstance(grid, RegularGrid) else dens
        cand_val, cand_idx = peaks.topk(m, dim=1)  # [b, M], sorted descending (-inf: not a peak)
        cand_xyz = xyz[cand_idx]  # [b, M, 3]

        # refinement seeds: the strongest candidates at least ~1.6 grid spacings apart (distinct peaks)
        n_seeds = min(m, 4)
        cos_seed = math.cos(min(1.6 * grid.spacing_km / EARTH_RADIUS_KM, math.pi))
        seed_pos, seed_ok = _greedy_separated(cand_xyz, cand_val, n_seeds, cos_seed)
        seed_idx = cand_idx.gather(1, seed_pos)  # [b, R]
        s_lat, s_lon, s_val = self._refine(
            cf, grid.lat_deg.to(torch.float64)[seed_idx], grid.lon_deg.to(torch.float64)[seed_idx],
            grid.spacing_km, iters,
        )
        s_val = torch.where(seed_ok, s_val, -torch.inf)

        # modes: refined seeds first, then the raw candidates, kept at least min_separation apart
        all_xyz = torch.cat([latlon_to_xyz(s_lat, s_lon), cand_xyz], 1)  # [b, R + M, 3]
        all_val = torch.cat([s_val, cand_val.to(torch.float64)], 1)
        all_lat = torch.cat([s_lat, grid.lat_deg.to(torch.float64)[cand_idx]], 1)
        all_lon = torch.cat([s_lon, grid.lon_deg.to(torch.float64)[cand_idx]], 1)
        order = all_val.argsort(dim=1, descending=True)
        all_xyz = all_xyz.gather(1, order[:, :, None].expand(-1, -1, 3))
        all_val, all_lat, all_lon = (t.gather(1, order) for t in (all_val, all_lat, all_lon))
        pos, ok = _greedy_separated(all_xyz, all_val, k, cos_sep)
        ok = ok & torch.isfinite(all_val.gather(1, pos))
        nan = torch.tensor(torch.nan, dtype=torch.float64)
        modes_lat = torch.where(ok, all_lat.gather(1, pos), nan)
        modes_lon = torch.where(ok, all_lon.gather(1, pos), nan)
        modes_score = torch.where(ok, all_val.gather(1, pos) / peak, 0.0)
        # probability mass: point masses at the modes fitted to the Hann-tapered code (without the
        # decoder's filter: rho moves where modes are found, not how much each holds)
        mass = self._mode_mass(raw, all_lat.gather(1, pos), all_lon.gather(1, pos), ok)
        return (
            modes_lat[:, 0].to(out_dtype),
            modes_lon[:, 0].to(out_dtype),
            modes_score[:, 0].to(out_dtype),
            modes_lat.to(out_dtype),
            modes_lon.to(out_dtype),
            modes_score.to(out_dtype),
            mass.to(out_dtype),
        )

    def _mode_mass(self, c, lat, lon, ok) -> torch.Tensor:
        """Mode masses ``[b, k]`` of codes ``c [b, D]`` (float64, unfiltered) with modes at
        ``lat/lon [b, k]`` (``ok``: the mode exists). The non-negative weights a of point masses at the modes
        that best reproduce the code at the tapered resolution, min || T (c - sum_j a_j Y(x_j)) ||^2 with
        T = :meth:`mass_weights` (normal equations by the addition theorem: G_ij = sum_l T_l^2 (2l+1)/(4 pi)
        P_l(cos g_ij), r_j = the T^2-filtered sphere function at x_j; negative weights are dropped and the
        rest refitted), as shares of the code's total mass c_00 sqrt(4 pi) (or of sum a where larger). A
        clean mixture sum_j w_j c(x_j) gets exactly w at its points, and a ringing side lobe found as a
        mode gets ~0. Masses are >= 0 and sum to <= 1: the rest lies away from the modes."""
        b, k = lat.shape
        t2 = self.mass_weights() ** 2
        lat = torch.where(ok, lat, lat[:, :1])
        lon = torch.where(ok, lon, lon[:, :1])
        xyz = latlon_to_xyz(lat, lon)  # [b, k, 3]
        cos = (xyz[:, :, None] * xyz[:, None]).sum(-1).clamp(-1.0, 1.0)  # [b, k, k]
        l = torch.arange(self.max_degree + 1, dtype=torch.float64)
        gram = legendre_table(self.max_degree, cos) @ ((2 * l + 1) / (4 * math.pi) * t2)
        rhs = evaluate_at_points(c * self.expand(t2), lat, lon)  # [b, k]
        eye = torch.eye(k, dtype=torch.float64)
        active = ok.clone()
        for _ in range(k):
            both = active[:, :, None] & active[:, None, :]
            ridge = 1e-9 * gram.diagonal(dim1=1, dim2=2).amax(1)[:, None, None] * eye
            g = torch.where(both, gram, eye) + ridge
            a = torch.linalg.solve(g, torch.where(active, rhs, 0.0))
            if not (active & (a < 0)).any():
                break
            active = active & (a >= 0)
        a = torch.where(active, a, 0.0).clamp_min(0.0)
        total = c[:, 0] * math.sqrt(4 * math.pi)  # the integral of the code's sphere function
        return a / torch.maximum(total, a.sum(1)).clamp_min(1e-300)[:, None]

    def _refine(self, cf, lat, lon, spacing_km: float, iters: int):
        """Refine seeds ``lat/lon [b, R]`` (degrees, float64) of codes ``cf [b, D]`` (see _refine_torch)."""
        kern = _kernels() if cf.device.type == "cpu" else None
        if kern is None:
            return self._refine_torch(cf, lat, lon, spacing_km, iters)
        b, R = lat.shape
        out = [torch.empty((b, R), dtype=torch.float64) for _ in range(3)]
        kern.run_split(
            kern.refine_range, b, torch.get_num_threads(), 8,
            cf.double().contiguous().numpy(), lat.double().contiguous().numpy(),
            lon.double().contiguous().numpy(), 0.5 * spacing_km / EARTH_RADIUS_KM, iters, self.max_degree,
            *kernel_tables(self.max_degree), *(o.numpy() for o in out),
        )
        return tuple(out)

    def _refine_torch(self, cf, lat, lon, spacing_km: float, iters: int):
        """Newton ascent from seeds ``[b, R]``: each iteration fits a quadratic to a 3x3 stencil of step h
        in the local tangent plane (finite differences) and moves to its vertex (clamped to 1.5 h), or to
        the best stencil point where the fit is not concave; h shrinks 4x per iteration from half the grid
        spacing. Returns the best point evaluated per seed and its value (float64)."""
        b, R = lat.shape
        p = latlon_to_xyz(lat, lon)  # [b, R, 3]
        best_val = torch.full((b, R), -torch.inf, dtype=torch.float64)
        best_p = p
        u = torch.tensor([0, 1, -1, 0, 0, 1, 1, -1, -1], dtype=torch.float64)  # east
        v = torch.tensor([0, 0, 0, 1, -1, 1, -1, 1, -1], dtype=torch.float64)  # north
        h = 0.5 * spacing_km / EARTH_RADIUS_KM  # radians
        for _ in range(iters):
            east, north = tangent_frame(p)
            q = p[:, :, None] + h * (u[:, None] * east[:, :, None] + v[:, None] * north[:, :, None])
            q = q / q.norm(dim=-1, keepdim=True)  # [b, R, 9, 3]
            qlat, qlon = xyz_to_latlon(q)
            f = evaluate_at_points(cf, qlat.reshape(b, -1), qlon.reshape(b, -1)).reshape(b, R, 9)
            fmax, imax = f.max(-1)
            improved = fmax > best_val
            best_val = torch.where(improved, fmax, best_val)
            q_best = q.gather(2, imax[..., None, None].expand(-1, -1, 1, 3))[:, :, 0]
            best_p = torch.where(improved[..., None], q_best, best_p)
            f0, fe, fw, fn, fs, fne, fse, fnw, fsw = f.unbind(-1)
            gx, gy = (fe - fw) / (2 * h), (fn - fs) / (2 * h)
            hxx, hyy = (fe + fw - 2 * f0) / h**2, (fn + fs - 2 * f0) / h**2
            hxy = (fne - fse - fnw + fsw) / (4 * h**2)
            det = hxx * hyy - hxy**2
            concave = (hxx < 0) & (det > 0)
            safe_det = torch.where(concave, det, torch.ones_like(det))
            dx = -(hyy * gx - hxy * gy) / safe_det
            dy = -(hxx * gy - hxy * gx) / safe_det
            length = torch.hypot(dx, dy)
            one = torch.ones_like(length)
            shrink = torch.where(length > 1.5 * h, 1.5 * h / length.clamp_min(1e-300), one)
            dx, dy = dx * shrink, dy * shrink
            # not concave: step to the best stencil point
            dx = torch.where(concave, dx, h * u[imax])
            dy = torch.where(concave, dy, h * v[imax])
            step = p + dx[..., None] * east + dy[..., None] * north
            p = step / step.norm(dim=-1, keepdim=True)
            h = h / 4
        plat, plon = xyz_to_latlon(p)
        f_end = evaluate_at_points(cf, plat, plon)
        improved = f_end > best_val
        best_val = torch.where(improved, f_end, best_val)
        best_p = torch.where(improved[..., None], p, best_p)
        out_lat, out_lon = xyz_to_latlon(best_p)
        return out_lat, out_lon, best_val


def _greedy_separated(xyz: torch.Tensor, val: torch.Tensor, k: int, cos_sep: float):
    """Greedy non-maximum suppression over candidates sorted by value (descending), batched over rows:
    positions ``[b, k]`` of the chosen ones (strongest first) and whether each exists. Candidates with a
    non-finite value are skipped."""
    b, m = val.shape
    kern = _kernels() if val.device.type == "cpu" else None
    if kern is not None:
        pos = torch.empty((b, k), dtype=torch.long)
        found = torch.empty((b, k), dtype=torch.bool)
        kern.run_split(
            kern.greedy_separated_range, b, 1, 1, xyz.double().contiguous().numpy(),
            torch.isfinite(val).contiguous().numpy(), float(cos_sep), pos.numpy(), found.numpy(),
        )
        return pos, found
    alive = torch.isfinite(val)
    ar = torch.arange(m).expand(b, m)
    rows = torch.arange(b)
    chosen, found = [], []
    for _ in range(k):
        pos = torch.where(alive, ar, m).min(dim=1).values  # first alive
        ok = pos < m
        pos = pos.clamp_max(m - 1)
        chosen.append(pos)
        found.append(ok)
        centre = xyz[rows, pos]  # [b, 3]
        near = (xyz * centre[:, None]).sum(-1) >= cos_sep
        alive = alive & ~(near & ok[:, None])
    return torch.stack(chosen, 1), torch.stack(found, 1)
