"""A fixed subset of the fault sweep (tests/faults/harness.py): SIGKILL a real pipeline run mid-training
(after a checkpoint part is committed), between the evaluation's last write and its manifest, and
between the report's files and its manifest; re-run; every artifact verifies and the results equal a
clean run's. The whole sweep: `python -m tests.faults.harness`."""

from __future__ import annotations

import pytest

from tests.faults import harness

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

POINTS = ["runs:part-committed", "eval:before-manifest", "reports:before-manifest"]


@pytest.fixture(scope="module")
def server_env(tmp_path_factory):
    from locdiff.stack import Stack, free_port

    tmp = tmp_path_factory.mktemp("faults-stack")
    stack = Stack(root=harness.ROOT, home=tmp / "prefect-home", port=free_port(None), pool="faults")
    stack.start_server()
    try:
        yield stack.env()
    finally:
        stack.down(grace_s=5)


@pytest.fixture(scope="module")
def baseline(server_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    assert harness.run_pipeline("file://" + str(root), server_env) == 0
    return root, harness.outcome("file://" + str(root))


@pytest.mark.parametrize("point", POINTS)
def test_kill_and_rerun_loses_nothing(point, baseline, server_env, tmp_path):
    base_root, clean = baseline
    row = harness.check_point(point, base_root, clean, tmp_path, server_env)
    assert row["killed"], f"{point} was never reached"
    assert row["rerun_rc"] == 0
    assert row["failed_verify"] == 0
    assert row["equal"], f"after a kill at {point} the results differ from a clean run"
