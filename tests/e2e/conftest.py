"""One real local stack per test session: Prefect server on 127.0.0.1 (free port), project-local-style
PREFECT_HOME in a temporary folder, the project's prefect.yaml deployed, a process worker; all stopped
at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from locdiff.stack import Stack, deploy, free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    store = "file://" + str(tmp / "store")
    stack = Stack(
        root=ROOT,
        home=tmp / "prefect-home",
        port=free_port(None),
        pool="locdiff-e2e",
        extra_env={"LOCDIFF_STORAGE": store, "PREFECT_LOGGING_LEVEL": "INFO"},
    )
    try:
        stack.start_server()
        stack.ensure_pool()
        deploy(stack, ["default"])
        yield stack, store
    finally:
        stack.down(grace_s=5)
