"""Multi-sample inference: K reverse-diffusion samples per image, averaged in coefficient space, decoded.

Per image we draw K samples (DDIM with S steps by default), batched over images × samples in one
network call per step. The K final x̂₀ are averaged in SHDD code space (x / √(4π)); the average of K
delta codes is the code of their empirical mixture, whose dominant mode the decoder finds
(``SHDD.decode``), along with the top-k modes and their mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import SAMPLERS, InferConfig, LocDiffConfig
from .denoiser import CSUNet
from .device import resolve_device
from .diffusion import NoiseSchedule


def check_embeddings(emb, embed_dim: int) -> Tensor:
    """Validate a batch of embeddings [B, embed_dim]: shape, non-empty, finite."""
    if not isinstance(emb, Tensor):
        emb = torch.as_tensor(emb)
    if emb.ndim != 2 or emb.shape[1] != embed_dim:
        raise ValueError(f"embeddings must have shape [B, {embed_dim}], got {tuple(emb.shape)}")
    if emb.shape[0] == 0:
        raise ValueError("empty batch: embeddings have 0 rows")
    if not emb.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {emb.dtype}")
    bad = (~torch.isfinite(emb).all(dim=1)).nonzero()
    if bad.numel():
        raise ValueError(f"embeddings contain NaN/inf in {bad.numel()} row(s) (first: row {int(bad[0, 0])})")
    return emb


@torch.inference_mode()
def sample_x0(
    model: CSUNet,
    schedule: NoiseSchedule,
    emb: Tensor,
    *,
    num_samples: int,
    num_steps: int,
    sampler: str = "ddim",
    eta: float = 0.0,
    guidance: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Run the reverse process for every image × sample: emb [B, E] -> final x̂₀ [B, K, D]."""
    if sampler not in SAMPLERS:
        raise ValueError(
            f"sampler={sampler!r} is not allowed; allowed values: {', '.join(map(repr, SAMPLERS))}"
        )
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    device = next(model.parameters()).device
    b, k, d = emb.shape[0], num_samples, model.dim
    e = emb.to(device=device, dtype=torch.float32).repeat_interleave(k, dim=0)  # [B*K, E]
    x = torch.randn((b * k, d), generator=generator).to(device)  # [B*K, D] noise drawn on CPU: reproducible
    x0 = x
    timesteps = schedule.set_timesteps(num_steps).tolist()
    for t in timesteps:
        tt = torch.full((b * k,), t, device=device, dtype=torch.long)  # [B*K]
        x0 = model.guided(x, tt, e, guidance).float()  # [B*K, D]
        out = schedule.step(x0, t, x, sampler=sampler, eta=eta, generator=generator)
        x = out.prev_sample
    return x0.reshape(b, k, d)  # [B, K, D]


@dataclass(frozen=True)
class Prediction:
    """The decoded averaged code plus where each of the K samples lands (``[B, K]``, on the anchor grid):
    the samples are LocDiff's own predicted distribution, from which the credible radii are measured."""

    decoded: object  # shdd.Decoded
    sample_lat_deg: Tensor  # [B, K]
    sample_lon_deg: Tensor  # [B, K]

    def radii_km(self, levels=(0.5, 0.9), scales=None) -> Tensor:
        """``[B, len(levels)]`` credible radii around the point estimate (see :func:`credible_radii`)."""
        return credible_radii(
            self.decoded.lat_deg,
            self.decoded.lon_deg,
            self.sample_lat_deg,
            self.sample_lon_deg,
            levels,
            scales,
        )


def sample_locations(x0_codes: Tensor, grid) -> tuple[Tensor, Tensor]:
    """Where each sampled code peaks on an anchor grid: codes ``[B, K, D]`` (c units) -> lat, lon
    ``[B, K]``."""
    b, k, d = x0_codes.shape
    vals = grid.evaluate(x0_codes.reshape(b * k, d))  # [B*K, A]
    arg = vals.argmax(dim=1)  # [B*K]
    lat = grid.lat_deg.to(torch.float64)[arg].reshape(b, k)
    lon = grid.lon_deg.to(torch.float64)[arg].reshape(b, k)
    return lat, lon


