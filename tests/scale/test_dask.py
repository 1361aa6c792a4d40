"""The embed stage fanned out on Dask (prefect-dask's DaskTaskRunner): a 2-worker LocalCluster gives
the sequential stage's parts byte for byte; a Dask worker killed mid-run loses nothing; an unreachable
scheduler is a one-line error."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from locdiff import faults
from locdiff.datasets.bluemarble import build_bluemarble
from locdiff.encoders import load_encoder
from locdiff.errors import UserError
from locdiff.stages import EmbedSpec
from locdiff.stages.embeddings import embed_dataset
from locdiff.storage import Store

pytestmark = pytest.mark.slow

TINY = {"n": 40, "seed": 5, "size_px": 64, "shard_size": 10}  # 4 shards of 10 tiles
OPTIONS = {"image_size": 64, "batch_size": 4}


def _data_files(store: Store, key: str) -> dict[str, str]:
    """relpath -> sha256 of every part and array (what the stage computed, not the manifest fields)."""
    return {
        f["relpath"]: f["sha256"]
        for f in store.manifest(key)["files"]
        if f["relpath"].startswith(("parts/", "arrays/", "skipped/"))
    }


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    store = Store.from_uri(str(tmp_path_factory.mktemp("seq")))
    dkey = build_bluemarble(store, **TINY)
    enc = load_encoder("efficientnet-lite0", image_size=64)
    # Dask workers run one intra-op thread each (distributed sets OMP_NUM_THREADS=1 in them); CPU
    # kernels may round differently with another thread count, so the reference uses one thread too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        key = embed_dataset(store, dkey, batch_size=4, num_workers=0, encoder=enc)
    finally:
        torch.set_num_threads(threads)
    return dkey, key, _data_files(store, key)


def test_two_dask_workers_give_the_sequential_parts(prefect_harness, tmp_path, sequential):
    from locdiff.flows.stages import embed_flow

    dkey, seq_key, seq_files = sequential
    store = Store.from_uri(str(tmp_path / "dask"))
    assert build_bluemarble(store, **TINY) == dkey
    key = embed_flow(storage=store.url, spec=EmbedSpec(dkey, "efficientnet-lite0", OPTIONS), dask="local")
    assert key == seq_key
    files = _data_files(store, key)
    assert len(files) == 4 * 5 and files == seq_files  # byte-equal parts, arrays and skipped lists
    attempts = {f["path"].split("/")[1] for f in store.manifest(key)["files"] if f["relpath"] in files}
    assert len(attempts) >= 2  # the parts were written by more than one process


def test_a_killed_dask_worker_loses_nothing(prefect_harness, tmp_path, sequential, monkeypatch):
    from distributed import Client, LocalCluster

    from locdiff.flows.stages import embed_flow

    dkey, seq_key, seq_files = sequential
    store = Store.from_uri(str(tmp_path / "killed"))
    build_bluemarble(store, **TINY)
    # each worker holds its first shard task 3 s after committing its 5 parts (skipped, 3 arrays, part)
    monkeypatch.setenv(faults.ENV, "embeddings:part-committed@5=sleep:3")
    markers = Path(store.root) / seq_key / "_parts"
    killed = []
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(os.getpid)  # worker address -> pid

        def kill_one_after_first_part():
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if markers.is_dir() and len(list(markers.glob("*.json"))) >= 5:
                    pid = next(iter(pids.values()))
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
                time.sleep(0.2)

        t = threading.Thread(target=kill_one_after_first_part, daemon=True)
        t.start()
        spec = EmbedSpec(dkey, "efficientnet-lite0", OPTIONS)
        key = embed_flow(storage=store.url, spec=spec, dask=cluster.scheduler_address)
        t.join(timeout=10)
    assert killed, "no worker was killed: the test did not exercise the failure"
    assert key == seq_key and _data_files(store, key) == seq_files


def test_unreachable_scheduler_is_one_line():
    from locdiff.flows.stages import dask_task_runner

    with pytest.raises(UserError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9: "):
        dask_task_runner("tcp://127.0.0.1:9")
    with pytest.raises(UserError, match="not a Dask scheduler address"):
        dask_task_runner("127.0.0.1")
