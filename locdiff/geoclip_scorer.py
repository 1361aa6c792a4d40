"""GeoCLIP retrieval scorer for LocDiff-H, built from the pretrained parts shipped in the `geoclip` wheel.

GeoCLIP (Vivanco Cepeda et al., NeurIPS 2023) scores an image against a GPS gallery by the cosine of
(a) its CLIP ViT-L/14 image features passed through a small MLP head (768 → 768 → ReLU → 512) and
(b) a location encoder's features of each gallery coordinate, times a learned logit scale. The wheel
ships the head, the location encoder and the logit scale (`geoclip/model/weights/*.pth`) and the
100 K MP16 gallery (`geoclip/model/gps_gallery/coordinates_100K.csv`). We load only those: the CLIP
backbone is never built or fetched (no network), the caller passes 768-d CLIP image features.

Gallery features are computed once (lazily, in chunks) and cached in memory; ``save_cache``/
``load_cache`` persist them (≈200 MB in float32 for 100 K points) so a worker computes them once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

GEOCLIP_IMAGE_DIM = 768  # CLIP ViT-L/14 projected image features
GEOCLIP_FEATURE_DIM = 512


def geoclip_package_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("geoclip")
    if spec is None or spec.origin is None:
        from locdiff.errors import UserError

        raise UserError("the `geoclip` package is not installed", "pip install geoclip")
    return Path(spec.origin).parent


def load_geoclip_gallery(package_dir: Path | None = None) -> tuple[Tensor, Tensor]:
    """The 100 K MP16 gallery coordinates that ship with geoclip: (lat_deg, lon_deg) float64."""
    path = (package_dir or geoclip_package_dir()) / "model" / "gps_gallery" / "coordinates_100K.csv"
    arr = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    with open(path) as f:
        header = f.readline().strip().split(",")
    if header[:2] != ["LAT", "LON"]:
        raise ValueError(f"{path}: expected header LAT,LON, got {header}")
    return torch.from_numpy(arr[:, 0].copy()), torch.from_numpy(arr[:, 1].copy())


class GeoCLIPScorer:
    """``score(clip_features [B, 768], gallery_idx [M]) -> [B, M]`` GeoCLIP logits (higher is better)."""

    def __init__(
        self,
        gallery_lat_deg: Tensor | None = None,
        gallery_lon_deg: Tensor | None = None,
        *,
        device: str = "cpu",
        chunk: int = 8192,
    ):
        from geoclip.model.location_encoder import (
            LocationEncoder,  # the wheel's class; weights from the wheel
        )

        pkg = geoclip_package_dir()
        weights = pkg / "model" / "weights"
        if gallery_lat_deg is None or gallery_lon_deg is None:
            gallery_lat_deg, gallery_lon_deg = load_geoclip_gallery(pkg)
        if gallery_lat_deg.shape != gallery_lon_deg.shape or gallery_lat_deg.ndim != 1:
            raise ValueError("gallery_lat_deg and gallery_lon_deg must be 1-D tensors of the same length")
        self.gallery_lat_deg = gallery_lat_deg.to(torch.float64)
        self.gallery_lon_deg = gallery_lon_deg.to(torch.float64)
        self.device = torch.device(device)
        self.chunk = int(chunk)
        self.location_encoder = LocationEncoder(from_pretrained=False)
        self.location_encoder.load_state_dict(_load(weights / "location_encoder_weights.pth"))
        # Same layout as GeoCLIP's image head, so its shipped weights load by name.
        self.image_head = nn.Sequential(
            nn.Linear(GEOCLIP_IMAGE_DIM, GEOCLIP_IMAGE_DIM), nn.ReLU(), nn.Linear(GEOCLIP_IMAGE_DIM, 512)
        )
        self.image_head.load_state_dict(_load(weights / "image_encoder_mlp_weights.pth"))
        self.logit_scale = float(_load(weights / "logit_scale_weights.pth").exp())
        for m in (self.location_encoder, self.image_head):
            m.to(self.device).eval().requires_grad_(False)
        self._gallery_features: Tensor | None = None

    @property
    def embed_dim(self) -> int:
        return GEOCLIP_IMAGE_DIM

    @torch.inference_mode()
    def gallery_features(self) -> Tensor:
        """L2-normalised location features of the whole gallery [G, 512], computed once."""
        if self._gallery_features is None:
            gps = torch.stack([self.gallery_lat_deg, self.gallery_lon_deg], dim=1).float()  # [G, 2]
            feats = [
                nn.functional.normalize(self.location_encoder(gps[s : s + self.chunk].to(self.device)), dim=1)
                for s in range(0, gps.shape[0], self.chunk)
            ]
            self._gallery_features = torch.cat(feats)  # [G, 512]
        return self._gallery_features

    def save_cache(self, f) -> None:
        torch.save({"n": len(self.gallery_lat_deg), "features": self.gallery_features().cpu()}, f)

    def load_cache(self, f) -> None:
        state = torch.load(f, map_location="cpu", weights_only=True)
        if state["n"] != len(self.gallery_lat_deg):
            raise ValueError(
                f"cached gallery has {state['n']} points, this gallery {len(self.gallery_lat_deg)}"
            )
        self._gallery_features = state["features"].to(self.device)

    @torch.inference_mode()
    def image_features(self, clip_features: Tensor) -> Tensor:
        if clip_features.ndim != 2 or clip_features.shape[1] != GEOCLIP_IMAGE_DIM:
            raise ValueError(
                f"GeoCLIP expects CLIP ViT-L/14 image features [B, {GEOCLIP_IMAGE_DIM}], "
                f"got {tuple(clip_features.shape)}"
            )
        if not torch.isfinite(clip_features).all():
            raise ValueError("CLIP features contain NaN/inf")
        return nn.functional.normalize(
            self.image_head(clip_features.float().to(self.device)), dim=1
        )  # [B, 512]

    @torch.inference_mode()
    def score(self, emb: Tensor, gallery_idx: Tensor | None = None) -> Tensor:
        """GeoCLIP logits of each image against gallery points ``gallery_idx`` (all when None): [B, M]."""
        img = self.image_features(emb)  # [B, 512]
        gal = self.gallery_features()  # [G, 512]
        if gallery_idx is not None:
            gal = gal[gallery_idx.to(gal.device)]  # [M, 512]
        return (self.logit_scale * img @ gal.T).cpu()  # [B, M]

    @torch.inference_mode()
    def top1(self, emb: Tensor) -> tuple[Tensor, Tensor]:
        """Plain GeoCLIP: the best gallery point for each image (lat_deg, lon_deg)."""
        best = self.score(emb).argmax(dim=1)
        return self.gallery_lat_deg[best], self.gallery_lon_deg[best]


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)
