"""No checkpoint a user or a store hands over runs code: `predict --checkpoint`, a store's model.pt and
a resume part each carry a payload that would create a file; each load is refused, nothing runs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from locdiff.errors import UserError
from locdiff.stages.runs import checkpoint_relpath, train_run
from locdiff.storage import Store
from tests.flows.conftest import run_inputs, synthetic_embeddings, tiny_config


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"format": "locdiff-checkpoint/2", "config": {}, "x": _Payload(str(marker))}, buf)
    return buf.getvalue()


def _cli(*args: str, env_store: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOCDIFF_STORAGE": env_store, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "locdiff.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture()
def image(tmp_path) -> Path:
    p = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 64), (30, 90, 160)).save(p)
    return p


def _committed_file(store: Store, key: str, relpath: str) -> Path:
    return (
        Path(store.root)
        / key
        / store.manifest(key)["files"][[f["relpath"] for f in store.manifest(key)["files"]].index(relpath)][
            "path"
        ]
    )


def test_predict_refuses_a_checkpoint_file_with_a_payload(tmp_path, image):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    evil.write_bytes(_evil_bytes(marker))
    out = _cli("predict", str(image), "--checkpoint", str(evil), env_store="file://" + str(tmp_path / "s"))
    assert out.returncode == 2, out.stderr
    assert "refus" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()


def test_store_model_and_resume_part_with_payloads_are_refused(tmp_path, image):
    store_uri = "file://" + str(tmp_path / "store")
    store = Store.from_uri(store_uri)
    emb = synthetic_embeddings(store, n=200)
    cfg = tiny_config(max_steps=20, checkpoint_every=10, log_every=10)
    inputs = run_inputs(store_uri, emb, cfg)

    # a resume part: an unfinished run leaves checkpoint parts; one is swapped for a payload
    with pytest.raises(RuntimeError, match="stopped at step 10"):
        train_run(store, emb, cfg, **inputs, stop_after_steps=10)
    parts = list((Path(store.root) / "runs").rglob("step-000000010.pt"))
    assert len(parts) == 1
    marker = tmp_path / "pwned-resume"
    parts[0].write_bytes(_evil_bytes(marker))
    try:
        key = train_run(store, emb, cfg, **inputs)
        assert store.manifest(key)["start_step"] == 0  # the tampered part was not resumed from
    except UserError as exc:
        assert checkpoint_relpath(10) in str(exc) or "checksum" in str(exc)
    assert not marker.exists()

    # a committed run's model.pt swapped for a payload: a plain `locdiff predict` refuses it
    key = train_run(store, emb, cfg.replace(train={"seed": 1}), **inputs)
    marker = tmp_path / "pwned-model"
    _committed_file(store, key, "model.pt").write_bytes(_evil_bytes(marker))
    out = _cli(
        "predict", str(image), "--checkpoint", key, "--encoder", "efficientnet-lite0", env_store=store_uri
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert not marker.exists()
