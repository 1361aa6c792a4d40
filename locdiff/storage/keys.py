"""Store keys ``<stage>/<name>/<hash16>``: how they are made, parsed and checked, and the store's layout.

A key's hash is the sha256 of the canonical JSON of (stage, version, config, upstream); its stage and
name are read back from the key string (:class:`Key`), the rest is what a writer is given.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from locdiff.errors import UserError

MANIFEST = "manifest.json"
ATTEMPTS = "_attempts"
PARTS = "_parts"
LIVE = "_live"
_HASH_LEN = 16
KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-/=]+/[0-9a-f]{16}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-=]+(/[A-Za-z0-9_.\-=]+)*$")
_STAGE_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


class InvalidNameError(UserError, ValueError):
    """A dataset/artifact name a key cannot hold (spaces, control characters, a trailing newline)."""


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path | PurePosixPath):
        return str(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    if isinstance(obj, _dt.datetime | _dt.date):
        return obj.isoformat()
    raise TypeError(f"config value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces) used for hashing configs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default)


def to_jsonable(obj: Any) -> Any:
    return json.loads(canonical_json(obj))


def make_key(stage: str, name: str, version: str, config: dict, upstream: Iterable[str] = ()) -> str:
    """Content-addressed key ``<stage>/<name>/<hash16>``; hash of stage, version, config, upstream."""
    if not _STAGE_RE.fullmatch(stage or ""):
        raise ValueError(f"stage must match {_STAGE_RE.pattern}, got {stage!r}")
    if not _NAME_RE.fullmatch(name or ""):  # fullmatch: '$' would let a trailing newline through
        raise InvalidNameError(
            f"invalid artifact name {name!r}",
            "use letters, digits, '_', '.', '-', '=' (parts separated by '/'), e.g. mp16",
        )
    upstream = sorted(str(u) for u in upstream)
    payload = canonical_json(
        {"stage": stage, "version": str(version), "config": config, "upstream": upstream}
    )
    return f"{stage}/{name}/{hashlib.sha256(payload.encode()).hexdigest()[:_HASH_LEN]}"


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.fullmatch(key) or ".." in key.split("/"):
        raise ValueError(f"not a store key (expected '<stage>/<name>/<16 hex digits>'): {key!r}")
    return key


def check_relpath(relpath: str) -> str:
    if not isinstance(relpath, str) or not relpath:
        raise ValueError(f"relpath must be a non-empty string, got {relpath!r}")
    p = PurePosixPath(relpath)
    if p.is_absolute() or any(part in ("..", "", ".") for part in p.parts) or "\\" in relpath:
        raise ValueError(f"relpath must be a relative POSIX path without '..' or '.', got {relpath!r}")
    if p.parts[0] in (ATTEMPTS, PARTS) or relpath == MANIFEST:
        raise ValueError(f"relpath {relpath!r} is reserved by the store")
    return str(p)


@dataclasses.dataclass(frozen=True)
class Key:
    """A store key taken apart: ``<stage>/<name>/<hash16>`` (``name`` may hold slashes)."""

    stage: str
    name: str
    hash: str

    @classmethod
    def parse(cls, key: str) -> Key:
        stage, rest = check_key(key).split("/", 1)
        name, digest = rest.rsplit("/", 1)
        return cls(stage, name, digest)

    @property
    def head(self) -> str:
        """The first component of the name (a dataset name for most stages)."""
        return self.name.split("/", 1)[0]

    def __str__(self) -> str:
        return f"{self.stage}/{self.name}/{self.hash}"
