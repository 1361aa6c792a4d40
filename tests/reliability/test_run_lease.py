"""One training per run key at a time: a second trainer of the same key waits for a live holder and
reuses its result, or takes over a crashed holder's expired lease and resumes from its checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from locdiff.storage import LEASE, Store
from tests.flows.conftest import run_inputs, synthetic_embeddings, tiny_config

ROOT = Path(__file__).resolve().parents[2]
CFG = dict(max_steps=30, checkpoint_every=10, log_every=10)
TRAIN = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(created)f %(message)s")
from locdiff.stages.runs import train_run
from locdiff.storage import Store
from tests.flows.conftest import run_inputs, tiny_config
uri, emb = sys.argv[1], sys.argv[2]
cfg = tiny_config(**json.loads(sys.argv[3]))
print(train_run(Store.from_uri(uri), emb, cfg, **run_inputs(uri, emb, cfg)))
"""


def _start(uri: str, emb: str, fault: str | None, ttl: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOCDIFF_LEASE_TTL_S": str(ttl), "HF_HUB_OFFLINE": "1"}
    env.pop("LOCDIFF_FAULT", None)
    if fault:
        env["LOCDIFF_FAULT"] = fault
    return subprocess.Popen(
        [sys.executable, "-c", TRAIN, uri, emb, json.dumps(CFG)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _setup(tmp_path) -> tuple[str, str, Store]:
    uri = "file://" + str(tmp_path / "store")
    store = Store.from_uri(uri)
    emb = synthetic_embeddings(store, n=200)
    run_inputs(uri, emb, tiny_config(**CFG))  # targets and anchors exist before the trainers race
    return uri, emb, store


def _wait_for_lease(store: Store) -> None:
    deadline = time.monotonic() + 120
    while not list(Path(store.root).glob(f"runs/*/*/{LEASE}")):
        assert time.monotonic() < deadline, "the first trainer never took its lease"
        time.sleep(0.1)


def test_second_trainer_waits_for_a_live_holder_and_reuses_its_run(tmp_path):
    uri, emb, store = _setup(tmp_path)
    first = _start(uri, emb, "runs:part-committed=sleep:4", ttl=2)  # holds the lease a while
    _wait_for_lease(store)
    second = _start(uri, emb, None, ttl=2)
    out1, err1 = first.communicate(timeout=300)
    out2, err2 = second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, err1[-2000:] + err2[-2000:]
    key = out1.strip().splitlines()[-1]
    assert out2.strip().splitlines()[-1] == key
    assert "waiting for it" in err2 and "reusing it" in err2, err2[-2000:]
    assert "starting run" not in err2  # the second process never trained
    assert store.manifest(key)["start_step"] == 0
    assert not list(Path(store.root).glob(f"runs/*/*/{LEASE}"))  # released


@pytest.mark.parametrize("holder", ["elsewhere", "here"])
def test_a_crashed_holders_lease_is_taken_over_and_the_next_trainer_resumes(tmp_path, holder):
    """A holder on another host (or container) is honoured until its lease expires; one that provably
    died on this host (its pid is gone) is taken over at once. Either way the next trainer resumes."""
    uri, emb, store = _setup(tmp_path)
    first = _start(uri, emb, "runs:part-committed@2", ttl=20)  # SIGKILLed after the step-20 checkpoint
    first.communicate(timeout=300)
    assert first.returncode == -9
    (lease,) = Path(store.root).glob(f"runs/*/*/{LEASE}")  # the dead holder's lease is still there
    body = json.loads(lease.read_text())
    assert body["pid"] == first.pid and body["host"] == os.uname().nodename
    if holder == "elsewhere":
        lease.write_text(json.dumps({**body, "host": "another-host"}))
    second = _start(uri, emb, None, ttl=20)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-2000:]
    key = out.strip().splitlines()[-1]
    resumed_at = float(next(ln for ln in err.splitlines() if "resuming run" in ln).split()[0])
    if holder == "elsewhere":
        assert resumed_at >= body["expires"]  # it did not start while that holder's lease was live
    else:
        assert resumed_at < body["expires"]  # the holder's pid is gone here: no wait for the expiry
    assert store.manifest(key)["start_step"] == 20  # resumed from the dead holder's checkpoint
    assert store.verify(key) == []


def test_only_a_provably_dead_holder_is_taken_over_before_expiry(tmp_path):
    from locdiff.storage import Lease

    store = Store.from_uri("file://" + str(tmp_path / "store"))
    key = store.key("runs", "lease", "1", {})
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    gone = int(done.stdout)  # a pid of this host that no longer exists
    here = {"host": os.uname().nodename, "pidns": os.readlink("/proc/self/ns/pid")}
    path = Path(store.root) / key / LEASE
    path.parent.mkdir(parents=True)
    for holder, taken in [
        ({**here, "pid": gone}, True),
        ({**here, "pid": os.getpid()}, False),  # alive (this process)
        ({**here, "pid": gone, "host": "another-host"}, False),
        ({**here, "pid": gone, "pidns": "pid:[1]"}, False),  # another container's pid namespace
        ({"pid": gone}, False),  # a lease written before leases named their host
    ]:
        expires = time.time() + 1.5
        path.write_text(json.dumps({"owner": f"x:{holder['pid']}:t", "expires": expires, **holder}))
        with Lease(store, key, ttl_s=60, poll_s=0.1):
            took_at = time.time()
        assert (took_at < expires) == taken, holder
