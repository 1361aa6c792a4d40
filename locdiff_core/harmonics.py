"""Real orthonormal spherical harmonics to high degree, batched over points and vectorised over orders.

Basis (docs/design.md §3): for degree l = 0..L and order m = -l..l, at colatitude theta and longitude phi,

    Y_lm = sqrt(2) * Pbar_l^m(cos theta) * cos(m phi)      m > 0
    Y_l0 = Pbar_l^0(cos theta)
    Y_lm = sqrt(2) * Pbar_l^|m|(cos theta) * sin(|m| phi)  m < 0

where Pbar_l^m = sqrt((2l+1)/(4 pi) * (l-m)!/(l+m)!) * P_l^m is the fully normalised associated Legendre
function WITHOUT the Condon-Shortley phase. Y_lm sits at index l*l + l + m; there are (L+1)**2 functions.
Each is orthonormal over the unit sphere: integral of Y_i * Y_j dOmega = delta_ij.

Algorithm. The standard fully-normalised three-term recurrence in the degree (e.g. Holmes & Featherstone,
J. Geodesy 76, 2002):

    Pbar_0^0 = 1/sqrt(4 pi)
    Pbar_m^m = sqrt((2m+1)/(2m)) * sin(theta) * Pbar_{m-1}^{m-1}
    Pbar_l^m = a_lm * (cos(theta) * Pbar_{l-1}^m - b_lm * Pbar_{l-2}^m),
    a_lm = sqrt((4l^2-1)/(l^2-m^2)),  b_lm = sqrt(((l-1)^2-m^2)/(4(l-1)^2-1))

The loop runs over the degree l; every step updates all orders m < l at once for all points. The sectoral
seeds Pbar_m^m ~ sin(theta)^m underflow long before L = 1000 (in float32 already near L = 60 close to the
poles), which is where peer code produces zeros or NaNs. We therefore carry every order's column as a
mantissa and a power-of-two exponent (the "extended range" idea of Fukushima, J. Geodesy 86, 2012): the
seed is built in log space in float64, the mantissa is renormalised when it grows, and the exponent is
applied only when a value is written out. Values that truly lie below the dtype's range flush to zero.

Two implementations of the same mathematics. On the CPU without autograd (the common case: encoding,
anchor bases, decoding) a fused per-point numba kernel (:mod:`locdiff_core._kernels`) computes each point's
basis in float64 in cache and writes it once, close to the memory-write limit. Where autograd is asked for,
or on another device (CUDA), the torch degree loop below runs instead. Set the environment variable
``LOCDIFF_SH_BACKEND=torch`` to force the torch loop everywhere (for comparisons).
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import numpy as np
import torch

from locdiff_core._checks import check_degree, check_latlon
from locdiff_core.outpool import empty_output

_LN2 = math.log(2.0)
# Renormalise a column when its mantissa exceeds 2**_RENORM_BITS; checked every _RENORM_EVERY degrees.
# Growth per degree step is at most a_lm <= sqrt(2l+1) (~45 at L = 1000), so 4 steps add < 2**23.
_RENORM_EVERY = 4
_RENORM_BITS = {torch.float32: 40, torch.float64: 300}
_FLOAT32_MAX_DEGREE = 128
_CHUNK_POINTS = 4096


def num_coefficients(max_degree: int) -> int:
    """(L+1)**2: the number of real spherical harmonics of degree <= L."""
    return (check_degree(max_degree) + 1) ** 2


def degree_index(max_degree: int) -> torch.Tensor:
    """The degree l of every coefficient, shape ``[(L+1)**2]`` (useful to expand per-degree weights)."""
    L = check_degree(max_degree)
    return torch.repeat_interleave(torch.arange(L + 1), 2 * torch.arange(L + 1) + 1)


@lru_cache(maxsize=16)
def _recurrence_coefficients(L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a[l, m], b[l, m] for 0 <= m < l <= L and log of the sectoral constant, all float64."""
    l = torch.arange(L + 1, dtype=torch.float64)[:, None]
    m = torch.arange(L + 1, dtype=torch.float64)[None, :]
    valid = m < l
    den_a = torch.where(valid, l * l - m * m, torch.ones(()))
    a = torch.where(valid, torch.sqrt((4 * l * l - 1) / den_a), torch.zeros(()))
    num_b = (l - 1) ** 2 - m * m
    den_b = 4 * (l - 1) ** 2 - 1
    b = torch.where(valid & (num_b > 0), torch.sqrt(num_b.clamp_min(0) / den_b.clamp_min(1)), torch.zeros(()))
    k = torch.arange(1, L + 1, dtype=torch.float64)
    log_seed = torch.cat(
        [torch.zeros(1, dtype=torch.float64), torch.cumsum(0.5 * torch.log((2 * k + 1) / (2 * k)), 0)]
    )
    log_seed = log_seed - 0.5 * math.log(4 * math.pi)
    return a, b, log_seed


