"""The artifact store: content-addressed keys, atomic commits, resume, concurrent writers, S3."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from locdiff.storage import ArtifactNotFoundError, Store


@pytest.fixture
def store(tmp_path):
    return Store.from_uri("file://" + str(tmp_path / "store"))


def test_key_is_content_addressed(store):
    k1 = store.key("embeddings", "demo/enc", "1", {"a": 1, "b": [1, 2]}, upstream=["x/y/1", "a/b/2"])
    k2 = store.key("embeddings", "demo/enc", "1", {"b": [1, 2], "a": 1}, upstream=["a/b/2", "x/y/1"])
    assert k1 == k2 and k1.startswith("embeddings/demo/enc/") and len(k1.rsplit("/", 1)[1]) == 16
    others = {
        store.key("embeddings", "demo/enc", "2", {"a": 1, "b": [1, 2]}, upstream=["x/y/1", "a/b/2"]),
        store.key("embeddings", "demo/enc", "1", {"a": 2, "b": [1, 2]}, upstream=["x/y/1", "a/b/2"]),
        store.key("embeddings", "demo/enc", "1", {"a": 1, "b": [1, 2]}, upstream=["x/y/1"]),
        store.key("targets", "demo/enc", "1", {"a": 1, "b": [1, 2]}, upstream=["x/y/1", "a/b/2"]),
    }
    assert k1 not in others and len(others) == 4
    with pytest.raises(ValueError, match="stage"):
        store.key("bad stage", "n", "1", {})


def test_commit_manifest_and_readback(store):
    key = store.key("datasets", "tiny", "1", {"n": 3})
    assert not store.exists(key)
    with pytest.raises(ValueError, match="not the key of this version, config and upstream"):
        store.writer(key, version="1", config={"n": 4})  # what the manifest records is what the key hashes
    with store.writer(key, version="1", config={"n": 3}) as w:
        w.write_table("manifest.parquet", pa.table({"x": [1, 2, 3]}))
        with w.open("blob.bin") as f:
            f.write(b"hello")
        w.set(note="ok", rows=3)
    assert store.exists(key)
    man = store.manifest(key)
    assert man["rows"] == 3 and man["note"] == "ok" and man["config"] == {"n": 3} and man["version"] == "1"
    assert man["code"]["locdiff"]
    assert {f["relpath"] for f in man["files"]} == {"manifest.parquet", "blob.bin"}
    blob = next(f for f in man["files"] if f["relpath"] == "blob.bin")
    assert blob["sha256"] == hashlib.sha256(b"hello").hexdigest() and blob["size"] == 5
    with store.open(key, "blob.bin") as f:
        assert f.read() == b"hello"
    assert store.read_table(key, "manifest.parquet")["x"].to_pylist() == [1, 2, 3]
    assert Path(store.uri(key, "blob.bin")).read_bytes() == b"hello"
    assert store.verify(key) == []
    assert [m["key"] for m in store.list()] == [key] and store.latest("datasets", "tiny") == key
    assert store.latest("runs") is None and store.list("runs") == []
    # tampering is detected by verify
    Path(store.uri(key, "blob.bin")).write_bytes(b"HELLO")
    assert store.verify(key) == ["blob.bin"]


def test_failed_writer_leaves_nothing_visible(store):
    key = store.key("datasets", "broken", "1", {})
    with pytest.raises(RuntimeError, match="boom"), store.writer(key, version="1", config={}) as w:
        w.write_bytes("a.bin", b"data")
        raise RuntimeError("boom")
    assert not store.exists(key) and store.list() == []
    with pytest.raises(ArtifactNotFoundError, match="datasets/broken/.* is not committed"):
        store.manifest(key)
    with pytest.raises(ArtifactNotFoundError):
        store.open(key, "a.bin")


def test_bad_relpath_and_missing_file(store):
    key = store.key("datasets", "p", "1", {})
    with store.writer(key, version="1", config={}) as w:
        for bad in ("../x", "/abs", "a/../b", "manifest.json", "_parts/x"):
            with pytest.raises(ValueError, match="relpath"):
                w.path(bad)
        w.write_bytes("ok.bin", b"1")
    with pytest.raises(ArtifactNotFoundError, match="no file 'nope.bin'"):
        store.uri(key, "nope.bin")
    with pytest.raises(ValueError, match="not a store key"):
        store.exists("../etc/passwd")


def test_resume_reuses_committed_parts(store):
    key = store.key("embeddings", "resume", "1", {})
    with pytest.raises(KeyboardInterrupt), store.writer(key, version="1", config={}) as w:
        w.write_bytes("part-0.bin", b"zero")
        w.commit_part("part-0.bin", rows=4)
        w.write_bytes("part-1.bin", b"on")  # not committed: must be rewritten
        raise KeyboardInterrupt
    assert not store.exists(key)
    with pytest.raises(KeyboardInterrupt), store.writer(key, version="1", config={}, resume=False) as w:
        assert not w.part_done("part-0.bin")  # a fresh run ignores earlier parts
        raise KeyboardInterrupt
    # a new failed attempt, then a resumed one
    with pytest.raises(KeyboardInterrupt), store.writer(key, version="1", config={}) as w:
        w.write_bytes("part-0.bin", b"zero")
        w.commit_part("part-0.bin", rows=4)
        raise KeyboardInterrupt
    with store.writer(key, version="1", config={}) as w:
        assert w.part_done("part-0.bin") and not w.part_done("part-1.bin")
        with w.open_part("part-0.bin") as f:
            assert f.read() == b"zero"
        with pytest.raises(ValueError, match="not a finished part"):
            w.open_part("part-1.bin")
        w.write_bytes("part-1.bin", b"one")
        w.commit_part("part-1.bin", rows=3)
    man = store.manifest(key)
    assert man["rows"] == 7 and {f["relpath"] for f in man["files"]} == {"part-0.bin", "part-1.bin"}
    parts = {f["relpath"]: f["path"] for f in man["files"]}
    assert parts["part-0.bin"].split("/")[1] != parts["part-1.bin"].split("/")[1]  # reused, not copied
    with store.open(key, "part-0.bin") as f:
        assert f.read() == b"zero"
    assert store.verify(key) == []


def test_two_writers_of_one_key_do_not_corrupt_each_other(store):
    key = store.key("datasets", "race", "1", {})
    w1, w2 = store.writer(key, version="1", config={}), store.writer(key, version="1", config={})
    with w1, w2:
        w1.write_bytes("data.bin", b"from writer one")
        w2.write_bytes("data.bin", b"from writer two, longer")
        w1.write_bytes("only1.bin", b"1")
    # both exits committed; the last commit wins and is internally consistent
    man = store.manifest(key)
    assert store.verify(key) == []
    with store.open(key, "data.bin") as f:
        data = f.read()
    assert data in (b"from writer one", b"from writer two, longer")
    assert ("only1.bin" in {f["relpath"] for f in man["files"]}) == (data == b"from writer one")


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from locdiff.storage import Store
    store = Store.from_uri(sys.argv[1])
    key = store.key("embeddings", "killed", "1", {"n": 3})
    with store.writer(key, version="1", config={"n": 3}) as w:
        for i in range(3):
            if w.part_done(f"part-{i}.bin"):
                continue
            with w.open(f"part-{i}.bin") as f:
                f.write(bytes([i]) * 1000)
                if i == 1:
                    f.flush()
                    print("HALFWAY", flush=True)
                    time.sleep(60)
            w.commit_part(f"part-{i}.bin", rows=10)
    print("DONE", flush=True)
    """
)


