"""Large outputs in their own reusable anonymous mappings (an OS memory matter, kept out of the math).

:func:`empty_output` hands :func:`locdiff_core.harmonics.real_sph_harm` its result buffer. Results of
16 MiB or more get a mapping with transparent huge pages asked for; once freed, the mapping is kept for the
next result of the same size (:class:`OutputPool`). The paths that repeat such a size: the targets stage
(8,192-row float64 blocks: 18 MiB at L = 16, 68 MiB at L = 32, 264 MiB at L = 64) and, at L = 64, the
SHDD-KL anchor basis of every training step on the CPU (docs/performance.md has the figures).
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref

import numpy as np
import torch

_HUGE_BYTES = 1 << 24
_HUGE_PAGE = 1 << 21


class OutputPool:
    """Large results live in their own anonymous mappings; when a result is freed, its mapping is kept for
    the next result of the same size instead of being unmapped.

    Why: the first write to a fresh page costs a kernel fault that zero-fills it. For a 1.69 GB basis
    (L = 64, 100,000 points) that zero-filling takes ~1/3 of the whole call, on every call, although the
    kernel overwrites every element anyway. A caller that builds a basis of the same shape again (the
    KL loss does it every training step) then gets pages that are already mapped. A kept mapping is
    marked MADV_FREE: it costs nothing until it is reused, and under memory pressure the OS reclaims it
    (a reused page then faults in zeroed, as a fresh one would). At most
    ``LOCDIFF_SH_REUSE_BYTES`` (default: an eighth of physical memory) are kept, the most recently freed
    first; ``LOCDIFF_SH_REUSE_BYTES=0`` unmaps every result when it is freed. A forked child starts with
    an empty pool (the parent's pages would be copied on write)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []  # most recently freed last
        self._pid = os.getpid()

    @staticmethod
    def limit() -> int:
        raw = os.environ.get("LOCDIFF_SH_REUSE_BYTES")
        if raw is None:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8
        if not raw.strip().isdigit():
            raise ValueError(f"LOCDIFF_SH_REUSE_BYTES must be a whole number of bytes >= 0, got {raw!r}")
        return int(raw)

    def take(self, nbytes: int) -> mmap.mmap:
        """A mapping of ``nbytes`` rounded up to whole huge pages: a kept one of that size, else a new one.
        Raises ValueError for a bad ``LOCDIFF_SH_REUSE_BYTES`` (here, not at free time)."""
        limit = self.limit()
        size = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE
        with self._lock:
            if self._pid != os.getpid():
                self._free, self._pid = [], os.getpid()
            self._trim(limit)  # the limit may have been lowered since
            for i in range(len(self._free) - 1, -1, -1):
                if len(self._free[i]) == size:
                    return self._free.pop(i)
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a hint; where it is refused nothing changes
            pass
        return buf

    def _trim(self, limit: int) -> None:
        while self._free and sum(len(b) for b in self._free) > limit:
            self._free.pop(0)  # the oldest; unmapped once nothing refers to it

    def give_back(self, buf: mmap.mmap) -> None:
        """Called when the array over ``buf`` is freed: keep ``buf`` for reuse, or let it be unmapped."""
        try:
            limit = self.limit()
        except ValueError:  # reported where the next result is made (take)
            return
        with self._lock:
            if self._pid != os.getpid() or len(buf) > limit:
                return
            if hasattr(mmap, "MADV_FREE"):
                try:
                    buf.madvise(mmap.MADV_FREE)
                except OSError:
                    pass
            self._free.append(buf)
            self._trim(limit)

    def kept_bytes(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._free)


pool = OutputPool()


def empty_output(n: int, D: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised ``[n, D]`` tensor. Large ones are mapped with transparent huge pages asked for
    (for a result of a gigabyte, faulting in 4 KiB pages takes longer than computing it) and their
    mappings are reused once freed (:class:`OutputPool`)."""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    nbytes = n * D * np.dtype(np_dtype).itemsize
    if nbytes < _HUGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty((n, D), dtype=dtype)
    buf = pool.take(nbytes)
    arr = np.frombuffer(buf, dtype=np_dtype, count=n * D).reshape(n, D)
    weakref.finalize(arr, pool.give_back, buf).atexit = False
    return torch.from_numpy(arr)  # the tensor keeps ``arr`` (and so the mapping) alive
