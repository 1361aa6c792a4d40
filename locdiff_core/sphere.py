"""Points on the sphere: lat/lon <-> unit vectors, great-circle distances, lattices and sampling.

Conventions (docs/design.md §3): latitude/longitude in degrees at every public boundary; colatitude
theta = (90 - lat) * pi / 180 and phi = lon * pi / 180 inside; the Earth is a sphere of mean radius
6371.0088 km (IUGG mean radius R1); distances are haversine great-circle distances.
"""

from __future__ import annotations

import math

import torch

from locdiff_core._checks import as_float_tensor, check_latlon, check_positive

EARTH_RADIUS_KM = 6371.0088
_GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


def latlon_to_xyz(lat_deg, lon_deg) -> torch.Tensor:
    """Unit vectors ``[..., 3]`` (x towards lon 0 on the equator, z towards the north pole)."""
    lat, lon = check_latlon(lat_deg, lon_deg)
    la, lo = torch.deg2rad(lat), torch.deg2rad(lon)
    c = torch.cos(la)
    return torch.stack([c * torch.cos(lo), c * torch.sin(lo), torch.sin(la)], dim=-1)


def xyz_to_latlon(xyz) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`latlon_to_xyz` for any non-zero vectors ``[..., 3]``; lon in (-180, 180]."""
    xyz = as_float_tensor(xyz, "xyz")
    if xyz.shape[-1:] != (3,):
        raise ValueError(f"xyz must have shape [..., 3], got {tuple(xyz.shape)}")
    x, y, z = xyz.unbind(-1)
    lat = torch.rad2deg(torch.atan2(z, torch.hypot(x, y)))
    lon = torch.rad2deg(torch.atan2(y, x))
    return lat, lon


def haversine_km(lat1_deg, lon1_deg, lat2_deg, lon2_deg, radius_km: float = EARTH_RADIUS_KM) -> torch.Tensor:
    """Great-circle distance in km, accurate at every separation.

    The atan2 form of the central angle (Vincenty's formula on the sphere): atan2 of the norm of the cross
    product over the dot product of the two unit vectors, written in latitudes and the longitude
    difference. The haversine's asin(sqrt(h)) is ill-conditioned near the antipode (h -> 1): there it
    lost ~1e-8 of the distance, by an amount that depended on the CPU's vectorised sin/asin."""
    lat1, lon1 = check_latlon(lat1_deg, lon1_deg, "1st ")
    lat2, lon2 = check_latlon(lat2_deg, lon2_deg, "2nd ")
    p1, p2 = torch.deg2rad(lat1), torch.deg2rad(lat2)
    dlmb = torch.deg2rad(lon2 - lon1)
    c1, s1, c2, s2 = torch.cos(p1), torch.sin(p1), torch.cos(p2), torch.sin(p2)
    cross = torch.hypot(c2 * torch.sin(dlmb), c1 * s2 - s1 * c2 * torch.cos(dlmb))
    dot = s1 * s2 + c1 * c2 * torch.cos(dlmb)
    return radius_km * torch.atan2(cross, dot)


def angular_distance(xyz1: torch.Tensor, xyz2: torch.Tensor) -> torch.Tensor:
    """Angle in radians between unit vectors (atan2 form: accurate at 0 and pi)."""
    cross = torch.linalg.cross(xyz1, xyz2, dim=-1).norm(dim=-1)
    dot = (xyz1 * xyz2).sum(-1)
    return torch.atan2(cross, dot)


def fibonacci_lattice(n: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` nearly equal-area points (the golden-angle spiral); spacing ~ sqrt(4*pi/n) * R."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    i = torch.arange(n, dtype=torch.float64)
    z = 1.0 - (2.0 * i + 1.0) / n  # centred in n equal bands of z: equal area
    lat = torch.rad2deg(torch.asin(z))
    lon = torch.remainder(torch.rad2deg(i * _GOLDEN_ANGLE) + 180.0, 360.0) - 180.0
    return lat.to(dtype), lon.to(dtype)


def lattice_spacing_km(n: int) -> float:
    """Typical distance between neighbours of an ``n``-point equal-area lattice."""
    return math.sqrt(4 * math.pi / n) * EARTH_RADIUS_KM


def sample_uniform(
    n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points uniform on the sphere (uniform z = sin(lat), uniform lon)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    u = torch.rand(2, n, generator=generator, dtype=torch.float64)
    lat = torch.rad2deg(torch.asin(2.0 * u[0] - 1.0))
    lon = 360.0 * u[1] - 180.0
    return lat.to(dtype), lon.to(dtype)


def tangent_frame(xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit east and north vectors at points ``xyz [..., 3]`` (a fixed fallback at the poles)."""
    x, y, z = xyz.unbind(-1)
    rho = torch.hypot(x, y)
    at_pole = rho < 1e-12
    safe = torch.where(at_pole, torch.ones_like(rho), rho)
    east = torch.stack([-y / safe, x / safe, torch.zeros_like(x)], -1)
    east = torch.where(at_pole[..., None], torch.tensor([0.0, 1.0, 0.0], dtype=xyz.dtype), east)
    north = torch.linalg.cross(xyz, east, dim=-1)
    return east, north


def offset_km(lat_deg, lon_deg, north_km, east_km) -> tuple[torch.Tensor, torch.Tensor]:
    """Move from each point along the great circle given by a (north, east) tangent displacement.

    Shapes broadcast. The displacement length is the great-circle distance travelled (the exponential
    map of the sphere), so it is exact for any distance.
    """
    lat, lon = check_latlon(lat_deg, lon_deg)
    p = latlon_to_xyz(lat.to(torch.float64), lon.to(torch.float64))  # float64 inside, input dtype out
    north_km = torch.as_tensor(north_km, dtype=torch.float64)
    east_km = torch.as_tensor(east_km, dtype=torch.float64)
    east, north = tangent_frame(p)
    v = north_km[..., None] * north + east_km[..., None] * east  # [..., 3] km
    dist = v.norm(dim=-1, keepdim=True)
    ang = dist / EARTH_RADIUS_KM
    direction = v / dist.clamp_min(1e-300)
    q = torch.cos(ang) * p + torch.sin(ang) * direction
    out_lat, out_lon = xyz_to_latlon(q)
    return out_lat.to(lat.dtype), out_lon.to(lat.dtype)


def sample_cap(
    lat_deg, lon_deg, radius_km: float, n_per: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per`` points uniform (by area) in the spherical cap of ``radius_km`` around each centre.

    Returns tensors of shape ``[*centre_shape, n_per]``.
    """
    lat, lon = check_latlon(lat_deg, lon_deg)
    radius = check_positive(radius_km, "radius_km")
    if isinstance(n_per, bool) or not isinstance(n_per, int) or n_per < 1:
        raise ValueError(f"n_per must be an int >= 1, got {n_per!r}")
    alpha = min(radius / EARTH_RADIUS_KM, math.pi)
    shape = (*lat.shape, n_per)
    u = torch.rand(2, *shape, generator=generator, dtype=torch.float64)
    # uniform by area: cos(angle) uniform in [cos(alpha), 1]
    cos_a = 1.0 - u[0] * (1.0 - math.cos(alpha))
    ang = torch.acos(cos_a.clamp(-1.0, 1.0))
    bearing = 2 * math.pi * u[1]
    d_km = ang * EARTH_RADIUS_KM
    out_lat, out_lon = offset_km(
        lat.to(torch.float64)[..., None].expand(shape),
        lon.to(torch.float64)[..., None].expand(shape),
        d_km * torch.cos(bearing),
        d_km * torch.sin(bearing),
    )
    return out_lat.to(lat.dtype), out_lon.to(lat.dtype)
