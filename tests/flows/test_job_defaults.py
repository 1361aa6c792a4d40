"""The real job's defaults: train-mp16 is the MP16 job (mp16 preset, the four benchmarks, GPU when there
is one, every visible GPU under torchrun), and prefect.yaml deploys exactly the flow's defaults."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import pytest
import torch
import yaml

from locdiff.ddp import resolve_nproc
from locdiff.flows.evaluate_latest import evaluate_latest
from locdiff.flows.pipeline import BENCHMARKS
from locdiff.flows.train_mp16 import train_mp16
from locdiff_core.device import resolve_device

ROOT = Path(__file__).resolve().parents[2]


def _defaults(flow) -> dict:
    sig = inspect.signature(flow.fn)
    return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def test_train_mp16_defaults_are_the_mp16_job():
    d = _defaults(train_mp16)
    assert (d["dataset"], d["encoder"], d["preset"]) == ("mp16", "ViT-L-14/openai", "mp16")
    assert d["device"] == "auto" and d["nproc"] is None and d["dask"] is None
    assert BENCHMARKS == ("yfcc26k", "gws15k", "im2gps3k", "yfcc4k")


def test_prefect_yaml_deploys_the_flows_defaults():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    params = deps["default"]["parameters"]
    flow_defaults = _defaults(train_mp16)
    for name, value in params.items():
        if name == "eval_datasets":
            assert value == list(BENCHMARKS)
        elif name in ("overrides", "dataset_options"):
            assert value == {} and flow_defaults[name] is None
        else:
            assert value == flow_defaults[name], name
    assert deps["nightly"]["parameters"]["datasets"] == list(BENCHMARKS)
    assert "datasets" in _defaults(evaluate_latest)


def test_device_and_nproc_auto_on_this_machine(monkeypatch):
    monkeypatch.setenv("LOCDIFF_NPROC", "2")  # no longer read: nproc is a parameter, never the environment
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert resolve_device("auto").type == ("cuda" if gpus else "cpu")
    assert resolve_nproc(None, "auto") == (gpus or 1)
    assert resolve_nproc(None, "cpu") == 1


def test_bf16_without_cuda_is_logged_not_ignored(caplog):
    from locdiff_core.config import get_preset
    from locdiff_core.data import GeoEmbeddings
    from locdiff_core.train import train

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU fallback")
    cfg = get_preset("tiny", train={"max_steps": 1, "warmup_steps": 1, "amp": "bf16", "eval_every": 0})
    data = GeoEmbeddings(torch.randn(64, cfg.embed_dim), torch.zeros(64), torch.zeros(64))
    with caplog.at_level(logging.WARNING, logger="locdiff_core.train"):
        train(cfg, data)
    assert any("amp='bf16' runs on CUDA only" in r.getMessage() for r in caplog.records)


def test_the_nightly_and_locdiff_evaluate_take_a_device():
    assert _defaults(evaluate_latest)["device"] == "auto"
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    nightly = {d["name"]: d for d in spec["deployments"]}["nightly"]
    assert nightly["parameters"]["device"] == "auto"
    import subprocess
    import sys

    cli = [sys.executable, "-m", "locdiff.cli", "evaluate", "--device", "tpu"]
    res = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown --device 'tpu'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_locdiff_train_takes_device_and_nproc():
    import inspect as _inspect

    from locdiff.commands.run import train_command
    from tests.product.conftest import cli

    params = _inspect.signature(train_command).parameters
    assert params["device"].default.default == "auto" and params["nproc"].default.default is None
    code, _, err = cli("train", "--device", "tpu")
    assert code != 0 and "--device 'tpu' is not allowed" in err and "Traceback" not in err
