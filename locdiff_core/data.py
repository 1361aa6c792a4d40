"""Training rows kept in parts, and the one batch sampler of the trainer (single process or DDP).

``PartedGeo`` holds a training set as it lies in the store: a list of parts, each with its embeddings
``[n_i, E]`` (any float dtype), coordinates ``[n_i]`` and optionally SHDD codes ``[n_i, D]``. The
arrays are whatever the caller opened — numpy memmaps of ``.npy`` files (``locdiff.stages``), or
tensors — and a selection ``rows`` of global row numbers (e.g. the rows of one split). Nothing is
copied up front: :meth:`PartedGeo.gather` reads just the rows of a batch, part by part, into a fresh
batch tensor. This module does no I/O itself; the caller may pass ``release`` (called every
``release_every`` gathers) to drop the pages a memory map has touched, so a long run's resident set
stays bounded by a few batches rather than growing to the whole table.

:meth:`PartedGeo.to_device` copies the selected rows, part by part, into one tensor on a device (the
CUDA-resident training set): it is a ``PartedGeo`` with one part, so the trainer samples it with the
same code and the same draws, and on ``cpu`` it yields exactly the batches of the memory-mapped path.

:class:`BatchSampler` draws the *global* batch of a step from one generator — every rank of a DDP
job draws the same indices — and each rank reads only its slice (rank r of W takes rows
``[r·B/W, (r+1)·B/W)``). Every other random draw of a step is also made for the global batch and
sliced, so a run's trajectory does not depend on the number of processes: W ranks with global batch
B match one process with batch B up to float summation order, and a checkpoint of a W-rank run
resumes on any other W.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class GeoEmbeddings:
    """Image embeddings with their true locations: emb [N, E] (any float dtype), lat/lon [N] degrees.

    ``codes`` [N, (L+1)²] optionally carries each row's SHDD code (c units, e.g. read from the target
    cache); the trainer then takes x₀ = √(4π)·code from it instead of encoding the coordinates.
    """

    emb: Tensor
    lat_deg: Tensor
    lon_deg: Tensor
    codes: Tensor | None = None

    def __post_init__(self) -> None:
        emb, lat, lon = self.emb, self.lat_deg, self.lon_deg
        if not isinstance(emb, Tensor) or emb.ndim != 2 or not emb.is_floating_point():
            raise ValueError(f"emb must be a float tensor [N, E], got {getattr(emb, 'shape', type(emb))}")
        n = emb.shape[0]
        if n == 0:
            raise ValueError("the data set is empty (0 rows)")
        for name, v in (("lat_deg", lat), ("lon_deg", lon)):
            if not isinstance(v, Tensor) or v.shape != (n,):
                raise ValueError(
                    f"{name} must be a tensor of shape [{n}], got {getattr(v, 'shape', type(v))}"
                )
        if self.codes is not None and (
            not isinstance(self.codes, Tensor) or self.codes.ndim != 2 or self.codes.shape[0] != n
        ):
            raise ValueError(f"codes must be a tensor [{n}, D], got {getattr(self.codes, 'shape', None)}")
        bad = (~torch.isfinite(emb).all(dim=1)).nonzero()
        if bad.numel():
            raise ValueError(f"emb has NaN/inf values in {bad.numel()} rows (first: row {int(bad[0, 0])})")
        bad = ((lat.abs() > 90) | (lon.abs() > 180) | ~torch.isfinite(lat) | ~torch.isfinite(lon)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(
                f"row {i}: lat={float(lat[i])}, lon={float(lon[i])} out of range (lat in [-90, 90], "
                f"lon in [-180, 180])"
            )

    def __len__(self) -> int:
        return self.emb.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.emb.shape[1]

    def subset(self, idx: Tensor) -> GeoEmbeddings:
        codes = None if self.codes is None else self.codes[idx]
        return GeoEmbeddings(self.emb[idx], self.lat_deg[idx], self.lon_deg[idx], codes)


def _as_tensor(a) -> Tensor:
    if isinstance(a, Tensor):
        return a
    return torch.from_numpy(np.asarray(a))


@dataclass
class GeoPart:
    """One part: ``emb [n, E]``, ``lat_deg``/``lon_deg [n]`` and optionally ``codes [n, D]``."""

    emb: object
    lat_deg: object
    lon_deg: object
    codes: object | None = None

    def __len__(self) -> int:
        return int(self.emb.shape[0])


class PartedGeo:
    """A training set split in parts (see the module docstring); rows ``0..len-1`` index ``rows``."""

    def __init__(
        self,
        parts: Sequence[GeoPart],
        rows: np.ndarray | None = None,
        *,
        release: Callable[[], None] | None = None,
        release_every: int = 1,
    ) -> None:
        self.parts = list(parts)
        if not self.parts:
            raise ValueError("the data set is empty (no parts)")
        sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # [P+1]
        total = int(self.offsets[-1])
        self.rows = np.arange(total, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(self.rows) == 0:
            raise ValueError("the data set is empty (0 rows)")
        if self.rows.min() < 0 or self.rows.max() >= total:
            raise ValueError(f"row numbers out of range [0, {total})")
        dims = {int(p.emb.shape[1]) for p in self.parts}
        if len(dims) != 1:
            raise ValueError(f"parts have different embedding widths {sorted(dims)}")
        self.embed_dim = dims.pop()
        with_codes = {p.codes is not None for p in self.parts}
        if len(with_codes) != 1:
            raise ValueError("either every part has codes or none has")
        self.has_codes = with_codes.pop()
        self.code_dim = int(self.parts[0].codes.shape[1]) if self.has_codes else None
        for i, p in enumerate(self.parts):
            n = len(p)
            if p.lat_deg.shape != (n,) or p.lon_deg.shape != (n,):
                raise ValueError(f"part {i}: coordinates must have shape [{n}]")
            if self.has_codes and (p.codes.shape[0] != n or int(p.codes.shape[1]) != self.code_dim):
                raise ValueError(f"part {i}: codes must have shape [{n}, {self.code_dim}]")
        self.release = release
        self.release_every = max(1, int(release_every))
        self._gathers = 0

    def __len__(self) -> int:
        return len(self.rows)

    # ---- reading rows
    def _locate(self, idx: Tensor) -> tuple[np.ndarray, np.ndarray]:
        pos = self.rows[idx.cpu().numpy()]  # global row numbers
        part = np.searchsorted(self.offsets, pos, side="right") - 1
        return part, pos - self.offsets[part]

    def _take(self, field: str, part: np.ndarray, local: np.ndarray, device) -> Tensor:
        out = None
        for p in np.unique(part):
            sel = np.nonzero(part == p)[0]
            src = getattr(self.parts[p], field)
            if isinstance(src, Tensor):
                got = src[torch.from_numpy(local[sel]).to(src.device)]
            else:
                order = np.argsort(local[sel], kind="stable")  # ascending reads of the map
                rows = np.empty_like(order)
                rows[order] = np.arange(len(order))
                got = torch.from_numpy(np.ascontiguousarray(src[local[sel][order]]))[rows]
            if out is None:
                out = torch.empty((len(part), *got.shape[1:]), dtype=got.dtype, device=got.device)
            out[torch.from_numpy(sel).to(out.device)] = got
        return out.to(device) if device is not None else out

    def gather(self, idx: Tensor, fields: Sequence[str] = ("emb", "codes"), device=None) -> dict[str, Tensor]:
        """The rows ``idx`` [b] of the given fields, in the order of ``idx``."""
        part, local = self._locate(idx)
        out = {f: self._take(f, part, local, device) for f in fields if f != "codes" or self.has_codes}
        self._gathers += 1
        if self.release is not None and self._gathers % self.release_every == 0:
            self.release()
        return out

    def coords(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(lat, lon) float64 [b] of the rows ``idx``."""
        g = self.gather(idx, ("lat_deg", "lon_deg"))
        return g["lat_deg"].to(torch.float64), g["lon_deg"].to(torch.float64)

    def all_coords(self) -> tuple[Tensor, Tensor]:
        """Every selected row's (lat, lon), float64 [N] (16 bytes a row)."""
        lat = torch.empty(len(self), dtype=torch.float64)
        lon = torch.empty(len(self), dtype=torch.float64)
        for s in range(0, len(self), 1 << 18):
            idx = torch.arange(s, min(len(self), s + (1 << 18)))
            lat[idx], lon[idx] = self.coords(idx)
        return lat, lon

    @property
    def lat_deg(self) -> Tensor:
        return self.all_coords()[0]

    @property
    def lon_deg(self) -> Tensor:
        return self.all_coords()[1]

    def subset(self, idx: Tensor):
        """A small in-memory ``GeoEmbeddings`` of the rows ``idx`` (e.g. a validation subset)."""
        g = self.gather(idx, ("emb", "lat_deg", "lon_deg", "codes"))
        return GeoEmbeddings(
            g["emb"], g["lat_deg"].to(torch.float64), g["lon_deg"].to(torch.float64), g.get("codes")
        )

    def validate(self, chunk_rows: int = 1 << 14) -> None:
        """Refuse NaN/inf embeddings and out-of-range coordinates, reading the selection in chunks."""
        for s in range(0, len(self), chunk_rows):
            idx = torch.arange(s, min(len(self), s + chunk_rows))
            g = self.gather(idx, ("emb", "lat_deg", "lon_deg"))
            bad = (~torch.isfinite(g["emb"]).all(dim=1)).nonzero()
            if bad.numel():
                raise ValueError(f"emb has NaN/inf values (first: row {s + int(bad[0, 0])})")
            lat, lon = g["lat_deg"], g["lon_deg"]
            bad = (
                (lat.abs() > 90) | (lon.abs() > 180) | ~torch.isfinite(lat) | ~torch.isfinite(lon)
            ).nonzero()
            if bad.numel():
                i = int(bad[0, 0])
                raise ValueError(f"row {s + i}: lat={float(lat[i])}, lon={float(lon[i])} out of range")
            if self.release is not None:
                self.release()  # a full scan: drop each chunk's pages before the next

    # ---- the device-resident copy
    def nbytes(self) -> int:
        """Bytes of the selected rows (embeddings, coordinates, codes) in their stored dtypes."""
        p = self.parts[0]
        row = p.emb.shape[1] * _as_tensor(p.emb[:1]).element_size() + 16
        if self.has_codes:
            row += p.codes.shape[1] * _as_tensor(p.codes[:1]).element_size()
        return int(row) * len(self)

    def to_device(self, device, chunk_rows: int = 1 << 14) -> PartedGeo:
        """The selected rows as one part on ``device``, copied chunk by chunk (no full host copy)."""
        device = torch.device(device)
        first = self.gather(torch.arange(1), ("emb", "lat_deg", "lon_deg", "codes"))
        dst = {
            k: torch.empty((len(self), *v.shape[1:]), dtype=v.dtype, device=device) for k, v in first.items()
        }
        for s in range(0, len(self), chunk_rows):
            idx = torch.arange(s, min(len(self), s + chunk_rows))
            for k, v in self.gather(idx, tuple(dst)).items():
                dst[k][s : s + len(idx)] = v.to(device)
            if self.release is not None:
                self.release()
        return PartedGeo([GeoPart(dst["emb"], dst["lat_deg"], dst["lon_deg"], dst.get("codes"))])


def as_parted(data) -> PartedGeo:
    """A ``PartedGeo`` view of ``data`` (a ``GeoEmbeddings`` becomes one in-memory part)."""
    if isinstance(data, PartedGeo):
        return data
    return PartedGeo([GeoPart(data.emb, data.lat_deg, data.lon_deg, data.codes)])


class BatchSampler:
    """Global batches of row indices from one generator; :meth:`local` is one rank's slice."""

    def __init__(self, n_rows: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world size {world_size} is not valid")
        if batch_size % world_size:
            raise ValueError(
                f"train.batch_size={batch_size} is not divisible by the {world_size} processes; "
                f"pick a multiple of {world_size}"
            )
        self.n_rows, self.batch_size = int(n_rows), int(batch_size)
        self.rank, self.world_size = rank, world_size
        self.per_rank = batch_size // world_size

    def draw(self, generator: torch.Generator) -> Tensor:
        """The step's global batch [B] (identical on every rank)."""
        return torch.randint(0, self.n_rows, (self.batch_size,), generator=generator)

    def local(self, x: Tensor) -> Tensor:
        """This rank's slice of a per-row tensor of the global batch."""
        return x[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
