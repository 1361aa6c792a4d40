"""Input validation shared by the core: errors name the argument and what is allowed."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def as_float_tensor(x, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``x`` as a floating tensor (float32/float64), refusing other dtypes and non-finite values."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x, dtype=dtype or torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"{name} must be numeric (a tensor, array or number), got {type(x).__name__}"
            ) from exc
    if x.dtype not in FLOAT_DTYPES:
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
        x = x.to(dtype or torch.float64)  # integer degrees are fine
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values; all values must be finite")
    return x


def check_latlon(lat_deg, lon_deg, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a latitude/longitude pair in degrees: finite, lat in [-90, 90], same shape."""
    lat = as_float_tensor(lat_deg, f"{prefix}lat_deg")
    lon = as_float_tensor(lon_deg, f"{prefix}lon_deg")
    if lat.dtype != lon.dtype:
        dtype = torch.promote_types(lat.dtype, lon.dtype)
        lat, lon = lat.to(dtype), lon.to(dtype)
    if lat.shape != lon.shape:
        raise ValueError(
            f"{prefix}lat_deg and {prefix}lon_deg must have the same shape, got {tuple(lat.shape)} and "
            f"{tuple(lon.shape)}"
        )
    if lat.numel() and (lat.min() < -90.0 or lat.max() > 90.0):
        bad = lat[(lat < -90) | (lat > 90)][0].item()
        raise ValueError(f"{prefix}lat_deg must lie in [-90, 90] degrees, got {bad}")
    return lat, lon


def check_degree(max_degree, name: str = "max_degree") -> int:
    if isinstance(max_degree, bool) or not isinstance(max_degree, int):
        raise ValueError(f"{name} must be an int >= 0, got {max_degree!r}")
    if max_degree < 0:
        raise ValueError(f"{name} must be an int >= 0, got {max_degree}")
    return max_degree


def check_positive(value, name: str, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number, got {value!r}") from exc
    if not (v == v) or v in (float("inf"), float("-inf")) or v < 0 or (v == 0 and not allow_zero):
        allowed = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")
    return v
