"""Fused per-point CPU kernels for the real spherical harmonics (numba), imported lazily.

The torch implementation in :mod:`locdiff_core.harmonics` runs the degree recurrence as ~7 tensor passes
per degree over all points: memory-bound, it moves the result through memory many times. Here every point's
whole basis is computed in registers and L1 cache and written once, which brings the cost close to the
cost of writing the result. The mathematics is the one of the module docstring of ``harmonics``:

* the fully normalised recurrence in the degree (Holmes & Featherstone, J. Geodesy 76, 2002), run in
  float64 whatever the output dtype, so float32 output is the float64 value rounded once;
* sectoral seeds Pbar_m^m = sqrt((2m+1)/(2m)) sin(theta) Pbar_{m-1}^{m-1} in float64. Where a seed falls
  below 2**-900 (high orders near the poles at high degree: in practice only for L above a few hundred,
  or within a hair of the poles) the plain recurrence would lose it to underflow. Those orders, and only
  those, run separately with an extended-range number (mantissa * 2**exponent, renormalised when it grows,
  the "X-number" of Fukushima, J. Geodesy 86, 2012) whose value is rounded into the output dtype at the
  end (true values below the dtype's range flush to zero);
* cos(m phi), sin(m phi) by the angle-addition recurrence, re-anchored on the library cos/sin every 64
  orders so that its rounding error stays at the 1e-15 level.

Importing numba costs ~0.5 s, so nothing imports this module until a harmonic is computed on the CPU.
``cache=True`` stores the compiled machine code next to this file (or, where that is not writable, in
numba's per-user cache directory), so the one-time compile (~seconds) happens once per machine.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

_TINY = 2.0**-900  # seeds below this take the extended-range path
_RENORM = 2.0**200  # extended-range mantissas are renormalised above this
_RENORM_BITS = 200
_RESYNC = 64  # re-anchor the cos/sin(m phi) recurrence every _RESYNC orders



W = 8  # points per SIMD block: every lane of a vector register holds a different point (_ld reads 8)

# Numba leaves LLVM's SLP vectoriser off by default; the block kernel below is written for it (8 lanes
# loaded as a tuple, then stored), so it is switched on while this module's kernels compile, then restored.
_slp_before = numba.config.SLP_VECTORIZE
numba.config.SLP_VECTORIZE = 1


@numba.njit(inline="always")
def _ld(a, m):
    """Row m of a ``[*, W]`` array as a tuple of W values."""
    return (a[m, 0], a[m, 1], a[m, 2], a[m, 3], a[m, 4], a[m, 5], a[m, 6], a[m, 7])



@numba.njit(cache=True, fastmath={"contract"}, boundscheck=False)
def _block(lat_deg, lon_deg, L, a_tab, ab_tab, k_tab, log2_seed, work, dst, r0, coef, acc):
    """The real harmonics of W points at once (lane w = point w).

    With ``acc`` of length 0, write the basis of point w into ``dst[r0 + w]``; otherwise add
    ``sum_i coef[i] Y_i(point w)`` to ``acc[w]`` without storing the basis. ``work`` is scratch
    ``[7 * (L+1) + 5, W]`` float64.
    """
    store = acc.shape[0] == 0
    n1 = L + 1
    p_a = work[0:n1]
    p_b = work[n1 : 2 * n1]
    cs = work[2 * n1 : 3 * n1]
    sn = work[3 * n1 : 4 * n1]
    seed = work[4 * n1 : 5 * n1]
    acc_c = work[5 * n1 + 5 : 6 * n1 + 5]
    acc_s = work[6 * n1 + 5 : 7 * n1 + 5]
    if not store:
        acc_c[:] = 0.0
        acc_s[:] = 0.0
    x = work[5 * n1]
    s = work[5 * n1 + 1]
    phi = work[5 * n1 + 2]
    sqrt2 = math.sqrt(2.0)
    for w in range(W):
        lat = lat_deg[w] * (math.pi / 180.0)
        phi[w] = lon_deg[w] * (math.pi / 180.0)
        x[w] = math.sin(lat)  # cos(theta)
        s[w] = max(math.cos(lat), 0.0)  # sin(theta)
        cs[0, w] = 1.0
        sn[0, w] = 0.0
        seed[0, w] = 0.28209479177387814  # 1 / sqrt(4 pi)
        p_a[0, w] = 0.0
    # cos/sin(m phi) with sqrt(2) folded in for m > 0: angle addition, (c, s)(m) = (c, s)(m-1) rotated
    # by phi, re-anchored on the library cos/sin every _RESYNC orders
    c1 = work[5 * n1 + 3]
    s1 = work[5 * n1 + 4]
    for w in range(W):
        c1[w] = math.cos(phi[w])
        s1[w] = math.sin(phi[w])
    for m in range(1, n1):
        if m % _RESYNC == 0:
            for w in range(W):
                cs[m, w] = sqrt2 * math.cos(m * phi[w])
                sn[m, w] = sqrt2 * math.sin(m * phi[w])
        elif m == 1:
            for w in range(W):
                cs[1, w] = sqrt2 * c1[w]
                sn[1, w] = sqrt2 * s1[w]
        else:
            for w in range(W):
                cs[m, w] = cs[m - 1, w] * c1[w] - sn[m - 1, w] * s1[w]
                sn[m, w] = sn[m - 1, w] * c1[w] + cs[m - 1, w] * s1[w]
    # sectoral seeds; orders from the first one whose seed nears float64's range (in any lane) run apart
    m_safe = n1
    for m in range(1, n1):
        low = False
        for w in range(W):
            v = seed[m - 1, w] * k_tab[m] * s[w]
            seed[m, w] = v
            if v < _TINY and v != 0.0:
                low = True
        if low:
            m_safe = m
            break

    # plain float64 recurrence over the degree, orders 0..min(l, m_safe - 1), all lanes at once
    xs = _ld(work, 5 * n1)
    p1 = p_a  # Pbar_{l-1}^m
    p2 = p_b  # Pbar_{l-2}^m, overwritten with Pbar_l^m
    for l in range(n1):
        mlim = min(l + 1, m_safe)
        a_row = a_tab[l]
        ab_row = ab_tab[l]
        for m in range(min(l - 1, mlim)):
            am = a_row[m]
            abm = ab_row[m]
            q = _ld(p1, m)  # all loads before the stores: lets LLVM's SLP pass use one vector per row
            r = _ld(p2, m)
            for w in range(W):
                p2[m, w] = am * xs[w] * q[w] - abm * r[w]
        if l >= 1 and l - 1 < mlim:
            am = a_row[l - 1]
            q = _ld(p1, l - 1)
            for w in range(W):
                p2[l - 1, w] = am * xs[w] * q[w]
        if l < mlim:
            for w in range(W):
                p2[l, w] = seed[l, w]
        base = l * l + l
        if store:
            for w in range(W):
                dst[r0 + w, base] = p2[0, w]
            # unsigned columns: a signed base - m would get numba's negative-index wraparound on every
            # store (a sign test and an add per element, ~10 % of the whole kernel)
            ub = numba.uint64(base)
            for m in range(1, mlim):
                v = _ld(p2, m)
                c = _ld(cs, m)
                t = _ld(sn, m)
                um = numba.uint64(m)
                for w in range(W):
                    dst[r0 + w, ub + um] = v[w] * c[w]
                    dst[r0 + w, ub - um] = v[w] * t[w]
        else:  # per-order sums over the degree; the longitude factors are applied once at the end
            for m in range(mlim):
                cp = coef[base + m]
                cn = coef[base - m]
                v = _ld(p2, m)
                ac = _ld(acc_c, m)
                an = _ld(acc_s, m)
                for w in range(W):
                    acc_c[m, w] = ac[w] + cp * v[w]
                    acc_s[m, w] = an[w] + cn * v[w]
        p1, p2 = p2, p1

    if not store:
        for w in range(W):
            acc[w] += acc_c[0, w]
        for m in range(1, m_safe):
            for w in range(W):
                acc[w] += acc_c[m, w] * cs[m, w] + acc_s[m, w] * sn[m, w]

    # extended-range orders (rare), lane by lane, each order on its own: mantissa * 2**e
    for w in range(W):
        for m in range(m_safe, n1):
            if s[w] == 0.0:  # at a pole every order m > 0 vanishes exactly
                vals_zero = True
            else:
                vals_zero = False
                lg = log2_seed[m] + m * math.log2(s[w])
                e = math.floor(lg)
                q1 = 2.0 ** (lg - e)  # mantissa of Pbar_m^m, in [1, 2)
                q2 = 0.0
                ei = int(e)
            for l in range(m, n1):
                if vals_zero:
                    v = 0.0
                else:
                    if l > m:
                        q = a_tab[l, m] * x[w] * q1 - ab_tab[l, m] * q2
                        q2 = q1
                        q1 = q
                        if abs(q1) > _RENORM:
                            q1 *= 1.0 / _RENORM
                            q2 *= 1.0 / _RENORM
                            ei += _RENORM_BITS
                    v = math.ldexp(q1, ei) if ei > -1100 else 0.0
                base = l * l + l
                if store:
                    dst[r0 + w, base + m] = v * cs[m, w]
                    dst[r0 + w, base - m] = v * sn[m, w]
                else:
                    acc[w] += v * (cs[m, w] * coef[base + m] + sn[m, w] * coef[base - m])


_F64 = numba.float64[::1]
_T64 = numba.float64[:, ::1]
_SIG_ARGS = (_F64, _F64, numba.int64, _T64, _T64, _F64, _F64)
_JIT = dict(cache=True, nogil=True, fastmath={"contract"}, boundscheck=False)


@numba.njit([(*_SIG_ARGS, numba.float32[:, ::1], numba.int64, numba.int64),
             (*_SIG_ARGS, _T64, numba.int64, numba.int64)], **_JIT)
def sph_harm_range(lat_deg, lon_deg, L, a_tab, ab_tab, k_tab, log2_seed, out, start, stop):
    """``out[i]`` = the real harmonics of point i, for points ``start <= i < stop`` (blocks of W)."""
    D = (L + 1) * (L + 1)
    no_coef = np.empty(0)
    no_acc = np.empty(0)
    work = np.empty((7 * (L + 1) + 5, W))
    la = np.empty(W)
    lo = np.empty(W)
    tail = np.empty((W, D), dtype=out.dtype)
    for i0 in range(start, stop, W):
        if i0 + W <= stop:
            _block(lat_deg[i0 : i0 + W], lon_deg[i0 : i0 + W], L, a_tab, ab_tab, k_tab, log2_seed,
                   work, out, i0, no_coef, no_acc)
        else:  # last partial block: pad with its last point, compute into a side buffer, copy
            for w in range(W):
                la[w] = lat_deg[min(i0 + w, stop - 1)]
                lo[w] = lon_deg[min(i0 + w, stop - 1)]
            _block(la, lo, L, a_tab, ab_tab, k_tab, log2_seed, work, tail, 0, no_coef, no_acc)
            for w in range(stop - i0):
                out[i0 + w] = tail[w]


@numba.njit([(_T64, _T64, _T64, numba.int64, _T64, _T64, _F64, _F64, _T64, numba.int64, numba.int64)],
            **_JIT)
def sph_eval_range(coeffs, lat_deg, lon_deg, L, a_tab, ab_tab, k_tab, log2_seed, out, start, stop):
    """``out[b, p] = sum_i coeffs[b, i] Y_i(lat[b, p], lon[b, p])`` for codes ``start <= b < stop``,
    without materialising the basis."""
    P = lat_deg.shape[1]
    no_dst = np.empty((0, 0))
    work = np.empty((7 * (L + 1) + 5, W))
    la = np.empty(W)
    lo = np.empty(W)
    acc = np.empty(W)
    for b in range(start, stop):
        for p0 in range(0, P, W):
            for w in range(W):
                q = min(p0 + w, P - 1)
                la[w] = lat_deg[b, q]
                lo[w] = lon_deg[b, q]
                acc[w] = 0.0
            _block(la, lo, L, a_tab, ab_tab, k_tab, log2_seed, work, no_dst, 0, coeffs[b], acc)
            for w in range(min(W, P - p0)):
                out[b, p0 + w] = acc[w]



_pool: tuple[int, int, ThreadPoolExecutor] | None = None


def run_split(fn, n: int, threads: int, min_per_thread: int, *args) -> None:
    """Run ``fn(*args, start, stop)`` over ``[0, n)`` split into ``threads`` contiguous ranges.

    The kernels release the GIL, so plain Python threads run them in parallel. This avoids numba's own
    threading layers: its OpenMP layer leaves spinning threads that slowed every later torch operation
    ~100x here, and its workqueue layer is neither thread- nor fork-safe (Prefect runs tasks in threads).
    """
    global _pool
    threads = max(1, min(threads, n // max(1, min_per_thread)))
    if threads == 1:
        fn(*args, 0, n)
        return
    pid = os.getpid()
    if _pool is None or _pool[0] != pid or _pool[1] < threads:  # a forked child builds its own pool
        _pool = (pid, threads, ThreadPoolExecutor(threads, thread_name_prefix="locdiff-sh"))
    bounds = [n * t // threads for t in range(threads + 1)]
    futures = [_pool[2].submit(fn, *args, bounds[t], bounds[t + 1]) for t in range(threads)]
    for f in futures:
        f.result()


@numba.njit(
    [(numba.float64[:, :, ::1], numba.boolean[:, ::1], numba.float64, numba.int64[:, ::1],
      numba.boolean[:, ::1], numba.int64, numba.int64)],
    **_JIT,
)
def greedy_separated_range(xyz, valid, cos_sep, pos, found, start, stop):
    """Greedy non-maximum suppression for rows ``start <= b < stop``: walk the candidates ``xyz [b, m, 3]``
    (sorted strongest first; ``valid`` marks usable ones) and keep each one farther than ``cos_sep`` from
    every kept one, up to ``k = pos.shape[1]``. ``pos [b, k]``: kept positions; ``found``: whether kept."""
    m = xyz.shape[1]
    k = pos.shape[1]
    for b in range(start, stop):
        n = 0
        for i in range(m):
            if n == k:
                break
            if not valid[b, i]:
                continue
            ok = True
            for j in range(n):
                q = pos[b, j]
                c = xyz[b, i, 0] * xyz[b, q, 0] + xyz[b, i, 1] * xyz[b, q, 1] + xyz[b, i, 2] * xyz[b, q, 2]
                if c >= cos_sep:
                    ok = False
                    break
            if ok:
                pos[b, n] = i
                found[b, n] = True
                n += 1
        for j in range(n, k):
            pos[b, j] = 0
            found[b, j] = False


# 3x3 stencil in the tangent plane: (east, north) offsets in steps of h
_SU = np.array([0.0, 1.0, -1.0, 0.0, 0.0, 1.0, 1.0, -1.0, -1.0])
_SV = np.array([0.0, 0.0, 0.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0])


@numba.njit(cache=True, inline="always")
def _move(lat, lon, de, dn):
    """Point reached from (lat, lon) [radians] by the tangent displacement (de east, dn north) [radians],
    projected back onto the sphere."""
    cl, sl, co, so = math.cos(lat), math.sin(lat), math.cos(lon), math.sin(lon)
    x = cl * co - de * so - dn * sl * co
    y = cl * so + de * co - dn * sl * so
    z = sl + dn * cl
    return math.atan2(z, math.hypot(x, y)), math.atan2(y, x)


@numba.njit(
    [(_T64, _T64, _T64, numba.float64, numba.int64, numba.int64, _T64, _T64, _F64, _F64,
      _T64, _T64, _T64, numba.int64, numba.int64)],
    **_JIT,
)
def refine_range(coeffs, lat0, lon0, h0, iters, L, a_tab, ab_tab, k_tab, log2_seed,
                 out_lat, out_lon, out_val, start, stop):
    """Newton ascent of the sphere function of each code from its seeds ``lat0/lon0 [B, R]`` (degrees),
    for codes ``start <= b < stop``. Each iteration evaluates a 3x3 stencil of step h (radians) in the
    local tangent plane around every seed, fits a quadratic by finite differences and moves to its vertex
    (at most 1.5 h away) where it is concave, else to the best stencil point; h shrinks 4x per iteration.
    The best point evaluated (the last position included) is returned with its value."""
    R = lat0.shape[1]
    npts = R * 9
    nblk = (npts + W - 1) // W
    work = np.empty((7 * (L + 1) + 5, W))
    no_dst = np.empty((0, 0))
    la = np.empty(nblk * W)
    lo = np.empty(nblk * W)
    la_deg = np.empty(nblk * W)
    lo_deg = np.empty(nblk * W)
    f = np.empty(nblk * W)
    acc = np.empty(W)
    cur_lat = np.empty(R)
    cur_lon = np.empty(R)
    deg = 180.0 / math.pi
    for b in range(start, stop):
        c = coeffs[b]
        for r in range(R):
            cur_lat[r] = lat0[b, r] / deg
            cur_lon[r] = lon0[b, r] / deg
            out_val[b, r] = -np.inf
            out_lat[b, r] = lat0[b, r]
            out_lon[b, r] = lon0[b, r]
        h = h0
        for it in range(iters + 1):
            last = it == iters  # the final pass evaluates the last position only
            for r in range(R):
                for s in range(9):
                    if last and s > 0:
                        la[r * 9 + s], lo[r * 9 + s] = cur_lat[r], cur_lon[r]
                    else:
                        la[r * 9 + s], lo[r * 9 + s] = _move(cur_lat[r], cur_lon[r], h * _SU[s], h * _SV[s])
            for i in range(npts, nblk * W):
                la[i] = la[npts - 1]
                lo[i] = lo[npts - 1]
            for i in range(nblk * W):
                la_deg[i] = la[i] * deg
                lo_deg[i] = lo[i] * deg
            for blk in range(nblk):
                for w in range(W):
                    acc[w] = 0.0
                _block(la_deg[blk * W : (blk + 1) * W], lo_deg[blk * W : (blk + 1) * W], L, a_tab,
                       ab_tab, k_tab, log2_seed, work, no_dst, 0, c, acc)
                for w in range(W):
                    f[blk * W + w] = acc[w]
            for r in range(R):
                o = r * 9
                best_s = 0
                for s in range(1, 9):
                    if f[o + s] > f[o + best_s]:
                        best_s = s
                if f[o + best_s] > out_val[b, r]:
                    out_val[b, r] = f[o + best_s]
                    out_lat[b, r] = la[o + best_s] * deg
                    out_lon[b, r] = lo[o + best_s] * deg
                if last:
                    continue
                f0, fe, fw, fn, fs = f[o], f[o + 1], f[o + 2], f[o + 3], f[o + 4]
                fne, fse, fnw, fsw = f[o + 5], f[o + 6], f[o + 7], f[o + 8]
                gx = (fe - fw) / (2 * h)
                gy = (fn - fs) / (2 * h)
                hxx = (fe + fw - 2 * f0) / (h * h)
                hyy = (fn + fs - 2 * f0) / (h * h)
                hxy = (fne - fse - fnw + fsw) / (4 * h * h)
                det = hxx * hyy - hxy * hxy
                if hxx < 0 and det > 0:
                    dx = -(hyy * gx - hxy * gy) / det
                    dy = -(hxx * gy - hxy * gx) / det
                    length = math.hypot(dx, dy)
                    if length > 1.5 * h:
                        dx *= 1.5 * h / length
                        dy *= 1.5 * h / length
                else:
                    dx = h * _SU[best_s]
                    dy = h * _SV[best_s]
                cur_lat[r], cur_lon[r] = _move(cur_lat[r], cur_lon[r], dx, dy)
            h = h / 4


numba.config.SLP_VECTORIZE = _slp_before