@lru_cache(maxsize=16)
def kernel_tables(L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float64 numpy tables for the numba kernel: a[l, m], a*b[l, m], k[m] = sqrt((2m+1)/(2m)) and
    log2 of the sectoral constants sqrt(1/(4 pi)) * prod_{j<=m} k[j]."""
    a, b, log_seed = _recurrence_coefficients(L)
    k = np.ones(L + 1)
    mm = np.arange(1, L + 1, dtype=np.float64)
    k[1:] = np.sqrt((2 * mm + 1) / (2 * mm))
    return (
        np.ascontiguousarray(a.numpy()),
        np.ascontiguousarray((a * b).numpy()),
        k,
        log_seed.numpy() / _LN2,
    )


_kernels_module = None


def _kernels():
    """The numba kernels, imported on first use (numba's import costs ~0.5 s); None if unavailable."""
    global _kernels_module
    if _kernels_module is None:
        if os.environ.get("LOCDIFF_SH_BACKEND", "").lower() == "torch":
            return None
        try:
            from locdiff_core import _kernels as k
        except ImportError:  # numba missing or broken: the torch loop still works
            _kernels_module = False
            return None
        _kernels_module = k
    return _kernels_module or None


def _real_sph_harm_numba(k, lat: torch.Tensor, lon: torch.Tensor, L: int, out_dtype) -> torch.Tensor:
    lat64 = np.ascontiguousarray(lat.detach().to(torch.float64).numpy())
    lon64 = np.ascontiguousarray(lon.detach().to(torch.float64).numpy())
    out = empty_output(lat64.shape[0], (L + 1) ** 2, out_dtype)
    # threads follow torch's setting (torch.set_num_threads), so both libraries share one budget
    k.run_split(k.sph_harm_range, lat64.shape[0], torch.get_num_threads(), 256,
                lat64, lon64, L, *kernel_tables(L), out.numpy())
    return out


def evaluate_at_points(coeffs: torch.Tensor, lat_deg: torch.Tensor, lon_deg: torch.Tensor) -> torch.Tensor:
    """``f_b(p) = sum_i coeffs[b, i] Y_i(lat[b, p], lon[b, p])`` in float64: ``[B, D], [B, P] -> [B, P]``.

    Each code is evaluated at its own points without materialising their basis (the fused kernel on the
    CPU; elsewhere, or without numba, the basis is computed and contracted). No autograd.
    """
    B, D = coeffs.shape
    L = math.isqrt(D) - 1
    if (L + 1) ** 2 != D:
        raise ValueError(f"coeffs must have (L+1)**2 columns, got {D}")
    k = _kernels() if coeffs.device.type == "cpu" else None
    if k is None:
        with torch.no_grad():
            y = real_sph_harm(lat_deg.to(torch.float64), lon_deg.to(torch.float64), L)  # [B, P, D]
            return torch.einsum("bpd,bd->bp", y, coeffs.to(torch.float64))
    c = np.ascontiguousarray(coeffs.detach().to(torch.float64).numpy())
    la = np.ascontiguousarray(lat_deg.detach().to(torch.float64).numpy())
    lo = np.ascontiguousarray(lon_deg.detach().to(torch.float64).numpy())
    out = np.empty(la.shape, dtype=np.float64)
    k.run_split(k.sph_eval_range, B, torch.get_num_threads(), 16, c, la, lo, L, *kernel_tables(L), out)
    return torch.from_numpy(out)


def _degree_loop(out, x, seed, expo, cos_m, sin_m, a_tab, b_tab, grad: bool) -> None:
    """Run the degree recurrence for one set of points and write ``out [D, n]`` (see module docstring)."""
    L = seed.shape[0] - 1
    dtype = seed.dtype
    ab_tab = a_tab * b_tab
    bits = _RENORM_BITS[dtype]
    thresh = 2.0**bits
    one = torch.ones((), dtype=dtype, device=seed.device)

    def scaled_factors(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.exp2(e)
        return cos_m * scale, (sin_m * scale).flip(0)  # sine rows reversed: m = L..0

    cs, ss_rev = scaled_factors(expo)
    bufs = None if grad else torch.empty((3, L + 1, x.shape[0]), dtype=dtype, device=seed.device)
    p1 = seed[:1]  # Pbar_{l-1}^m for m = 0..l-1 (mantissas)                           [l, n]
    p2 = seed[:0]  # Pbar_{l-2}^m for m = 0..l-2                                      [l-1, n]
    out[0:1] = p1 * cs[:1]
    for l in range(1, L + 1):
        a = a_tab[l, :l, None]  # [l, 1]
        ab = ab_tab[l, : l - 1, None]  # [l-1, 1]
        if grad:  # out of place, so autograd can follow
            rec = a * x * p1  # [l, n]
            cur = torch.cat([rec[: l - 1] - ab * p2, rec[l - 1 :], seed[l : l + 1]])  # Pbar_l^m   [l+1, n]
        else:
            cur = bufs[l % 3, : l + 1]
            torch.mul(p1, x, out=cur[:l])
            cur[:l].mul_(a)
            cur[: l - 1].addcmul_(p2, ab, value=-1.0)
            cur[l] = seed[l]
        if l % _RENORM_EVERY == 0:
            big = cur.detach().abs() > thresh  # [l+1, n]
            if bool(big.any()):
                shrink = torch.where(big, one * 2.0**-bits, one)
                cur = cur * shrink
                p1 = p1 * shrink[:l]
                expo = torch.cat([expo[: l + 1] + big.to(dtype) * bits, expo[l + 1 :]])
                cs, ss_rev = scaled_factors(expo)
        base = l * l + l
        if grad:
            out[base : base + l + 1] = cur * cs[: l + 1]  # m = 0..l
            out[l * l : base] = cur[1:].flip(0) * ss_rev[L - l : L]  # m = -l..-1
        else:
            torch.mul(cur, cs[: l + 1], out=out[base : base + l + 1])
            torch.mul(cur[1:].flip(0), ss_rev[L - l : L], out=out[l * l : base])
        p2, p1 = p1, cur


def real_sph_harm(lat_deg, lon_deg, max_degree: int) -> torch.Tensor:
    """Real orthonormal spherical harmonics at the given points.

    Args:
        lat_deg, lon_deg: latitudes in [-90, 90] and longitudes (any value; periodic) in degrees, same
            shape ``[...]``, float32 or float64 (the output has the same dtype). Differentiable.
        max_degree: L >= 0.

    Returns:
        Tensor ``[..., (L+1)**2]``, the function with degree l and order m at index l*l + l + m.
    """
    lat, lon = check_latlon(lat_deg, lon_deg)
    L = check_degree(max_degree)
    out_dtype = lat.dtype
    grad = torch.is_grad_enabled() and (lat.requires_grad or lon.requires_grad)
    if not grad and lat.device.type == "cpu":
        k = _kernels()
        if k is not None:
            out = _real_sph_harm_numba(k, lat.reshape(-1), lon.reshape(-1), L, out_dtype)
            return out.reshape(*lat.shape, (L + 1) ** 2)
    # float32 recurrences lose ~L*eps per degree; above L = 128 work in float64 and cast at the end.
    dtype = torch.float64 if L > _FLOAT32_MAX_DEGREE else out_dtype
    batch_shape = lat.shape
    lat, lon = lat.reshape(-1), lon.reshape(-1)
    n = lat.numel()
    D = (L + 1) ** 2
    a_tab, b_tab, log_seed = _recurrence_coefficients(L)
    dev = lat.device  # the tables are cached on the CPU; everything below runs on the points' device
    a_tab, b_tab, log_seed = a_tab.to(dev, dtype), b_tab.to(dev, dtype), log_seed.to(dev)

    lat64 = torch.deg2rad(lat.to(torch.float64))
    lon64 = torch.deg2rad(lon.to(torch.float64))
    x = torch.sin(lat64).to(dtype)  # cos(theta)                                      [N]
    s64 = torch.cos(lat64).clamp_min(1e-300)  # sin(theta) >= 0                       [N]
    m64 = torch.arange(L + 1, dtype=torch.float64, device=dev)

    # Sectoral seeds Pbar_m^m = exp(log_seed[m] + m log sin(theta)) as mantissa * 2**exponent.
    log_pmm = log_seed[:, None] + m64[:, None] * torch.log(s64)[None, :]  # [L+1, N]
    expo = torch.floor(log_pmm.detach() / _LN2)  # integer-valued, no gradient        [L+1, N]
    seed = torch.exp(log_pmm - expo * _LN2).to(dtype)  # mantissa in [1, 2)            [L+1, N]
    expo = expo.to(dtype)

    # Longitude factors, in float64 so m*phi stays accurate at high order; sqrt(2) folded in for m > 0.
    mphi = m64[:, None] * lon64[None, :]  # [L+1, N]
    w = torch.full((L + 1, 1), math.sqrt(2.0), dtype=torch.float64, device=dev)
    w[0] = 1.0
    cos_m = (w * torch.cos(mphi)).to(dtype)  # [L+1, N]
    sin_m = (w * torch.sin(mphi)).to(dtype)  # [L+1, N] (row 0 unused)

    if grad:  # one pass over all points, out of place, so autograd can follow
        buf = torch.empty((D, n), dtype=dtype, device=lat.device)
        _degree_loop(buf, x, seed, expo, cos_m, sin_m, a_tab, b_tab, grad=True)
        out = buf.T
    else:
        # chunks of points whose working buffers stay in cache; each chunk is transposed into the
        # point-major result with one blocked copy
        out = torch.empty((n, D), dtype=dtype, device=lat.device)
        buf = torch.empty((D, min(n, _CHUNK_POINTS)), dtype=dtype, device=lat.device)
        for start in range(0, n, _CHUNK_POINTS):
            sl = slice(start, min(start + _CHUNK_POINTS, n))
            view = buf[:, : sl.stop - sl.start]
            _degree_loop(
                view, x[sl], seed[:, sl], expo[:, sl], cos_m[:, sl], sin_m[:, sl], a_tab, b_tab, False
            )
            out[sl] = view.T
    return out.to(out_dtype).reshape(*batch_shape, D)
