"""CS-UNet: the conditional Siren U-Net that denoises SHDD codes (docs/design.md §3).

Input x_t ∈ R^D (D = (L+1)²), an image embedding e of any width E, and the diffusion step t. The network
predicts x₀. Conditioning: t → sinusoidal features → MLP; e → linear projection (or a learned null
vector when the condition is dropped); their sum c drives a FiLM scale/offset in every block.

A C-Siren block is ``linear → FiLM → sin → dropout``. We apply FiLM to the ω₀-scaled pre-activation,
h = sin((1 + γ(c)) ⊙ ω₀(Wx + b) + β(c)), so γ and β act at unit scale whatever ω₀ is (with ω₀ = 30 in
the first layer, an offset inside the ω₀ product would be amplified thirty-fold). γ and β come from a
zero-initialised linear map, so at initialisation every block is a plain Siren layer and the Siren
initialisation (Sitzmann et al. 2020, "Implicit Neural Representations with Periodic Activation
Functions", §3.2) keeps pre-activations at unit scale: first layer W ~ U(-1/n, 1/n) with ω₀ = 30,
hidden layers W ~ U(-√(6/n)/ω₀, √(6/n)/ω₀).

Layout for widths (w0, w1, w2): input block D→w0, encoder w0→w1→w2, bottleneck w2→w2, decoder
[w2+w2]→w1, [w1+w1]→w0, [w0+w0]→w0 (skip concatenation), linear head w0→D.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import ModelConfig


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: [B] -> [B, dim] (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


class CSirenBlock(nn.Module):
    """linear → FiLM(c) → sin → dropout."""

    def __init__(self, d_in: int, d_out: int, cond_dim: int, omega0: float, first: bool, dropout: float):
        super().__init__()
        self.omega0 = float(omega0)
        self.linear = nn.Linear(d_in, d_out)
        self.film = nn.Linear(cond_dim, 2 * d_out)
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            bound = 1.0 / d_in if first else math.sqrt(6.0 / d_in) / self.omega0
            self.linear.weight.uniform_(-bound, bound)
            self.linear.bias.uniform_(-bound, bound)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        pre = self.omega0 * self.linear(x)  # [B, d_out]
        gamma, beta = self.film(cond).chunk(2, dim=-1)  # [B, d_out] each
        return self.dropout(torch.sin((1.0 + gamma) * pre + beta))  # [B, d_out]


class CSUNet(nn.Module):
    """Conditional Siren U-Net predicting x₀ from (x_t, t, embedding)."""

    def __init__(self, dim: int, embed_dim: int, config: ModelConfig | None = None):
        super().__init__()
        cfg = config or ModelConfig()
        if dim <= 0 or embed_dim <= 0:
            raise ValueError(f"dim={dim} and embed_dim={embed_dim} must be positive")
        self.dim, self.embed_dim, self.config = int(dim), int(embed_dim), cfg
        c, w = cfg.cond_dim, cfg.widths
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_embed_dim, c), nn.SiLU(), nn.Linear(c, c))
        self.embed_proj = nn.Linear(embed_dim, c)
        self.null_cond = nn.Parameter(torch.zeros(c))  # learned "no condition" (classifier-free guidance)
        self.cond_act = nn.SiLU()

        def block(d_in: int, d_out: int, first: bool = False) -> CSirenBlock:
            omega = cfg.first_omega0 if first else cfg.hidden_omega0
            return CSirenBlock(d_in, d_out, c, omega, first, cfg.dropout)

        self.inp = block(dim, w[0], first=True)
        self.down = nn.ModuleList(block(w[i], w[i + 1]) for i in range(len(w) - 1))
        self.mid = block(w[-1], w[-1])
        # decoder level i consumes [h, skip_i] where skip_i has width w[i]; outputs w[i-1] (or w[0])
        self.up = nn.ModuleList(block(2 * w[i], w[max(i - 1, 0)]) for i in range(len(w) - 1, -1, -1))
        self.head = nn.Linear(w[0], dim)

    def condition(self, t: Tensor, emb: Tensor | None, drop: Tensor | None = None) -> Tensor:
        """Conditioning vector c: [B, cond_dim]. ``drop`` [B] bool replaces e by the null condition."""
        c_t = self.time_mlp(timestep_embedding(t, self.config.time_embed_dim))  # [B, C]
        null = self.null_cond.to(c_t.dtype).expand_as(c_t)  # [B, C]
        if emb is None:
            c_e = null
        else:
            c_e = self.embed_proj(emb)  # [B, C]
            if drop is not None:
                c_e = torch.where(drop[:, None], null.to(c_e.dtype), c_e)  # [B, C]
        return self.cond_act(c_t + c_e)  # [B, C]

    def forward(self, x_t: Tensor, t: Tensor, emb: Tensor | None, drop: Tensor | None = None) -> Tensor:
        """x_t [B, D], t [B] (int or float steps), emb [B, E] or None (unconditional) -> x₀ [B, D]."""
        if x_t.ndim != 2 or x_t.shape[-1] != self.dim:
            raise ValueError(f"x_t must have shape [B, {self.dim}], got {tuple(x_t.shape)}")
        if emb is not None and (emb.ndim != 2 or emb.shape[-1] != self.embed_dim):
            raise ValueError(f"embedding must have shape [B, {self.embed_dim}], got {tuple(emb.shape)}")
        cond = self.condition(t, emb, drop)  # [B, C]
        h = self.inp(x_t, cond)  # [B, w0]
        skips = [h]
        for blk in self.down:
            h = blk(h, cond)  # [B, w_{i+1}]
            skips.append(h)
        h = self.mid(h, cond)  # [B, w_last]
        for blk in self.up:
            h = blk(torch.cat([h, skips.pop()], dim=-1), cond)  # [B, w_{i-1}]
        return self.head(h)  # [B, D]

    def guided(self, x_t: Tensor, t: Tensor, emb: Tensor, guidance: float) -> Tensor:
        """Classifier-free guidance: x̂₀ = u + w·(c − u); w = 1 is the plain conditional prediction."""
        if guidance == 1.0:
            return self(x_t, t, emb)
        b = x_t.shape[0]
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x_t.device)
        out = self(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([emb, emb]), drop)  # [2B, D]
        cond, uncond = out[:b], out[b:]
        return uncond + guidance * (cond - uncond)  # [B, D]
