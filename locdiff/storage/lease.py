"""Leases: one builder per key at a time, across processes and hosts sharing a store."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from typing import TYPE_CHECKING

from locdiff.errors import UserError
from locdiff.storage.keys import check_key

if TYPE_CHECKING:
    from locdiff.storage.store import Store

LEASE = "_lease.json"
LEASE_TTL_ENV = "LOCDIFF_LEASE_TTL_S"


class LeaseTimeoutError(UserError):
    """Another live process holds the build of this key for longer than we were asked to wait."""


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _holder_died(body: dict) -> bool:
    """True only when a lease's holder provably died: it ran on this host, in this pid namespace, and
    its pid no longer exists. Anything else (another host or container, a recycled or foreign pid, no
    /proc) counts as alive, and its lease is honoured until it expires."""
    pid, ns = body.get("pid"), body.get("pidns")
    if body.get("host") != os.uname().nodename or ns is None or ns != _pid_namespace():
        return False
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: the pid exists (another user's process)
        return False
    return False


class Lease:
    """One builder per key at a time: ``with Lease(store, key) as lease: ...``.

    The holder writes ``<key>/_lease.json`` (owner, expiry) and a daemon thread renews it every ttl/3
    while the block runs; the file is removed on exit. A second process asking for the same key waits
    while the lease is live and (a) returns as soon as the key is committed (``committed`` is then
    True: reuse it, do not rebuild), or (b) takes the lease over once it has expired — its holder
    crashed — and builds, resuming from the parts the holder committed. A holder that provably died
    (same host and pid namespace, its pid gone: a SIGKILL, an OOM kill) is taken over at once instead of
    after its expiry. Taking over is a write followed by a read-back after a settle delay, so of two
    racing takers exactly one proceeds.
    """

    def __init__(
        self,
        store: Store,
        key: str,
        ttl_s: float | None = None,
        wait_s: float = 7 * 24 * 3600,
        poll_s: float | None = None,
        on_wait=None,
    ) -> None:
        self.store = store
        self.key = check_key(key)
        self.ttl_s = float(ttl_s if ttl_s is not None else os.environ.get(LEASE_TTL_ENV, 120))
        self.wait_s = float(wait_s)
        self.poll_s = float(poll_s if poll_s is not None else min(5.0, max(0.2, self.ttl_s / 6)))
        self.on_wait = on_wait
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"
        self.committed = False
        self._path = store._p(key, LEASE)
        self._stop = None
        self._thread = None

    def _read(self) -> dict | None:
        self.store._refresh(self._path)
        try:
            with self.store.fs.open(self._path, "rb") as f:
                data = json.loads(f.read())
        except (FileNotFoundError, OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _write(self) -> None:
        body = {
            "owner": self.owner,
            "expires": time.time() + self.ttl_s,
            "ttl_s": self.ttl_s,
            "host": os.uname().nodename,
            "pidns": _pid_namespace(),
            "pid": os.getpid(),
        }
        self.store._atomic_put(self._path, json.dumps(body).encode())

    def _try_take(self) -> bool:
        cur = self._read()
        if (
            cur is not None
            and cur.get("owner") != self.owner
            and cur.get("expires", 0) > time.time()
            and not _holder_died(cur)
        ):
            return False
        self._write()
        time.sleep(min(1.0, self.poll_s / 2))  # settle: a racing taker's write lands before we read back
        cur = self._read()
        return cur is not None and cur.get("owner") == self.owner

    def __enter__(self) -> Lease:
        import threading

        deadline = time.monotonic() + self.wait_s
        waited = False
        while True:
            if self.store.exists(self.key):
                self.committed = True
                return self
            if self._try_take():
                break
            if not waited and self.on_wait is not None:
                holder = self._read() or {}
                self.on_wait(holder.get("owner", "?"))
            waited = True
            if time.monotonic() > deadline:
                holder = self._read() or {}
                raise LeaseTimeoutError(
                    f"{self.key} is being built by {holder.get('owner', 'another process')}; "
                    f"gave up after waiting {self.wait_s:.0f} s",
                    "wait for that run to finish, or stop it; a crashed holder's lease expires by itself",
                )
            time.sleep(self.poll_s)
        self._stop = threading.Event()

        def renew() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                with contextlib.suppress(Exception):  # a missed renewal only shortens the lease
                    self._write()

        self._thread = threading.Thread(target=renew, name=f"lease {self.key}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            cur = self._read()
            if cur is not None and cur.get("owner") == self.owner:
                with contextlib.suppress(FileNotFoundError):
                    self.store.fs.rm(self._path)
        return False
