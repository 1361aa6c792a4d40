"""Registry of the geolocation datasets this project knows: where they come from and what to watch for.

The entries live in ``registry.toml`` beside this module (facts from the datasets' own pages and the
papers that use them, links in each entry). The published files and how they are joined live in
:mod:`locdiff.datasets.sources` (`locdiff datasets download NAME`); `locdiff datasets prepare NAME
--manifest FILE` builds any dataset from a manifest.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from locdiff.errors import UserError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    kind: str  # "hub" | "urls" | "archive" | "byo" | "embedded" | "user"
    n_images: str
    size: str
    sources: tuple[str, ...]
    licence: str
    columns: dict[str, str]  # our column -> column name in the source metadata
    pitfalls: tuple[str, ...]
    obtain: str  # how to get it onto this machine / into the store
    metadata: tuple[str, ...] = field(default_factory=tuple)
    splits: tuple[str, ...] = ("test",)
    swapped_header_risk: bool = False
    # a deterministic val split: rows of the first split whose image id hashes into this many buckets of
    # VAL_BUCKETS become "val" (hashed_val); 0: none
    val_buckets: int = 0


VAL_BUCKETS = 1_000_000  # hash buckets of DatasetSpec.val_buckets


def val_mask(image_ids, buckets: int) -> list[bool]:
    """True for the ids in the val slice: the first 8 bytes of sha1(id) modulo :data:`VAL_BUCKETS` fall
    below ``buckets``. A pure function of the id, so the same image is in val in every build, whatever
    else the manifest holds."""
    import hashlib

    return [
        int.from_bytes(hashlib.sha1(str(i).encode()).digest()[:8], "big") % VAL_BUCKETS < buckets
        for i in image_ids
    ]


def hashed_val(name: str, table):
    """``table`` (a validated manifest: ``image_id``, ``split``) with the registered dataset's hashed val
    slice taken out of its first split (the one its rows get by default); unchanged for other datasets."""
    spec = REGISTRY.get(name.lower())
    if spec is None or not spec.val_buckets:
        return table
    mask = (table["split"] == spec.splits[0]).to_numpy() & val_mask(table["image_id"], spec.val_buckets)
    table = table.copy()
    table.loc[mask, "split"] = "val"
    return table


def _load() -> dict[str, DatasetSpec]:
    """The entries of ``registry.toml`` (beside this module), in file order."""
    raw = tomllib.loads((Path(__file__).parent / "registry.toml").read_text(encoding="utf-8"))
    licences = raw.pop("licences")
    out = {}
    for name, entry in raw.items():
        entry = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
        entry["licence"] = licences.get(entry["licence"], entry["licence"])
        out[name] = DatasetSpec(name=name, **entry)
    return out


REGISTRY: dict[str, DatasetSpec] = _load()


def get(name: str) -> DatasetSpec:
    """The registry entry for ``name``; a UserError listing the known names otherwise."""
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        raise UserError(
            f"unknown dataset {name!r}",
            f"known: {', '.join(sorted(REGISTRY))}; any other name works with --manifest FILE",
        ) from None


def names() -> list[str]:
    return list(REGISTRY)
