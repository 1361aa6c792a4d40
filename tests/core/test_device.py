"""locdiff_core.device.resolve_device: the one device resolution (training, sampling, encoders, predict)."""

import pytest
import torch

from locdiff_core.device import DeviceError, resolve_device


def test_auto_and_none_pick_cuda_when_present():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == resolve_device("auto").type == want
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "", "cuda:x", "mps"])
def test_an_unknown_device_names_the_allowed_ones(name):
    with pytest.raises(DeviceError, match=r"unknown --device .*allowed: auto, cpu, cuda or cuda:N"):
        resolve_device(name, "--device")


def test_cuda_without_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="train.device 'cuda:1' requested but CUDA is not available"):
        resolve_device("cuda:1", "train.device")
    assert resolve_device("auto").type == "cpu"
