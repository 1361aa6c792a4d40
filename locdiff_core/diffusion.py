"""The diffusion process as a schedule object (in the style of diffusers' schedulers), separate from the
network: ``add_noise`` for training, ``set_timesteps`` + ``step`` for sampling. The network predicts x₀.

Formulas (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"; Song et al. 2021, "Denoising
Diffusion Implicit Models"; cosine β: Nichol & Dhariwal 2021). With ᾱ_t = Π_{s≤t}(1 − β_s):

- forward: x_t = √ᾱ_t · x₀ + √(1 − ᾱ_t) · ε
- from a predicted x̂₀: ε̂ = (x_t − √ᾱ_t · x̂₀) / √(1 − ᾱ_t)
- DDIM (t → p, ᾱ_p = 1 at the end): σ = η · √((1 − ᾱ_p)/(1 − ᾱ_t)) · √(1 − ᾱ_t/ᾱ_p),
  x_p = √ᾱ_p · x̂₀ + √(1 − ᾱ_p − σ²) · ε̂ + σ · z
- DDPM ancestral over a strided grid: α = ᾱ_t/ᾱ_p, β = 1 − α,
  μ = √ᾱ_p · β/(1 − ᾱ_t) · x̂₀ + √α · (1 − ᾱ_p)/(1 − ᾱ_t) · x_t, var = β · (1 − ᾱ_p)/(1 − ᾱ_t),
  x_p = μ + √var · z (no noise on the last step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import SAMPLERS, DiffusionConfig


def make_betas(config: DiffusionConfig) -> Tensor:
    """β_t for t = 0..T-1 in float64."""
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float64)
    # cosine: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s) · π/2); β_t = 1 − ᾱ(t+1)/ᾱ(t), clipped
    s = config.cosine_s
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=config.max_beta)


@dataclass
class StepOutput:
    prev_sample: Tensor  # x at the previous (less noisy) timestep
    pred_x0: Tensor  # the x̂₀ used for the step


class NoiseSchedule:
    """Noise schedule + DDPM/DDIM samplers for an x₀-predicting network."""

    def __init__(self, config: DiffusionConfig | None = None):
        self.config = config or DiffusionConfig()
        self.num_train_timesteps = self.config.num_train_timesteps
        self.betas = make_betas(self.config)  # [T] float64
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # [T] float64
        self.timesteps: Tensor | None = None

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self.config)

    @classmethod
    def from_dict(cls, data: dict) -> NoiseSchedule:
        return cls(DiffusionConfig(**data))

    # -- training -----------------------------------------------------------------------------------
    def _abar(self, t: Tensor, like: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            top = self.num_train_timesteps - 1
            raise ValueError(f"timesteps must lie in [0, {top}], got {t.tolist()[:8]}")
        return self.alphas_cumprod[t].to(device=like.device, dtype=like.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε; x0, noise [B, D], t [B] long -> [B, D]."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
        abar = self._abar(t, x0).reshape(-1, *([1] * (x0.ndim - 1)))  # [B, 1]
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Uniform training timesteps [n] in 0..T-1."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=device)

    # -- sampling -----------------------------------------------------------------------------------
    def set_timesteps(self, num_steps: int) -> Tensor:
        """Choose S inference timesteps (descending) per ``config.timestep_spacing``."""
        T = self.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"num_steps={num_steps} must lie in [1, {T}]")
        spacing = self.config.timestep_spacing
        if spacing == "trailing":  # T-1, ..., ending T/S - 1 (starts from pure noise)
            ts = torch.round(torch.arange(T, 0, -T / num_steps, dtype=torch.float64)).long() - 1
        elif spacing == "leading":  # (S-1)·⌊T/S⌋, ..., 0
            ts = torch.arange(num_steps - 1, -1, -1, dtype=torch.long) * (T // num_steps)
        else:  # linspace over [0, T-1], rounded
            ts = torch.round(torch.linspace(T - 1, 0, num_steps, dtype=torch.float64)).long()
        self.timesteps = ts
        return ts

    def previous_timestep(self, t: int) -> int:
        """The next (smaller) timestep on the current grid; -1 after the last one."""
        if self.timesteps is None:
            raise ValueError("call set_timesteps(num_steps) before step()")
        idx = (self.timesteps == int(t)).nonzero()
        if idx.numel() == 0:
            raise ValueError(f"timestep {t} is not on the current grid {self.timesteps.tolist()}")
        i = int(idx[0, 0]) + 1
        return int(self.timesteps[i]) if i < len(self.timesteps) else -1

    def step(
        self,
        model_x0: Tensor,
        t: int,
        x_t: Tensor,
        *,
        sampler: str = "ddim",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """One reverse step from timestep t (a scalar on the grid) given the network's x̂₀."""
        if sampler not in SAMPLERS:
            allowed = ", ".join(map(repr, SAMPLERS))
            raise ValueError(f"sampler={sampler!r} is not allowed; allowed values: {allowed}")
        if eta < 0:
            raise ValueError(f"eta={eta} must be >= 0")
        t = int(t)
        prev = self.previous_timestep(t)
        abar_t = float(self.alphas_cumprod[t])
        abar_p = float(self.alphas_cumprod[prev]) if prev >= 0 else 1.0
        needs_noise = False
        if sampler == "ddim":
            eps = (x_t - math.sqrt(abar_t) * model_x0) / math.sqrt(1 - abar_t)
            sigma = eta * math.sqrt((1 - abar_p) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_p)
            mean = math.sqrt(abar_p) * model_x0 + math.sqrt(max(1 - abar_p - sigma**2, 0.0)) * eps
            needs_noise = sigma > 0
        else:
            alpha = abar_t / abar_p
            beta = 1 - alpha
            c0 = math.sqrt(abar_p) * beta / (1 - abar_t)
            ct = math.sqrt(alpha) * (1 - abar_p) / (1 - abar_t)
            mean = c0 * model_x0 + ct * x_t
            sigma = math.sqrt(beta * (1 - abar_p) / (1 - abar_t))
            needs_noise = prev >= 0 and sigma > 0
        if needs_noise:
            # draw on the generator's device (a CPU generator keeps CUDA runs reproducible), then move
            gdev = generator.device if generator is not None else x_t.device
            z = torch.randn(x_t.shape, generator=generator, device=gdev, dtype=x_t.dtype).to(x_t.device)
            mean = mean + sigma * z
        return StepOutput(prev_sample=mean, pred_x0=model_x0)
