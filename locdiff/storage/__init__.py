"""The content-addressed artifact store, one concern per module:

- :mod:`~locdiff.storage.keys`: keys (made, parsed, checked), canonical JSON, the store's layout names;
- :mod:`~locdiff.storage.store`: :class:`Store` (open, list, read, exists, manifest, latest, delete);
- :mod:`~locdiff.storage.checked`: checksum-verified reads and file hashing;
- :mod:`~locdiff.storage.writer`: :class:`ArtifactWriter` (attempts, parts, live files, the commit);
- :mod:`~locdiff.storage.lease`: :class:`Lease` (one builder per key at a time).
"""

from locdiff.storage.checked import ChecksumMismatchError, hash_file
from locdiff.storage.keys import Key
from locdiff.storage.lease import LEASE, Lease
from locdiff.storage.store import ArtifactNotFoundError, Store
from locdiff.storage.writer import ArtifactWriter

__all__ = [
    "LEASE",
    "ArtifactNotFoundError",
    "ArtifactWriter",
    "ChecksumMismatchError",
    "Key",
    "Lease",
    "Store",
    "hash_file",
]
