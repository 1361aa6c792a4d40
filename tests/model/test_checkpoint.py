"""The checkpoint format: safe loading (weights_only), old format still readable, clear errors."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from locdiff_core.checkpoint import CheckpointError, from_bytes, load_model, to_bytes
from locdiff_core.config import get_preset
from locdiff_core.train import train

from ._data import location_embeddings


class _Payload:
    """Unpickling this creates a file: the proof that a load ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _tiny_checkpoint() -> dict:
    cfg = get_preset("tiny", train={"max_steps": 2, "log_every": 1, "eval_every": 0})
    return train(cfg, location_embeddings(100)).checkpoint


def test_roundtrip_is_weights_only_and_complete():
    ckpt = _tiny_checkpoint()
    back = from_bytes(to_bytes(ckpt))
    assert back["step"] == 2 and back["config"] == ckpt["config"]
    assert all(torch.equal(back["ema"][k], ckpt["ema"][k]) for k in ckpt["ema"])
    # the RNG state is tensors and numbers only, and restores numpy's and python's generators
    assert isinstance(back["rng"]["numpy"]["keys"], torch.Tensor)
    config, model = load_model(back)
    assert config.max_degree == 8 and sum(p.numel() for p in model.parameters()) > 0


def test_a_pickled_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = _tiny_checkpoint()
    ckpt["curves"] = {"train": [_Payload(str(marker))]}
    buf = io.BytesIO()
    torch.save(ckpt, buf)  # what an attacker would hand over
    with pytest.raises(CheckpointError, match="safe load refuses"):
        from_bytes(buf.getvalue(), source="evil.pt")
    assert not marker.exists()


def test_format_1_with_numpy_rng_objects_still_loads():
    """Checkpoints of earlier releases pickled numpy's RNG tuple; they load without running code."""
    ckpt = _tiny_checkpoint()
    ckpt["format"] = "locdiff-checkpoint/1"
    ckpt["rng"]["numpy"] = np.random.get_state()  # noqa: NPY002 (the old layout)
    ckpt["rng"]["python"] = random.getstate()
    back = from_bytes(to_bytes(ckpt))
    assert back["rng"]["numpy"][0] == "MT19937" and back["rng"]["numpy"][1].dtype == np.uint32


@pytest.mark.parametrize("data", [b"", b"not a checkpoint at all", None])
def test_truncated_random_or_empty_files_are_one_line_errors(data):
    if data is None:
        data = to_bytes(_tiny_checkpoint())[:-100]  # truncated
    with pytest.raises(CheckpointError, match="m.pt"):
        from_bytes(data, source="m.pt")


def test_a_tensor_file_that_is_not_a_checkpoint_is_refused():
    with pytest.raises(CheckpointError, match="not a LocDiff checkpoint"):
        from_bytes(to_bytes({"weights": torch.zeros(3)}))
