"""Every read of a committed part is checked against the manifest's sha256, in one pass; writers hash
while writing; resume re-checks a reused part's checksum, not just its size."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pytest

from locdiff.storage import ChecksumMismatchError, Store
from locdiff.storage import writer as storage_writer


@pytest.fixture
def store(tmp_path):
    return Store.from_uri("file://" + str(tmp_path / "store"))


def _artifact(store, payload: bytes = b"0123456789" * 100_000):
    key = store.key("bench", "blob", "1", {"n": len(payload)})
    with store.writer(key, version="1", config={"n": len(payload)}) as w:
        w.write_bytes("blob.bin", payload)
        w.write_table("t.parquet", pa.table({"x": list(range(1000))}))
        w.write_bytes("note.txt", "héllo\nworld\n".encode())
    return key, payload


def _flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_intact_reads_pass_every_way(store):
    key, payload = _artifact(store)
    assert store.read_bytes(key, "blob.bin") == payload
    with store.open(key, "blob.bin") as f:  # small sequential reads
        got = b"".join(iter(lambda: f.read(777), b""))
    assert got == payload
    with store.open(key, "blob.bin") as f:  # random access
        f.seek(500_000)
        assert f.read(10) == payload[500_000:500_010]
        f.seek(-5, io.SEEK_END)
        assert f.read() == payload[-5:]
    with store.open(key, "blob.bin") as f:  # a partial read: the rest is checked on close
        assert f.read(3) == payload[:3]
    with store.open(key, "note.txt", "r") as f:
        assert f.read() == "héllo\nworld\n"
    assert store.read_table(key, "t.parquet")["x"].to_pylist() == list(range(1000))
    assert store.read_table(key, "t.parquet", columns=["x"]).num_rows == 1000


@pytest.mark.parametrize("how", ["whole", "chunks", "seek", "partial", "table"])
def test_a_tampered_part_is_refused_naming_artifact_and_part(store, how):
    key, payload = _artifact(store)
    rel = "t.parquet" if how == "table" else "blob.bin"
    _flip(Path(store.uri(key, rel)), at=len(payload) - 10 if how != "table" else 40)
    fresh = Store.from_uri(store.url)  # no verification cached from the writer's process state
    with pytest.raises(ChecksumMismatchError, match=f"artifact {key}, part {rel} fails its checksum"):
        if how == "whole":
            fresh.read_bytes(key, rel)
        elif how == "chunks":
            with fresh.open(key, rel) as f:
                while f.read(4096):
                    pass
        elif how == "seek":
            with fresh.open(key, rel) as f:
                f.seek(10)
                f.read(10)
        elif how == "partial":
            with fresh.open(key, rel) as f:
                f.read(10)
        else:
            fresh.read_table(key, rel)
    assert fresh.read_bytes(key, rel, verify=False) != b""  # the unchecked path still exists, on request


def test_a_truncated_part_is_refused_before_any_byte_is_read(store):
    key, payload = _artifact(store)
    path = Path(store.uri(key, "blob.bin"))
    path.write_bytes(payload[:-1000])
    with pytest.raises(ChecksumMismatchError, match=r"part blob\.bin fails its checksum \(999000 bytes"):
        store.open(key, "blob.bin")


def test_the_writer_hashes_while_writing_and_does_not_read_parts_back(store, monkeypatch):
    reads: list[str] = []
    real = storage_writer.hash_file

    def counting(fs, path):
        reads.append(path)
        return real(fs, path)

    monkeypatch.setattr(storage_writer, "hash_file", counting)
    key = store.key("bench", "w", "1", {})
    with store.writer(key, version="1", config={}) as w:
        for i in range(3):
            with w.open(f"part-{i}.bin") as f:
                f.write(b"abc" * (i + 1))
                f.write(memoryview(b"xyz"))
            w.commit_part(f"part-{i}.bin", rows=1)
        w.write_table("t.parquet", pa.table({"x": [1, 2]}))
    assert reads == []
    man = store.manifest(key)
    for e in man["files"]:
        data = Path(store.uri(key, e["relpath"])).read_bytes()
        assert e["sha256"] == hashlib.sha256(data).hexdigest() and e["size"] == len(data)
    # a file written to w.path() by another writer is hashed at commit (it was not seen being written)
    key2 = store.key("bench", "w2", "1", {})
    with store.writer(key2, version="1", config={}) as w:
        Path(w.path("ext.bin")).write_bytes(b"external")
    assert len(reads) == 1 and store.verify(key2) == []


def test_resume_rejects_a_reused_part_whose_bytes_changed(store):
    key = store.key("bench", "resume", "1", {})
    with pytest.raises(RuntimeError), store.writer(key, version="1", config={}) as w:
        w.write_bytes("a.bin", b"A" * 1000)
        w.commit_part("a.bin", rows=1)
        w.write_bytes("b.bin", b"B" * 1000)
        w.commit_part("b.bin", rows=1)
        raise RuntimeError("crash")
    staged = {p.name: p for p in Path(store.root, key).rglob("*.bin")}
    _flip(staged["a.bin"], at=3)  # same size, different bytes: a size check alone would take it
    with store.writer(key, version="1", config={}) as w:
        assert not w.part_done("a.bin")
        assert w.part_done("b.bin")
        with w.open_part("b.bin") as f:
            assert f.read() == b"B" * 1000
        w.write_bytes("a.bin", b"A" * 1000)
        w.commit_part("a.bin", rows=1)
    assert store.verify(key) == [] and store.read_bytes(key, "a.bin") == b"A" * 1000


def test_dataset_image_reads_are_checked(store, tmp_path):
    from locdiff.datasets import shards as ds
    from tests.data.test_datasets import jpeg

    key = store.key("datasets", "tiny", "1", {})
    recs = [ds.ImageRecord(f"i{i}", 1.0, 2.0, jpeg(i), split="test") for i in range(3)]
    with store.writer(key, version="1", config={}) as w:
        ds.write_dataset(w, recs, shard_size=10)
    row = ds.read_manifest(store, key).to_pylist()[1]
    assert ds.read_image(store, key, row["shard"], row["offset"], row["size"]) == jpeg(1)
    _flip(Path(store.uri(key, row["shard"])), at=row["offset"] + 50)
    fresh = Store.from_uri(store.url)
    with pytest.raises(ChecksumMismatchError, match="part shards/shard-00000.tar fails its checksum"):
        ds.read_image(fresh, key, row["shard"], row["offset"], row["size"])
    with pytest.raises(ChecksumMismatchError):
        list(ds.iter_shard(fresh, key, row["shard"]))


@pytest.mark.e2e
def test_s3_tampered_object_is_refused(s3_store):
    store = s3_store
    key, payload = _artifact(store, b"s3 bytes " * 1000)
    assert store.read_bytes(key, "blob.bin") == payload
    store.fs.pipe_file(store.fspath(key, "blob.bin"), payload.replace(b"s3", b"S3", 1))
    fresh = Store.from_uri(store.url)
    with pytest.raises(ChecksumMismatchError, match=f"artifact {key}, part blob.bin fails its checksum"):
        fresh.read_bytes(key, "blob.bin")


def test_mapped_arrays_are_checked_before_they_are_mapped(store):
    """Training and evaluation map the .npy arrays instead of reading them: a tampered array is refused
    when opened, naming artifact and part."""
    from locdiff.datasets.synth import synth_embeddings
    from locdiff.embedstore import iter_embeddings, open_embeddings

    key = synth_embeddings(store, "chk", rows=300, dim=8, seed=0, part_rows=100)
    fresh = Store.from_uri(store.root)
    assert len(open_embeddings(fresh, key, "train")) > 0
    _flip(Path(fresh.fspath(key, "arrays/part-00001.emb.npy", verify=False)), at=500)
    for opener in (open_embeddings, lambda s, k, sp: list(iter_embeddings(s, k, sp)[1])):
        with pytest.raises(ChecksumMismatchError, match=r"arrays/part-00001\.emb\.npy fails its checksum"):
            opener(Store.from_uri(store.root), key, "train")


@pytest.mark.e2e
def test_s3_array_cache_is_private_and_checked_on_reuse(s3_store, tmp_path, monkeypatch):
    """Arrays of an S3 artifact are mapped from a local cache: it is a 0700 folder of this user's, and a
    cached file that changed after it was filled (zeroed, even with its mtime put back) is fetched again,
    in this process and in a fresh one, never mapped as data."""
    import os
    import stat

    import numpy as np

    from locdiff import embedstore
    from locdiff.datasets.synth import synth_embeddings
    from locdiff.embedstore import MMAP_CACHE_ENV, iter_embeddings
    from locdiff.errors import UserError

    def rows(store):
        return np.concatenate([b[1] for b in iter_embeddings(store, key)[1]])

    cache = tmp_path / "cache"
    monkeypatch.setenv(MMAP_CACHE_ENV, str(cache))
    monkeypatch.setattr(embedstore, "_CACHE_STAMPS", {})
    key = synth_embeddings(s3_store, "cached", rows=200, dim=8, seed=0, part_rows=100)
    want = rows(s3_store)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    files = sorted(cache.glob("*.npy"))
    assert len(files) == 6 and np.abs(want).sum() > 0
    for fresh_process in (False, True):
        st = files[0].stat()
        files[0].write_bytes(b"\0" * st.st_size)  # same size, zeros
        os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
        if fresh_process:
            embedstore._CACHE_STAMPS.clear()
        np.testing.assert_array_equal(rows(Store.from_uri(s3_store.url)), want)
        assert files[0].read_bytes() != b"\0" * st.st_size  # fetched again
    os.chmod(cache, 0o777)  # a cache others can write is refused, naming the fix
    with pytest.raises(UserError, match=r"array cache .* only it can write"):
        rows(s3_store)
    os.chmod(cache, 0o700)
    if os.getuid() == 0:  # root can hand the folder to another user: then it is not ours
        os.chown(cache, 4242, -1)
        with pytest.raises(UserError, match="array cache .* not a folder of this user's"):
            rows(s3_store)


def test_a_committed_key_is_never_rewritten(store):
    key, payload = _artifact(store)
    with pytest.raises(ValueError, match="is committed; a committed key is never rewritten"):
        with store.writer(key, version="1", config={"n": len(payload)}) as w:
            w.write_bytes("blob.bin", b"other bytes")
    assert store.read_bytes(key, "blob.bin") == payload and store.verify(key) == []
