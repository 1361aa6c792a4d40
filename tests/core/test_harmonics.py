"""Real spherical harmonics against an independent oracle (scipy), quadrature orthonormality, range."""

import math

import numpy as np
import pytest
import torch
from scipy.special import sph_harm_y

from locdiff_core.harmonics import degree_index, num_coefficients, real_sph_harm


def scipy_real_sh(lat_deg: np.ndarray, lon_deg: np.ndarray, L: int) -> np.ndarray:
    """Real basis from scipy's complex one: undo the Condon-Shortley phase, take Re/Im with sqrt(2)."""
    theta = np.deg2rad(90.0 - lat_deg)
    phi = np.deg2rad(lon_deg)
    out = np.zeros((lat_deg.size, (L + 1) ** 2))
    for l in range(L + 1):
        m = np.arange(0, l + 1)
        y = sph_harm_y(l, m[:, None], theta[None, :], phi[None, :])  # [l+1, N]
        phase = ((-1.0) ** m)[:, None]
        out[:, l * l + l] = y[0].real
        out[:, l * l + l + m[1:]] = (math.sqrt(2) * phase[1:] * y[1:].real).T
        out[:, l * l + l - m[1:]] = (math.sqrt(2) * phase[1:] * y[1:].imag).T
    return out


def oracle_points(n: int = 60):
    rng = np.random.default_rng(1)
    lat = np.concatenate([rng.uniform(-90, 90, n), [90.0, -90.0, 0.0, 89.9999, -89.99, 45.0, -45.0]])
    lon = np.concatenate([rng.uniform(-180, 180, n), [0.0, 180.0, 180.0, -180.0, 179.9999, -180.0, 180.0]])
    return lat, lon


@pytest.mark.parametrize("L", [0, 1, 7, 32, 100, 200])
def test_matches_scipy_float64(L):
    lat, lon = oracle_points()
    ours = real_sph_harm(torch.tensor(lat), torch.tensor(lon), L).numpy()
    ref = scipy_real_sh(lat, lon, L)
    assert ours.shape == (lat.size, (L + 1) ** 2)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= 1e-10, rel


def test_float32_close_to_float64():
    lat, lon = oracle_points()
    lat32, lon32 = torch.tensor(lat, dtype=torch.float32), torch.tensor(lon, dtype=torch.float32)
    y32 = real_sph_harm(lat32, lon32, 64)
    y64 = real_sph_harm(lat32.double(), lon32.double(), 64)
    assert y32.dtype == torch.float32
    # float32 error grows like L^2 * eps near the poles (cos(theta) is ill-conditioned there)
    assert (y32.double() - y64).abs().max() < 64**2 * 1e-6


def test_orthonormal_by_quadrature_L100():
    L = 100
    # Gauss-Legendre in cos(theta) x equispaced longitudes integrates degree <= 2L exactly
    x, w = np.polynomial.legendre.leggauss(L + 2)
    nphi = 2 * L + 3
    lat = np.rad2deg(np.arcsin(x))
    lon = np.linspace(-180, 180, nphi, endpoint=False)
    LAT, LON = np.meshgrid(lat, lon, indexing="ij")
    W = np.repeat(w, nphi) * (2 * np.pi / nphi)
    y = real_sph_harm(torch.tensor(LAT.ravel()), torch.tensor(LON.ravel()), L)
    # the full 10,201^2 Gram matrix costs TFLOPs; check every degree's first/last functions plus a random
    # sample (all pairs among them)
    D = (L + 1) ** 2
    ends = torch.tensor([l * l for l in range(L + 1)] + [l * l + 2 * l for l in range(L + 1)])
    cols = torch.unique(
        torch.cat([ends, torch.randperm(D, generator=torch.Generator().manual_seed(0))[:300]])
    )
    ys = y[:, cols]
    gram = (ys.T * torch.tensor(W)) @ ys
    assert (gram - torch.eye(cols.numel(), dtype=torch.float64)).abs().max() < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_and_addition_theorem_at_L1000(dtype):
    L = 1000
    lat = torch.tensor([90.0, -90.0, 89.99, 74.3, 56.4, 0.0, -41.4, -82.6], dtype=dtype)
    lon = torch.tensor([0.0, 180.0, -180.0, 10.0, 123.4, 179.999, -73.0, 5.0], dtype=dtype)
    y = real_sph_harm(lat, lon, L)
    assert torch.isfinite(y).all()
    # addition theorem: sum_i Y_i(w)^2 = (L+1)^2 / (4 pi) at every point (underflow would lose mass)
    total = (y.double() ** 2).sum(-1) / ((L + 1) ** 2 / (4 * math.pi))
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert (total - 1).abs().max() < tol


def test_gradients_match_finite_differences():
    lat = torch.tensor([12.0, -60.0, 80.0], dtype=torch.float64, requires_grad=True)
    lon = torch.tensor([30.0, 170.0, -100.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: real_sph_harm(a, b, 6), (lat, lon))
    # the autograd path and the in-place fast path give the same values
    torch.testing.assert_close(
        real_sph_harm(lat, lon, 12).detach(),
        real_sph_harm(lat.detach(), lon.detach(), 12),
        rtol=1e-12,
        atol=1e-13,
    )


def test_shapes_and_index_helpers():
    lat = torch.zeros(2, 3)
    assert real_sph_harm(lat, lat, 4).shape == (2, 3, 25)
    assert num_coefficients(4) == 25
    deg = degree_index(2)
    assert deg.tolist() == [0, 1, 1, 1, 2, 2, 2, 2, 2]


@pytest.mark.parametrize(
    "lat,lon,L,match",
    [
        (91.0, 0.0, 4, "lat_deg must lie in \\[-90, 90\\]"),
        (float("nan"), 0.0, 4, "lat_deg contains NaN"),
        (0.0, float("inf"), 4, "lon_deg contains NaN or infinite"),
        (0.0, 0.0, -1, "max_degree must be an int >= 0"),
        (0.0, 0.0, 2.5, "max_degree must be an int"),
    ],
)
def test_bad_input_names_argument_and_range(lat, lon, L, match):
    with pytest.raises(ValueError, match=match):
        real_sph_harm(torch.tensor([lat]), torch.tensor([lon]), L)


def test_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="same shape"):
        real_sph_harm(torch.zeros(3), torch.zeros(4), 2)
    with pytest.raises(ValueError, match="float32 or float64"):
        real_sph_harm(torch.zeros(3, dtype=torch.float16), torch.zeros(3, dtype=torch.float16), 2)


