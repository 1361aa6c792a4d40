"""Synthetic embeddings: an embeddings artifact written from a formula, no images (scale and tests).

``synth_embeddings`` writes ``embeddings/<name>/synthetic/<hash>`` in the layout of
``locdiff.embedstore`` (the image stage's parts, arrays and skipped lists), so every reader and the
trainer take it as they take a real one; :data:`SYNTHETIC_NOTE` says what it is good for.
"""

from __future__ import annotations

import numpy as np

from locdiff.embedstore import part_done, write_part
from locdiff.stages import get_or_build
from locdiff.storage import ArtifactWriter, Store

SYNTHETIC_NOTE = (
    "SYNTHETIC: embeddings are a smooth noisy function of the location (no images); for scale "
    "measurements and tests only, never for accuracy claims"
)


def synthetic_rows(n: int, dim: int, seed: int, start: int = 0) -> dict[str, np.ndarray]:
    """Rows ``start..start+n`` of the synthetic table of ``seed``: photo-like locations (half around a
    few cities, half uniform on the sphere) and embeddings = Fourier features of the unit vector under
    a fixed random projection, plus Gaussian noise. Deterministic per (seed, start)."""
    proj = np.random.default_rng([seed, 0]).normal(0, 2.0, (3, dim - dim // 2))
    rng = np.random.default_rng([seed, 1, start])
    centres = np.array([[48.9, 2.3], [40.7, -74.0], [35.7, 139.7], [-33.9, 151.2], [-23.5, -46.6]])
    k = n // 2
    c = centres[rng.integers(0, len(centres), k)]
    lat = np.concatenate([c[:, 0] + rng.normal(0, 2, k), np.degrees(np.arcsin(rng.uniform(-1, 1, n - k)))])
    lon = np.concatenate([c[:, 1] + rng.normal(0, 2, k), rng.uniform(-180, 180, n - k)])
    lat = np.clip(lat, -89.9, 89.9)
    lon = (lon + 180) % 360 - 180
    la, lo = np.radians(lat), np.radians(lon)
    xyz = np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], 1)
    z = (xyz @ proj).astype(np.float32)  # [n, dim - dim//2]
    feats = np.concatenate([np.sin(z), np.cos(z)[:, : dim // 2]], 1)  # float32: bounded memory per part
    feats += 0.05 * rng.standard_normal(feats.shape, dtype=np.float32)
    emb = feats.astype(np.float16)
    split = np.full(n, "train", dtype=object)
    perm = rng.permutation(n)  # exactly 10 % val and 10 % test in every part
    split[perm[: n // 10]] = "val"
    split[perm[n // 10 : n // 5]] = "test"
    return {"emb": emb, "lat": lat, "lon": lon, "split": split}


def synth_embeddings(
    store: Store,
    name: str,
    rows: int,
    dim: int,
    seed: int = 0,
    part_rows: int = 100_000,
    encoder: str = "synthetic",
) -> str:
    """A synthetic embeddings artifact ``embeddings/<name>/synthetic/<hash>`` written directly, part by
    part (bounded memory at any size); see :data:`SYNTHETIC_NOTE`. Returns its key. ``encoder`` names the
    encoder the features stand in for (tests that predict real images with a run trained on them)."""
    if rows < 1 or dim < 2 or part_rows < 1:
        raise ValueError(f"rows, part_rows must be >= 1 and dim >= 2 (got {rows}, {part_rows}, {dim})")
    cfg = {
        "synthetic": True,
        "rows": int(rows),
        "dim": int(dim),
        "seed": int(seed),
        "part_rows": int(part_rows),
    }
    if encoder != "synthetic":
        cfg["encoder"] = encoder

    def build(w: ArtifactWriter) -> None:
        for index, start in enumerate(range(0, rows, part_rows)):
            if part_done(w, index):
                continue
            n = min(part_rows, rows - start)
            r = synthetic_rows(n, dim, seed, start)
            ids = [f"syn-{seed}-{start + i:09d}" for i in range(n)]
            write_part(w, index, ids, r["emb"], r["lat"], r["lon"], list(r["split"]))
            del r
        w.set(
            dataset=None,
            synthetic=True,
            note=SYNTHETIC_NOTE,
            encoder=encoder,
            dim=int(dim),
            embedding_dtype="float16",
            n_skipped=0,
            skipped=[],
        )

    return get_or_build(store, "embeddings", f"{name}/synthetic", cfg, [], build)