def credible_radii(point_lat, point_lon, sample_lat, sample_lon, levels=(0.5, 0.9), scales=None) -> Tensor:
    """Radii (km) around each point estimate holding a fraction ``levels`` of its K samples.

    The q-radius is the q-quantile (linear interpolation) of the haversine distances from the point
    estimate ``[B]`` to the samples ``[B, K]``, times ``scales[i]`` (a calibration factor fitted on a
    validation split, 1 = raw). Returns ``[B, len(levels)]`` float64.
    """
    from .sphere import haversine_km

    levels = [float(q) for q in levels]
    if any(not 0 < q < 1 for q in levels):
        raise ValueError(f"levels must lie in (0, 1), got {levels}")
    scales = [1.0] * len(levels) if scales is None else [float(s) for s in scales]
    if len(scales) != len(levels) or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be {len(levels)} positive numbers, got {scales}")
    pl = torch.as_tensor(point_lat, dtype=torch.float64)[:, None]
    po = torch.as_tensor(point_lon, dtype=torch.float64)[:, None]
    d = haversine_km(pl, po, sample_lat.to(torch.float64), sample_lon.to(torch.float64))  # [B, K]
    q = torch.quantile(d, torch.tensor(levels, dtype=torch.float64), dim=1).T  # [B, len(levels)]
    return q * torch.tensor(scales, dtype=torch.float64)


def predict_with(
    model: CSUNet,
    schedule: NoiseSchedule,
    shdd,
    emb: Tensor,
    *,
    num_samples: int,
    num_steps: int,
    sampler: str = "ddim",
    eta: float = 0.0,
    guidance: float = 1.0,
    generator: torch.Generator | None = None,
    infer: InferConfig | None = None,
    anchors=None,
    with_samples: bool = False,
):
    """Sample, average in code space, decode (chunked over images). Returns ``shdd``'s ``Decoded``, or
    with ``with_samples`` a :class:`Prediction` (plus each sample's location on the decoder's grid)."""
    infer = infer or InferConfig()
    emb = check_embeddings(emb, model.embed_dim)
    grid = (anchors if anchors is not None else shdd.default_grid()) if with_samples else None
    was_training = model.training
    model.eval()
    codes, s_lat, s_lon = [], [], []
    try:
        for start in range(0, emb.shape[0], infer.batch_size):
            chunk = emb[start : start + infer.batch_size]
            x0 = sample_x0(
                model,
                schedule,
                chunk,
                num_samples=num_samples,
                num_steps=num_steps,
                sampler=sampler,
                eta=eta,
                guidance=guidance,
                generator=generator,
            )  # [b, K, D]
            codes.append(x0.mean(dim=1).cpu() / shdd.scale)  # [b, D] averaged code
            if grid is not None:
                la, lo = sample_locations(x0.cpu() / shdd.scale, grid)  # [b, K] each
                s_lat.append(la)
                s_lon.append(lo)
    finally:
        model.train(was_training)
    coeffs = torch.cat(codes).to(torch.float64)  # [B, D]
    with torch.inference_mode():
        dec = shdd.decode(coeffs, rho_km=infer.rho_km, anchors=anchors, top_k=infer.top_k)
    if grid is None:
        return dec
    return Prediction(dec, torch.cat(s_lat), torch.cat(s_lon))


class Predictor:
    """Inference from a checkpoint (EMA weights by default)."""

    def __init__(self, config: LocDiffConfig, model: CSUNet, anchors=None):
        from .shdd import SHDD

        self.config = config
        self.model = model.eval().requires_grad_(False)
        self.schedule = NoiseSchedule(config.diffusion)
        self.shdd = SHDD(config.max_degree)
        self.anchors = anchors

    @classmethod
    def from_checkpoint(cls, state: dict, *, use_ema: bool = True, device: str | None = None, anchors=None):
        from .checkpoint import load_model

        config, model = load_model(state, use_ema=use_ema)
        return cls(config, model.to(resolve_device(device)), anchors=anchors)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def predict(
        self,
        emb: Tensor,
        *,
        K: int | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        guidance: float | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        with_samples: bool = False,
    ):
        """emb [B, embed_dim] -> Decoded (lat_deg, lon_deg, score, modes_*) per image; with
        ``with_samples`` a :class:`Prediction` (Decoded + each sample's location, for credible radii)."""
        inf = self.config.infer
        return predict_with(
            self.model,
            self.schedule,
            self.shdd,
            emb,
            num_samples=inf.num_samples if K is None else int(K),
            num_steps=inf.num_steps if steps is None else int(steps),
            sampler=inf.sampler if sampler is None else sampler,
            eta=inf.eta if eta is None else float(eta),
            guidance=inf.guidance if guidance is None else float(guidance),
            generator=generator,
            infer=inf,
            anchors=self.anchors,
            with_samples=with_samples,
        )
