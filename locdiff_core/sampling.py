"""Multi-sample inference: K reverse-diffusion samples per image, averaged in coefficient space, decoded.

Per image we draw K samples (DDIM with S steps by default), batched over images × samples in one
network call per step. The K final x̂₀ are averaged in SHDD code space (x / √(4π)); the average of K
delta codes is the code of their empirical mixture, whose dominant mode the decoder finds
(``SHDD.decode``), along with the top-k modes and their mass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import SAMPLERS, InferConfig, LocDiffConfig
from .denoiser import CSUNet
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
):
    """Sample, average in code space, decode (chunked over images). Returns ``shdd``'s ``Decoded``."""
    infer = infer or InferConfig()
    emb = check_embeddings(emb, model.embed_dim)
    was_training = model.training
    model.eval()
    codes = []
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
    finally:
        model.train(was_training)
    coeffs = torch.cat(codes).to(torch.float64)  # [B, D]
    with torch.inference_mode():
        return shdd.decode(coeffs, rho_km=infer.rho_km, anchors=anchors, top_k=infer.top_k)


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
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(config, model.to(device), anchors=anchors)

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
    ):
        """emb [B, embed_dim] -> Decoded (lat_deg, lon_deg, score, modes_*) per image."""
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
        )
