"""Product tests: one tiny trained run (1280-d synthetic embeddings labelled with the offline
EfficientNet-Lite0 encoder, so real images can be predicted) in a temporary store per session."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from locdiff.storage import Store
from tests.flows.conftest import run_inputs, synthetic_embeddings, tiny_config

ENCODER = "efficientnet-lite0"


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> str:
    """A store URI holding one committed tiny run on 1280-d embeddings named after the offline encoder."""
    from locdiff.stages.runs import train_run

    uri = "file://" + str(tmp_path_factory.mktemp("product-store"))
    store = Store.from_uri(uri)
    emb = synthetic_embeddings(store, n=200, dim=1280, encoder=ENCODER)
    cfg = tiny_config(embed_dim=1280, max_steps=20, checkpoint_every=0, log_every=10)
    train_run(store, emb, cfg, **run_inputs(uri, emb, cfg), preset="tiny")
    return uri


@pytest.fixture(scope="session")
def run_key(tiny_store) -> str:
    return Store.from_uri(tiny_store).latest("runs")


def write_image(path: Path, size=(96, 72), color=(30, 120, 200), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def cli(*args: str, store: str | None = None) -> tuple[int, str, str]:
    """Run `locdiff ARGS` in this process (as `locdiff.cli.main` does): (exit code, stdout, stderr)."""
    from locdiff import cli as cli_mod

    out, err = io.StringIO(), io.StringIO()
    old_argv, old_env = sys.argv, os.environ.get("LOCDIFF_STORAGE")
    sys.argv = ["locdiff", *args]
    if store:
        os.environ["LOCDIFF_STORAGE"] = store
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli_mod.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old_argv
        if store:
            if old_env is None:
                os.environ.pop("LOCDIFF_STORAGE", None)
            else:
                os.environ["LOCDIFF_STORAGE"] = old_env
    return code, out.getvalue(), err.getvalue()
