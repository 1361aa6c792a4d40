"""Where tensors run: the one place a device name becomes a ``torch.device`` (training, sampling, the
encoders, ``predict``, ``serve``, evaluation and the torchrun launcher all ask here)."""

from __future__ import annotations

import torch

ALLOWED = "auto, cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """A device name that is not allowed, or CUDA asked for where there is none (one line, no traceback)."""


def resolve_device(name: str | torch.device | None = None, what: str = "device") -> torch.device:
    """``None`` or ``"auto"``: CUDA when it is available, else the CPU; ``"cpu"``, ``"cuda"`` and
    ``"cuda:N"`` as asked. Anything else, or CUDA where it is not available, is a :class:`DeviceError`
    naming ``what`` (e.g. ``--device``, ``train.device``) and the allowed values."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"unknown {what} {name!r}; allowed: {ALLOWED}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{what} {name!r} requested but CUDA is not available; allowed here: auto, cpu")
    return dev
