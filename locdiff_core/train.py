"""Training LocDiff: one readable loop (in the spirit of nanoGPT's train.py).

``train(config, train_data, val_data)`` runs AdamW with a warmup + cosine learning rate (a pure function
of the step, so there is no scheduler state to save), gradient clipping, EMA weights, periodic
validation (median km of the EMA model on a fixed validation subset), bf16 autocast and TF32 on CUDA.

Determinism: every random draw of the loop (batch indices, timesteps, noise, condition dropout,
anchors) comes from one CPU ``torch.Generator`` seeded by ``train.seed``; dropout layers use the global
torch RNG, seeded too. A checkpoint stores the model, the EMA, the optimizer, the step, every RNG state
(loop generator, torch, CUDA, numpy, python), the config and the curves; resuming from it continues
bit-for-bit on CPU. No file I/O here: checkpoints are state dicts handed to ``checkpoint_callback`` and
taken back through ``resume_from`` (the task layer saves them with ``torch.save``).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .checkpoint import (
    CHECKPOINT_FORMAT,
    build_model,
    check_compatible,
    pack_rng,
    unpack_numpy_rng,
    unpack_python_rng,
)
from .config import LocDiffConfig
from .data import BatchSampler, GeoEmbeddings, PartedGeo, as_parted
from .device import resolve_device
from .diffusion import NoiseSchedule
from .sampling import predict_with
from .shdd import SHDD

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnchorPools:
    """The point sets SHDD-KL anchors are drawn from at every step (docs/design.md §3 "Anchors").

    ``uniform_*`` [U]: an equal-area set (the pipeline's uniform anchor-set artifact); ``data_*`` [M]: the
    photo distribution (the pipeline's data anchor-set artifact, drawn from the training coordinates).
    """

    uniform_lat: Tensor
    uniform_lon: Tensor
    data_lat: Tensor
    data_lon: Tensor

    @classmethod
    def default(cls, config: LocDiffConfig, data: GeoEmbeddings) -> AnchorPools:
        """Without artifacts: the decoder's Fibonacci lattice and the training coordinates themselves."""
        from .anchors import uniform_anchors

        lat, lon = uniform_anchors(config.decoder_anchor_count)
        return cls(lat, lon, data.lat_deg, data.lon_deg)


@dataclass
class TrainResult:
    checkpoint: dict  # the final checkpoint (see module docstring)
    step: int
    curves: dict = field(default_factory=dict)  # {"train": [...], "val": [...]}
    val_metrics: dict | None = None  # last periodic/final validation metrics


def lr_at(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``lr·min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return lr * min_lr_ratio
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params, model_params = list(ema.parameters()), [p.detach() for p in model.parameters()]
    if len(ema_params) != len(model_params):
        raise ValueError("EMA and model have different parameter lists")
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)  # one multi-tensor kernel


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay warmed up as min(decay, (1+step)/(10+step)) so early averages are not stuck at init."""
    return min(decay, (1 + step) / (10 + step))


# --------------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------------
def sample_anchors(
    config: LocDiffConfig,
    target_lat: Tensor,
    target_lon: Tensor,
    pools: AnchorPools,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Fresh SHDD-KL anchors for one step: uniform pool + data pool + caps around the batch targets.

    Pool points are drawn with replacement (O(n) per step; a draw without replacement would cost a
    permutation of the pool every step).
    """
    from .anchors import near_target_anchors

    lc = config.loss
    lats, lons = [], []
    for n, lat, lon in (
        (lc.n_uniform_anchors, pools.uniform_lat, pools.uniform_lon),
        (lc.n_data_anchors, pools.data_lat, pools.data_lon),
    ):
        if n:
            idx = torch.randint(0, lat.shape[0], (n,), generator=generator)
            lats.append(lat[idx]), lons.append(lon[idx])
    if lc.n_near_anchors:
        la, lo = near_target_anchors(target_lat, target_lon, lc.near_radius_km, lc.n_near_anchors, generator)
        lats.append(la.reshape(-1)), lons.append(lo.reshape(-1))
    return torch.cat([x.to(torch.float64) for x in lats]), torch.cat([x.to(torch.float64) for x in lons])


def compute_loss(
    config: LocDiffConfig,
    shdd,
    pred_x0: Tensor,
    x0: Tensor,
    anchors: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, dict[str, float]]:
    """The selected loss on the predicted x₀ (x = √(4π)·code); returns (loss, parts for logging)."""
    lc = config.loss
    parts: dict[str, float] = {}
    loss = pred_x0.new_zeros(())
    if lc.kind in ("mse", "mse+kl"):
        mse = (pred_x0 - x0).pow(2).mean()
        parts["mse"] = float(mse.detach())
        loss = loss + (lc.mse_weight if lc.kind == "mse+kl" else 1.0) * mse
    if lc.kind in ("kl", "mse+kl"):
        assert anchors is not None
        scale = shdd.scale
        kl = shdd.kl_loss(pred_x0 / scale, x0 / scale, anchors[0], anchors[1], tau=lc.tau)
        parts["kl"] = float(kl.detach())
        loss = loss + (lc.kl_weight if lc.kind == "mse+kl" else 1.0) * kl
    return loss, parts


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------
def _rng_state(gen: torch.Generator) -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return pack_rng(gen, np.random.get_state(), random.getstate(), cuda)  # noqa: NPY002 (global state)


def _set_rng_state(gen: torch.Generator, state: dict) -> None:
    gen.set_state(state["loop"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(unpack_numpy_rng(state["numpy"]))  # noqa: NPY002
    random.setstate(unpack_python_rng(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu_state_dict(module: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` process group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(
    config: LocDiffConfig,
    train_data: GeoEmbeddings | PartedGeo,
    val_data: GeoEmbeddings | PartedGeo | None = None,
    *,
    checkpoint_callback: Callable[[dict], None] | None = None,
    resume_from: dict | None = None,
    progress: Callable[[dict], None] | None = None,
    max_steps: int | None = None,
    anchor_pools: AnchorPools | None = None,
    data_device: str | torch.device | None = None,
) -> TrainResult:
    """Train (or resume) LocDiff; stop at ``max_steps`` (absolute step) or ``config.train.max_steps``.

    x₀ comes from ``train_data.codes`` when it holds them (the target cache), else from encoding the
    coordinates. SHDD-KL anchors are drawn from ``anchor_pools`` (default: :meth:`AnchorPools.default`).
    ``train_data`` may be a ``PartedGeo`` (memory-mapped parts, read a batch at a time); with
    ``data_device`` its rows are first copied to that device and sampled there (same batches).

    Under an initialised ``torch.distributed`` process group (torchrun) the model is wrapped in DDP:
    every rank draws the same global batch and computes on its slice (``locdiff_core.data``),
    gradients are averaged, and only rank 0 calls ``checkpoint_callback``, ``progress`` events other
    than "train", and validation.

    ``max_steps`` stops early without changing the LR schedule (that is what lets k + (N−k) equal N).
    """
    tc = config.train
    rank, world = distributed_rank_world()
    if train_data.embed_dim != config.embed_dim:
        raise ValueError(
            f"train_data embeddings are {train_data.embed_dim}-d but config.embed_dim={config.embed_dim}"
        )
    if val_data is not None and val_data.embed_dim != config.embed_dim:
        raise ValueError(
            f"val_data embeddings are {val_data.embed_dim}-d, config.embed_dim={config.embed_dim}"
        )
    stop_at = tc.max_steps if max_steps is None else min(int(max_steps), tc.max_steps)
    device = resolve_device(tc.device, "train.device")
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # the launcher set LOCAL_RANK's device
    sampler = BatchSampler(len(train_data), tc.batch_size, rank, world)
    use_bf16 = device.type == "cuda" and tc.amp in ("auto", "bf16")
    if tc.amp == "bf16" and not use_bf16:
        log.warning("train.amp='bf16' runs on CUDA only: training on %s in float32", device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # -- model, EMA, optimizer, RNG -----------------------------------------------------------------
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed % 2**32)  # noqa: NPY002 (seed the global state too)
    random.seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    model = build_model(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    decay_params = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other_params = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay_params, "weight_decay": tc.weight_decay},
            {"params": other_params, "weight_decay": 0.0},
        ],
        lr=tc.lr,
        betas=(tc.beta1, tc.beta2),
        foreach=True,  # one fused multi-tensor update: faster than per-tensor on CPU for this many params
    )
    schedule = NoiseSchedule(config.diffusion)
    shdd = SHDD(config.max_degree)
    step = 0
    curves: dict[str, list] = {"train": [], "val": []}
    if resume_from is not None:
        check_compatible(config, resume_from)
        model.load_state_dict(resume_from["model"])
        ema.load_state_dict(resume_from["ema"])
        optimizer.load_state_dict(resume_from["optimizer"])
        step = int(resume_from["step"])
        curves = copy.deepcopy(resume_from.get("curves", curves))
        _set_rng_state(gen, resume_from["rng"])

    data = as_parted(train_data)
    if data.has_codes and data.code_dim != config.dim:
        raise ValueError(
            f"train_data.codes have {data.code_dim} coordinates, L={config.max_degree} needs "
            f"{config.dim}: the target cache was built for another max_degree"
        )
    if data_device is not None:
        data = data.to_device(data_device)
    if config.loss.kind != "mse" and anchor_pools is None:
        anchor_pools = AnchorPools.default(config, train_data)
    val_subset = None
    if val_data is not None and rank == 0:
        n_val = min(tc.eval_size, len(val_data))
        val_subset = val_data.subset(
            torch.randperm(len(val_data), generator=torch.Generator().manual_seed(1))[:n_val]
        )

    def make_checkpoint() -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config.to_dict(),
            "step": step,
            "model": _cpu_state_dict(model),
            "ema": _cpu_state_dict(ema),
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            # the LR is a pure function of the step (lr_at); recorded for readers, nothing to restore
            "scheduler": {
                "kind": "warmup+cosine",
                "lr": lr_at(step, tc.lr, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio),
            },
            "rng": _rng_state(gen),
            "curves": copy.deepcopy(curves),
            "world_size": world,
        }

    def evaluate() -> dict:
        from .metrics import geolocation_metrics

        ema.eval()
        dec = predict_with(
            ema,
            schedule,
            shdd,
            val_subset.emb,
            num_samples=tc.eval_samples,
            num_steps=tc.eval_steps,
            sampler="ddim",
            generator=torch.Generator().manual_seed(tc.seed + 1),
            infer=config.infer,
        )
        m = geolocation_metrics(val_subset.lat_deg, val_subset.lon_deg, dec.lat_deg, dec.lon_deg)
        return {k: float(v) for k, v in m.items()}

    # -- loop ---------------------------------------------------------------------------------------
    val_metrics = None
    model.train()
    t0, seen, loss_acc, n_acc = time.perf_counter(), 0, 0.0, 0
    while step < stop_at:
        lr = lr_at(step, tc.lr, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        idx = sampler.draw(gen)  # [B] the global batch, the same on every rank
        lat, lon = data.coords(idx)  # [B] (all ranks: near-target anchors follow the global batch)
        mine = sampler.local(idx)  # [b] = [B / world] this rank's rows
        rows = data.gather(mine, ("emb", "codes"))
        emb = rows["emb"].to(device=device, dtype=torch.float32)  # [b, E]
        code = rows["codes"] if data.has_codes else shdd.encode(sampler.local(lat), sampler.local(lon))
        x0 = (shdd.scale * code.to(torch.float64)).to(device=device, dtype=torch.float32)  # [b, D]
        t = sampler.local(schedule.sample_timesteps(tc.batch_size, generator=gen))  # [b]
        noise = sampler.local(torch.randn((tc.batch_size, config.dim), generator=gen)).to(device)  # [b, D]
        drop = sampler.local(torch.rand(tc.batch_size, generator=gen) < config.model.p_uncond).to(device)
        anchors = sample_anchors(config, lat, lon, anchor_pools, gen) if config.loss.kind != "mse" else None
        x_t = schedule.add_noise(x0, noise, t.to(device))  # [b, D]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = net(x_t, t.to(device), emb, drop)  # [b, D]
        loss, parts = compute_loss(config, shdd, pred.float(), x0, anchors)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
            if tc.grad_clip > 0
            else 0.0
        )
        optimizer.step()
        ema_update(ema, model, ema_decay_at(step, tc.ema_decay))
        step += 1
        seen += tc.batch_size
        loss_acc += float(loss.detach())
        n_acc += 1
        if not math.isfinite(loss_acc):
            raise FloatingPointError(f"loss became {loss_acc} at step {step}; lower train.lr (now {tc.lr})")

        if tc.log_every and (step % tc.log_every == 0 or step == stop_at):
            elapsed = time.perf_counter() - t0
            if world > 1:  # the mean over ranks of the per-rank means = the global batch's mean
                red = torch.tensor([loss_acc, *parts.values()], dtype=torch.float64)
                torch.distributed.all_reduce(red)
                loss_acc, parts = (
                    float(red[0]) / world,
                    {k: float(v) / world for k, v in zip(parts, red[1:].tolist(), strict=True)},
                )
            row = {"step": step, "loss": loss_acc / n_acc, "lr": lr, "grad_norm": grad_norm, **parts}
            row["samples_per_s"] = seen / max(elapsed, 1e-9)
            curves["train"].append(row)
            if progress:
                progress({"event": "train", **row, "max_steps": tc.max_steps})
            t0, seen, loss_acc, n_acc = time.perf_counter(), 0, 0.0, 0
        if val_subset is not None and tc.eval_every and (step % tc.eval_every == 0 or step == stop_at):
            val_metrics = evaluate()
            curves["val"].append({"step": step, **val_metrics})
            if progress:
                progress({"event": "val", "step": step, **val_metrics})
        if (
            rank == 0
            and checkpoint_callback
            and tc.checkpoint_every
            and step % tc.checkpoint_every == 0
            and step < stop_at
        ):
            checkpoint_callback(make_checkpoint())

    final = make_checkpoint()
    if rank == 0 and checkpoint_callback:
        checkpoint_callback(final)
    return TrainResult(checkpoint=final, step=step, curves=curves, val_metrics=val_metrics)
