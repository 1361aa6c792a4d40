"""Baselines on the same embeddings, trained by the same loop style and budget (``TrainConfig``).

- ``regression``: MLP → unit vector on the sphere, geodesic (great-circle angle) loss.
- ``classification``: MLP → logits over equal-area cells (nearest point of a Fibonacci lattice),
  cross-entropy, predicts the centre of the arg-max cell.
- ``most_common_cell``: always predicts the centre of the training set's most populated cell.

Every baseline has ``predict(emb [B, E]) -> (lat_deg [B], lon_deg [B])``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .config import TrainConfig
from .data import GeoEmbeddings, PartedGeo, as_parted
from .sampling import check_embeddings
from .sphere import fibonacci_lattice, latlon_to_xyz, xyz_to_latlon
from .train import lr_at

BASELINE_KINDS = ("regression", "classification", "most_common_cell")


def assign_cells(lat_deg: Tensor, lon_deg: Tensor, centres_xyz: Tensor, chunk: int = 8192) -> Tensor:
    """Index of the nearest cell centre (max dot product) for each point: [N] long."""
    p = latlon_to_xyz(lat_deg.double(), lon_deg.double()).float()  # [N, 3]
    c = centres_xyz.float()  # [C, 3]
    return torch.cat([(p[s : s + chunk] @ c.T).argmax(dim=1) for s in range(0, p.shape[0], chunk)])


def _mlp(d_in: int, hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, d_out),
    )


class RegressionBaseline(nn.Module):
    def __init__(self, embed_dim: int, hidden: int = 512, dropout: float = 0.1):
        super().__init__()
        self.embed_dim = embed_dim
        self.net = _mlp(embed_dim, hidden, 3, dropout)

    def forward(self, emb: Tensor) -> Tensor:
        return nn.functional.normalize(self.net(emb), dim=-1)  # [B, 3] unit vectors

    def loss(self, emb: Tensor, lat: Tensor, lon: Tensor) -> Tensor:
        u = self(emb)  # [B, 3]
        v = latlon_to_xyz(lat, lon).to(u.dtype)  # [B, 3]
        # great-circle angle via atan2(|u×v|, u·v): well-conditioned near 0 and π, unlike acos
        return torch.atan2(torch.linalg.cross(u, v).norm(dim=-1), (u * v).sum(-1)).mean()

    @torch.inference_mode()
    def predict(self, emb: Tensor) -> tuple[Tensor, Tensor]:
        emb = check_embeddings(emb, self.embed_dim)
        self.eval()
        return xyz_to_latlon(self(emb.float()).double())


class ClassificationBaseline(nn.Module):
    def __init__(self, embed_dim: int, n_cells: int = 1024, hidden: int = 512, dropout: float = 0.1):
        super().__init__()
        self.embed_dim, self.n_cells = embed_dim, n_cells
        lat, lon = fibonacci_lattice(n_cells)
        self.register_buffer("centres_lat", lat)
        self.register_buffer("centres_lon", lon)
        self.register_buffer("centres_xyz", latlon_to_xyz(lat, lon))
        self.net = _mlp(embed_dim, hidden, n_cells, dropout)

    def forward(self, emb: Tensor) -> Tensor:
        return self.net(emb)  # [B, C] logits

    def loss(self, emb: Tensor, lat: Tensor, lon: Tensor) -> Tensor:
        return nn.functional.cross_entropy(self(emb), assign_cells(lat, lon, self.centres_xyz))

    @torch.inference_mode()
    def predict(self, emb: Tensor) -> tuple[Tensor, Tensor]:
        emb = check_embeddings(emb, self.embed_dim)
        self.eval()
        cell = self(emb.float()).argmax(dim=1)
        return self.centres_lat[cell], self.centres_lon[cell]


class MostCommonCell:
    """The trivial predictor: the centre of the most populated equal-area cell of the training set."""

    def __init__(self, train_data: GeoEmbeddings, n_cells: int = 1024):
        self.embed_dim = train_data.embed_dim
        lat, lon = fibonacci_lattice(n_cells)
        counts = torch.bincount(
            assign_cells(train_data.lat_deg, train_data.lon_deg, latlon_to_xyz(lat, lon)), minlength=n_cells
        )
        best = int(counts.argmax())
        self.lat_deg, self.lon_deg = float(lat[best]), float(lon[best])

    def predict(self, emb: Tensor) -> tuple[Tensor, Tensor]:
        emb = check_embeddings(emb, self.embed_dim)
        n = emb.shape[0]
        return torch.full((n,), self.lat_deg, dtype=torch.float64), torch.full(
            (n,), self.lon_deg, dtype=torch.float64
        )


def train_baseline(
    kind: str,
    train_data: GeoEmbeddings | PartedGeo,
    train_config: TrainConfig | None = None,
    *,
    hidden: int = 512,
    n_cells: int = 1024,
    dropout: float = 0.1,
    progress: Callable[[dict], None] | None = None,
):
    """Train one baseline with the LocDiff loop's knobs (batch size, steps, AdamW, warmup+cosine, clip).

    ``train_data``: in memory or memory-mapped (a ``PartedGeo``, as the pipeline's artifacts are read):
    each step gathers only its batch's rows."""
    if kind not in BASELINE_KINDS:
        raise ValueError(
            f"kind={kind!r} is not allowed; allowed values: {', '.join(map(repr, BASELINE_KINDS))}"
        )
    tc = train_config or TrainConfig()
    if kind == "most_common_cell":
        return MostCommonCell(train_data, n_cells)
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    if kind == "regression":
        model: nn.Module = RegressionBaseline(train_data.embed_dim, hidden, dropout)
    else:
        model = ClassificationBaseline(train_data.embed_dim, n_cells, hidden, dropout)
    opt = torch.optim.AdamW(
        model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay
    )
    data = as_parted(train_data)
    lat_all, lon_all = data.all_coords()
    model.train()
    for step in range(tc.max_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc.lr, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
        idx = torch.randint(0, len(train_data), (tc.batch_size,), generator=gen)
        loss = model.loss(data.gather(idx, ("emb",))["emb"].float(), lat_all[idx], lon_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{kind} baseline loss became {value} at step {step}")
        if progress and tc.log_every and (step + 1) % tc.log_every == 0:
            progress({"event": "train", "kind": kind, "step": step + 1, "loss": value})
    return model.eval()