def test_sigkilled_writer_leaves_nothing_visible_and_resume_reuses_parts(tmp_path):
    uri = "file://" + str(tmp_path / "store")
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, str(script), uri], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "HALFWAY"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = Store.from_uri(uri)
    key = store.key("embeddings", "killed", "1", {"n": 3})
    assert not store.exists(key) and store.list() == []
    # re-run (in a subprocess again, the same code): part 0 is reused, parts 1 and 2 are written
    script.write_text(_KILLED_WRITER.replace("if i == 1:", "if False:"))
    cmd = [sys.executable, str(script), uri]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    assert "DONE" in out.stdout
    man = store.manifest(key)
    assert man["rows"] == 30 and store.verify(key) == []
    attempts = {f["relpath"]: f["path"].split("/")[1] for f in man["files"]}
    assert attempts["part-0.bin"] != attempts["part-1.bin"] == attempts["part-2.bin"]
    # equal to an uninterrupted run in a fresh store
    ref_uri = "file://" + str(tmp_path / "ref")
    subprocess.run([sys.executable, str(script), ref_uri], capture_output=True, env=env, check=True)
    ref = Store.from_uri(ref_uri)
    strip = lambda m: sorted((f["relpath"], f["sha256"], f["rows"]) for f in m["files"])  # noqa: E731
    assert strip(ref.manifest(key)) == strip(man)


def test_default_root_and_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCDIFF_STORAGE", str(tmp_path / "s"))
    s = Store.from_uri()
    assert s.root == str((tmp_path / "s").resolve()) and s.url.startswith("file://")
    assert pickle.loads(pickle.dumps(s)) == s
    with pytest.raises(Exception, match="unsupported storage URI scheme 'gs'"):
        Store.from_uri("gs://bucket/x")


@pytest.mark.e2e
def test_s3_store_roundtrip_without_leaking_secrets(s3_store, s3_server):
    store = s3_store
    assert s3_server.secret_key not in repr(store)
    key = store.key("datasets", "s3demo", "1", {"n": 2})
    with pytest.raises(RuntimeError), store.writer(key, version="1", config={"n": 2}) as w:
        w.write_bytes("x.bin", b"x")
        w.commit_part("x.bin", rows=1)
        raise RuntimeError("crash")
    assert not store.exists(key)
    with store.writer(key, version="1", config={"n": 2}) as w:
        assert w.part_done("x.bin")
        w.write_table("manifest.parquet", pa.table({"v": [1.5, 2.5]}))
    assert store.exists(key) and store.verify(key) == []
    assert store.uri(key, "manifest.parquet").startswith("s3://")
    assert store.read_table(key, "manifest.parquet")["v"].to_pylist() == [1.5, 2.5]
    raw = json.dumps(store.manifest(key))
    assert s3_server.secret_key not in raw and s3_server.access_key not in raw
    assert [m["key"] for m in store.list("datasets")] == [key]
    clone = pickle.loads(pickle.dumps(store))
    assert clone.exists(key)
