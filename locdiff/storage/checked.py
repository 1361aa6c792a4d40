"""Checksum-verified reads of committed files: every byte read is hashed against the manifest's sha256."""

from __future__ import annotations

import hashlib
import io

import fsspec

from locdiff.errors import UserError

CHUNK = 4 << 20


class ChecksumMismatchError(UserError):
    """A committed file's bytes differ from its manifest (tampered, truncated or bit-rotted)."""

    def __init__(self, key: str, relpath: str, detail: str) -> None:
        super().__init__(
            f"artifact {key}, part {relpath} fails its checksum ({detail})",
            "the file changed after it was committed; delete the artifact and re-run the stage that "
            "produces it",
        )
        self.key = key
        self.relpath = relpath


def hash_file(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with fs.open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def check_whole(fs: fsspec.AbstractFileSystem, verified: set, key: str, entry: dict, path: str) -> None:
    """Hash a committed file whole against its manifest entry; remember it in ``verified``."""
    digest, n = hash_file(fs, path)
    rel = entry["relpath"]
    if n != int(entry["size"]):
        raise ChecksumMismatchError(key, rel, f"{n} bytes, the manifest says {entry['size']}")
    if digest != entry["sha256"]:
        raise ChecksumMismatchError(key, rel, "its sha256 differs from the manifest's")
    verified.add((path, entry["sha256"]))


class CheckedReader(io.RawIOBase):
    """A committed file read through the store, hashed as it goes (see :meth:`Store.open`)."""

    def __init__(
        self, fs: fsspec.AbstractFileSystem, verified: set, key: str, entry: dict, path: str
    ) -> None:
        super().__init__()
        self._fs, self._verified, self._key, self._entry, self._path = fs, verified, key, entry, path
        self._size = int(entry["size"])
        self._f = fs.open(path, "rb")
        try:
            actual = getattr(self._f, "size", None)
            if not isinstance(actual, int):
                actual = fs.size(path)
        except BaseException:
            self._f.close()
            raise
        if actual != self._size:
            self._f.close()
            raise ChecksumMismatchError(
                key, entry["relpath"], f"{actual} bytes, the manifest says {self._size}"
            )
        self._h = hashlib.sha256()
        self._hashed = 0  # bytes hashed so far, in order from the start
        self._pos = 0  # where the next read starts
        self._done = (path, entry["sha256"]) in verified

    def _fail(self, detail: str):
        self._done = True  # report once
        raise ChecksumMismatchError(self._key, self._entry["relpath"], detail)

    def _finish(self) -> None:
        if self._h.hexdigest() != self._entry["sha256"]:
            self._fail("its sha256 differs from the manifest's")
        self._done = True
        self._verified.add((self._path, self._entry["sha256"]))

    def _verify_whole(self) -> None:
        self._h = hashlib.sha256()
        try:
            check_whole(self._fs, self._verified, self._key, self._entry, self._path)
        finally:
            self._done = True  # checked (or reported) once

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END:
            target = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if target < 0:
            raise OSError(f"negative seek position {target}")
        if target != self._pos:
            self._f.seek(target)
            self._pos = target
        return self._pos

    def _read(self, n: int) -> bytes:
        if not self._done and self._pos != self._hashed:  # random access: check the whole file first
            self._verify_whole()
        data = self._f.read(n)
        self._account(data, n)
        return data

    def _account(self, data, asked: int) -> None:
        if not self._done:
            self._h.update(data)
            self._hashed += len(data)
            if self._hashed > self._size:
                self._fail(f"more than the manifest's {self._size} bytes")
            if self._hashed == self._size:
                self._finish()
            elif not len(data) and asked:
                self._fail(f"ends after {self._hashed} of {self._size} bytes")
        self._pos += len(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        return self._read(size)

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")
        direct = getattr(self._f, "readinto", None)
        if direct is None or (not self._done and self._pos != self._hashed):
            data = self._read(len(view))
            view[: len(data)] = data
            return len(data)
        n = direct(view) or 0
        self._account(view[:n], len(view))
        return n

    def readall(self) -> bytes:
        return bytes(self.read_rest())

    def read_rest(self) -> bytearray:
        """The rest of the file in one buffer (read and hashed in place: no extra copies)."""
        rest = max(0, self._size - self._pos)
        buf = bytearray(rest)
        view = memoryview(buf)
        got = 0
        while got < rest:
            n = self.readinto(view[got : got + CHUNK])
            if not n:
                self._fail(f"ends after {self._pos} of {self._size} bytes")
            got += n
        if self.read(1):  # at the end: finishes the check (and catches a file grown since it was opened)
            self._fail(f"more than the manifest's {self._size} bytes")
        return buf

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._done and self._hashed and self._pos == self._hashed:
                while not self._done and self._read(CHUNK):  # a partial read: check the rest too
                    pass
        finally:
            self._f.close()
            super().close()
