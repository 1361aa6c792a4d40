"""The fault sweep (tests/faults/harness.py) in its short form: SIGKILL a real pipeline run at one
representative point of each kind — a dataset build after its 2nd shard, embedding after its 3rd part,
the anchors between their files and the manifest, training after a checkpoint part, the evaluation's
and the report's commits — re-run; every artifact verifies and the results equal a clean run's.
The whole sweep, all 24 points: `pytest tests/faults --all-fault-points` (or `python -m
tests.faults.harness`, which prints the table that docs/orchestration.md quotes)."""

from __future__ import annotations

import pytest

from tests.faults import harness

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

POINTS = [
    "datasets:part-committed@2",
    "embeddings:part-committed@3",
    "anchors:before-manifest@2",
    "runs:part-committed",
    "eval:before-manifest",
    "reports:before-manifest",
]


def pytest_generate_tests(metafunc):
    if "point" in metafunc.fixturenames:
        full = metafunc.config.getoption("--all-fault-points")
        metafunc.parametrize("point", harness.SWEEP if full else POINTS)


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


def test_kill_and_rerun_loses_nothing(point, baseline, server_env, tmp_path):
    base_root, clean = baseline
    row = harness.check_point(point, base_root, clean, tmp_path, server_env)
    assert row["killed"], f"{point} was never reached"
    assert row["rerun_rc"] == 0
    assert row["failed_verify"] == 0
    assert row["equal"], f"after a kill at {point} the results differ from a clean run"
