"""The LocDiff checkpoint: its format, the model it builds, what may change on resume, safe (de)serialisation.

A checkpoint is a plain dict::

    format      "locdiff-checkpoint/2"
    config      LocDiffConfig.to_dict()           (plain JSON types)
    step        int
    model, ema  state dicts                       (tensors)
    optimizer   AdamW state dict                  (tensors, numbers, lists)
    scheduler   {"kind": str, "lr": float}        (the LR is a pure function of the step)
    rng         every RNG state as tensors and numbers (see :func:`pack_rng` / :func:`unpack_rng`)
    curves      {"train": [...], "val": [...]}    (lists of dicts of numbers)

Everything in it is a tensor or a plain Python value, so :func:`from_bytes` loads it with
``torch.load(weights_only=True)``: a file handed over by a user or a store cannot run code. Format 1
(earlier releases) pickled the numpy RNG state as numpy objects; :func:`from_bytes` still reads it by
allowing exactly numpy's array-reconstruction globals (no arbitrary callables), and repacks it.

Training (``train.py``) and inference (``sampling.py``) both import this module; neither imports the other.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import torch

from .config import LocDiffConfig, config_diff
from .denoiser import CSUNet

CHECKPOINT_FORMAT = "locdiff-checkpoint/2"
_READABLE_FORMATS = ("locdiff-checkpoint/1", CHECKPOINT_FORMAT)
# Fields that may change between a checkpoint and its resumption: they do not alter the trajectory.
RESUME_SAFE_FIELDS = frozenset(
    {
        "train.log_every",
        "train.eval_every",
        "train.eval_size",
        "train.eval_samples",
        "train.eval_steps",
        "train.checkpoint_every",
        "train.device",
    }
)


class CheckpointError(ValueError):
    """A file or dict that is not a readable LocDiff checkpoint (the message says why)."""


def build_model(config: LocDiffConfig) -> CSUNet:
    return CSUNet(config.dim, config.embed_dim, config.model)


def check_format(checkpoint) -> LocDiffConfig:
    """The checkpoint's config; :class:`CheckpointError` when it is not a LocDiff checkpoint."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in _READABLE_FORMATS:
        got = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"not a LocDiff checkpoint (format {got!r}, expected {CHECKPOINT_FORMAT!r})")
    try:
        return LocDiffConfig.from_dict(checkpoint["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's config is invalid: {exc}") from None


def check_compatible(config: LocDiffConfig, checkpoint: dict) -> LocDiffConfig:
    """Refuse a checkpoint of another format or config; returns the checkpoint's config."""
    saved = check_format(checkpoint)
    diff = {k: v for k, v in config_diff(saved, config).items() if k not in RESUME_SAFE_FIELDS}
    if diff:
        parts = "; ".join(f"{k}: checkpoint={a!r}, requested={b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"checkpoint config differs from the requested config in {len(diff)} field(s): {parts}. "
            f"Only {sorted(RESUME_SAFE_FIELDS)} may change on resume."
        )
    return saved


def load_model(checkpoint: dict, *, use_ema: bool = True) -> tuple[LocDiffConfig, CSUNet]:
    """(config, model with the EMA (or raw) weights) of a checkpoint."""
    config = check_format(checkpoint)
    model = build_model(config)
    try:
        model.load_state_dict(checkpoint["ema" if use_ema else "model"])
    except (KeyError, RuntimeError) as exc:
        what = " ".join(str(exc).split())  # torch lists every mismatch on a line of its own
        raise CheckpointError(
            f"the checkpoint's weights do not fit its config: {what[:300]}{'…' if len(what) > 300 else ''}"
        ) from None
    weights = model.state_dict().items()
    bad = next((n for n, t in weights if t.is_floating_point() and not t.isfinite().all()), None)
    if bad is not None:  # a diverged run: it would predict NaN for every image
        raise CheckpointError(f"the checkpoint's weights hold NaN or infinite values (first: {bad})")
    return config, model


# ------------------------------------------------------------------------------------------ RNG states
def pack_rng(loop: torch.Generator, numpy_state: tuple, python_state: tuple, cuda=None) -> dict:
    """RNG states as tensors and numbers only (what ``weights_only`` loading accepts)."""
    kind, keys, pos, has_gauss, cached = numpy_state
    version, internal, gauss_next = python_state
    out = {
        "loop": loop.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if cuda is not None:
        out["cuda"] = list(cuda)
    return out


def unpack_numpy_rng(state) -> tuple:
    if isinstance(state, tuple):  # format 1: numpy's own tuple
        return state
    return (
        state["kind"],
        state["keys"].numpy().astype(np.uint32),
        int(state["pos"]),
        int(state["has_gauss"]),
        float(state["cached_gaussian"]),
    )


def unpack_python_rng(state) -> tuple:
    if isinstance(state, tuple):  # format 1
        return state
    return (int(state["version"]), tuple(int(v) for v in state["state"].tolist()), state["gauss_next"])


# ------------------------------------------------------------------------------------- (de)serialising
def to_bytes(checkpoint: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    return buf.getvalue()


def _numpy_safe_globals() -> list:
    """numpy's array/dtype reconstruction globals: enough to read format-1 RNG states, nothing callable
    beyond building arrays."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved np.core to np._core
    out = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    out += [type(np.dtype(t)) for t in ("uint32", "int64", "float64")]
    return out


def from_bytes(data: bytes, source: str = "checkpoint") -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``; never runs code from the file.

    Raises :class:`CheckpointError` naming ``source`` when the file is not a loadable checkpoint.
    """
    if not data:
        raise CheckpointError(f"{source} is empty (0 bytes)")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{source} holds objects a safe load refuses ({first[:200]}); it was not written by "
            f"locdiff, or it was tampered with: refusing to load it"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError) as exc:
        raise CheckpointError(
            f"{source} is not a readable checkpoint (truncated or corrupt: {type(exc).__name__})"
        ) from None
    check_format(state)
    return state