def _torch_loop(monkeypatch):
    """Force the torch degree loop (the autograd/CUDA path) for comparisons with the fused kernel."""
    import locdiff_core.harmonics as H

    monkeypatch.setattr(H, "_kernels", lambda: None)


@pytest.mark.parametrize("L", [0, 1, 5, 64, 300])
def test_fused_kernel_matches_torch_loop(monkeypatch, L):
    lat, lon = oracle_points(45)  # 52 points: not a multiple of the kernel's 8-point blocks
    lat64, lon64 = torch.tensor(lat), torch.tensor(lon)
    fused64 = real_sph_harm(lat64, lon64, L)
    fused32 = real_sph_harm(lat64.float(), lon64.float(), L)
    with monkeypatch.context() as mp:
        _torch_loop(mp)
        ref64 = real_sph_harm(lat64, lon64, L)
    torch.testing.assert_close(fused64, ref64, rtol=0, atol=1e-12 * max(1.0, ref64.abs().max().item()))
    # the fused kernel runs in float64 and rounds once: float32 output is the float64 value to ~1 ulp
    if L <= 128:
        ref32 = real_sph_harm(lat64.float().double(), lon64.float().double(), L).float()
        torch.testing.assert_close(fused32, ref32, rtol=2e-7, atol=1e-30)


def test_extended_range_near_poles_matches_scipy():
    # seeds below 2**-900 take the kernel's extended-range path: near the poles from L ~ 50 on
    lat = np.array([89.99999, -89.999, 88.0, 89.9])
    lon = np.array([10.0, -120.0, 33.3, 170.0])
    L = 250
    ours = real_sph_harm(torch.tensor(lat), torch.tensor(lon), L).numpy()
    ref = scipy_real_sh(lat, lon, L)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-10


def test_evaluate_at_points_matches_basis_contraction():
    from locdiff_core.harmonics import evaluate_at_points

    g = torch.Generator().manual_seed(5)
    L = 24
    coeffs = torch.randn(3, (L + 1) ** 2, generator=g, dtype=torch.float64)
    lat = torch.rand(3, 11, generator=g, dtype=torch.float64) * 180 - 90
    lon = torch.rand(3, 11, generator=g, dtype=torch.float64) * 360 - 180
    got = evaluate_at_points(coeffs, lat, lon)
    want = torch.einsum("bpd,bd->bp", real_sph_harm(lat, lon, L), coeffs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _large_basis(seed: int, n: int = 2048, L: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float32 basis above the size from which results get their own (reusable) mapping: 35 MB."""
    g = torch.Generator().manual_seed(seed)
    lat = torch.rand(n, generator=g) * 180 - 90
    lon = torch.rand(n, generator=g) * 360 - 180
    return lat, lon, real_sph_harm(lat, lon, L)


def test_freed_results_mapping_is_reused_and_a_live_one_never_is(monkeypatch):
    from locdiff_core import outpool as H

    monkeypatch.setenv("LOCDIFF_SH_REUSE_BYTES", str(1 << 30))
    monkeypatch.setattr(H, "pool", H.OutputPool())
    _, _, y = _large_basis(0)
    ptr = y.data_ptr()
    del y  # its mapping goes back to the pool, marked MADV_FREE
    assert H.pool.kept_bytes() >= 2048 * 65**2 * 4
    lat, lon, y2 = _large_basis(1)
    assert y2.data_ptr() == ptr and H.pool.kept_bytes() == 0
    # a reused mapping holds exactly what a fresh one would
    monkeypatch.setenv("LOCDIFF_SH_REUSE_BYTES", "0")
    fresh = real_sph_harm(lat, lon, 64)
    assert torch.equal(y2, fresh)
    # while a result (or a view of it) is alive its memory is never handed out again
    monkeypatch.setenv("LOCDIFF_SH_REUSE_BYTES", str(1 << 30))
    row = y2[100]  # a view keeps the whole mapping alive
    del y2, fresh
    _, _, y3 = _large_basis(2)
    assert y3.data_ptr() != ptr and row.data_ptr() == ptr + 100 * 65**2 * 4
    assert torch.equal(row, real_sph_harm(lat[100:101], lon[100:101], 64)[0])


def test_reuse_limit_zero_keeps_nothing_and_bad_values_are_named(monkeypatch):
    from locdiff_core import outpool as H

    monkeypatch.setattr(H, "pool", H.OutputPool())
    monkeypatch.setenv("LOCDIFF_SH_REUSE_BYTES", "0")
    _, _, y = _large_basis(0)
    del y
    assert H.pool.kept_bytes() == 0
    monkeypatch.setenv("LOCDIFF_SH_REUSE_BYTES", "4GB")
    with pytest.raises(ValueError, match="LOCDIFF_SH_REUSE_BYTES must be a whole number of bytes"):
        H.OutputPool.limit()
