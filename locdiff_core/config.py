"""Typed, validated configuration for the LocDiff model, its diffusion process, training and inference.

Every choice of the method (docs/design.md §3) is a field here with a documented default. The dataclasses are
frozen and validated on construction; ``to_dict``/``from_dict`` round-trip exactly (tuples survive a
JSON trip). Named presets:

- ``tiny``: unit tests on CPU (L=8, widths 128/64, a few hundred steps).
- ``cpu``: the embedded offline demo on 2 cores (L=16, widths 512/256/128, 1280-d EfficientNet features).
- ``default``: GPU-sized LocDiff on CLIP ViT-L/14 features (L=32, widths 1024/512/256, embed_dim 768).
- ``mp16``: ``default`` at a larger degree (L=64) and batch, for full MP16 training.

``get_preset("cpu", max_degree=24, train={"max_steps": 500})`` applies overrides (nested dicts for the
sub-configs) and validates the result.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        need = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} must be a finite number {need}")


def _check_fraction(name: str, value: float, *, closed_high: bool = False) -> None:
    ok = 0.0 <= value <= 1.0 if closed_high else 0.0 <= value < 1.0
    if not ok:
        rng = "[0, 1]" if closed_high else "[0, 1)"
        raise ValueError(f"{name}={value!r} must lie in {rng}")


@dataclass(frozen=True)
class ModelConfig:
    """CS-UNet (conditional Siren U-Net) architecture."""

    widths: tuple[int, ...] = (1024, 512, 256)  # encoder widths; the decoder mirrors them
    cond_dim: int = 512  # width of the conditioning vector (time MLP + embedding projection)
    time_embed_dim: int = 128  # sinusoidal timestep features before the time MLP
    first_omega0: float = 30.0  # Siren ω₀ of the input layer (Sitzmann et al. 2020)
    hidden_omega0: float = 1.0  # Siren ω₀ of the hidden layers (weights carry the scale)
    dropout: float = 0.0  # dropout after each sine activation
    p_uncond: float = 0.1  # condition dropout during training -> classifier-free guidance

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if not self.widths or any(w <= 0 for w in self.widths):
            raise ValueError(f"model.widths={self.widths!r} must be a non-empty tuple of positive ints")
        for name in ("cond_dim", "time_embed_dim"):
            _check_positive(f"model.{name}", getattr(self, name))
        if self.time_embed_dim % 2:
            raise ValueError(f"model.time_embed_dim={self.time_embed_dim} must be even (sin/cos pairs)")
        _check_positive("model.first_omega0", self.first_omega0)
        _check_positive("model.hidden_omega0", self.hidden_omega0)
        _check_fraction("model.dropout", self.dropout)
        _check_fraction("model.p_uncond", self.p_uncond)


BETA_SCHEDULES = ("linear", "cosine")
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
PREDICTION_TYPES = ("x0",)


@dataclass(frozen=True)
class DiffusionConfig:
    """Forward noising process (DDPM, Ho et al. 2020; cosine schedule: Nichol & Dhariwal 2021)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "cosine"
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02  # linear schedule only
    cosine_s: float = 0.008  # cosine schedule offset
    max_beta: float = 0.999  # cosine schedule clip
    # Inference timestep spacing; "trailing" starts at t = T-1 (pure noise), see Lin et al. 2024,
    # "Common Diffusion Noise Schedules and Sample Steps are Flawed".
    timestep_spacing: str = "trailing"
    prediction_type: str = "x0"  # the network predicts x₀ so SHDD-KL applies to its output

    def __post_init__(self) -> None:
        if int(self.num_train_timesteps) < 2:
            raise ValueError(f"diffusion.num_train_timesteps={self.num_train_timesteps} must be >= 2")
        _check_choice("diffusion.beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("diffusion.timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("diffusion.prediction_type", self.prediction_type, PREDICTION_TYPES)
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(
                f"diffusion.beta_start={self.beta_start}, beta_end={self.beta_end}: need 0 < start < end < 1"
            )
        _check_positive("diffusion.cosine_s", self.cosine_s)
        if not 0 < self.max_beta < 1:
            raise ValueError(f"diffusion.max_beta={self.max_beta} must lie in (0, 1)")


LOSS_KINDS = ("mse", "kl", "mse+kl")


@dataclass(frozen=True)
class LossConfig:
    """Training loss on the predicted x₀ (docs/design.md §3: plain MSE, SHDD-KL, or their weighted sum)."""

    kind: str = "mse"  # the prototype saw no gain from KL at L=16 (docs/design.md §6a); the ablation decides
    mse_weight: float = 1.0
    kl_weight: float = 1.0
    tau: float = 0.1  # SHDD-KL temperature, relative to the peak value (L+1)²/4π
    # Anchors for SHDD-KL, resampled every step: points drawn from the uniform anchor set (the decoder's,
    # infer.decoder_anchors), points drawn from the data anchor set (data_anchor_pool training
    # coordinates: the photo distribution) and points in caps around each batch target.
    n_uniform_anchors: int = 512
    n_data_anchors: int = 256
    n_near_anchors: int = 4  # per target in the batch
    near_radius_km: float = 500.0
    data_anchor_pool: int = 100_000  # size of the data anchor set the pipeline draws once

    def __post_init__(self) -> None:
        _check_choice("loss.kind", self.kind, LOSS_KINDS)
        _check_positive("loss.mse_weight", self.mse_weight, allow_zero=True)
        _check_positive("loss.kl_weight", self.kl_weight, allow_zero=True)
        _check_positive("loss.tau", self.tau)
        for name in ("n_uniform_anchors", "n_data_anchors", "n_near_anchors"):
            _check_positive(f"loss.{name}", getattr(self, name), allow_zero=True)
        _check_positive("loss.near_radius_km", self.near_radius_km)
        _check_positive("loss.data_anchor_pool", self.data_anchor_pool)
        if self.kind != "mse" and self.n_uniform_anchors + self.n_data_anchors + self.n_near_anchors == 0:
            raise ValueError(f"loss.kind={self.kind!r} needs anchors: all anchor counts are 0")


AMP_MODES = ("auto", "bf16", "none")
TARGET_SOURCES = ("cache", "per_batch")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """One training run (nanoGPT-style knobs)."""

    batch_size: int = 256
    max_steps: int = 100_000
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 1000
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.999
    seed: int = 0
    amp: str = "auto"  # bf16 autocast on CUDA when "auto"; never on CPU
    device: str = "auto"
    log_every: int = 50
    eval_every: int = 1000  # 0 disables periodic evaluation
    eval_size: int = 512  # validation subset size for the periodic median-km check
    eval_samples: int = 4  # K during periodic evaluation
    eval_steps: int = 10  # sampler steps during periodic evaluation
    checkpoint_every: int = 1000  # 0: only at the end
    # x₀ source: "cache" = the pipeline's SHDD target cache (measured faster on CPU, bench_targets.py),
    # "per_batch" = encode each batch's coordinates (no cache built; cheaper on disk at MP16 scale)
    targets: str = "cache"
    # steps of the trained baselines (regression, classification) that the evaluation stage fits beside
    # this run, with this section's batch size, lr, schedule, clipping and seed (warm-up capped at a tenth)
    baseline_steps: int = 2000

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "lr", "eval_size", "eval_samples", "eval_steps",
                     "baseline_steps"):
            _check_positive(f"train.{name}", getattr(self, name))
        for name in ("warmup_steps", "weight_decay", "grad_clip", "log_every", "eval_every"):
            _check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        _check_positive("train.checkpoint_every", self.checkpoint_every, allow_zero=True)
        _check_fraction("train.min_lr_ratio", self.min_lr_ratio, closed_high=True)
        _check_fraction("train.beta1", self.beta1)
        _check_fraction("train.beta2", self.beta2)
        _check_fraction("train.ema_decay", self.ema_decay)
        _check_choice("train.amp", self.amp, AMP_MODES)
        _check_choice("train.device", self.device, DEVICES)
        _check_choice("train.targets", self.targets, TARGET_SOURCES)


SAMPLERS = ("ddim", "ddpm")


@dataclass(frozen=True)
class InferConfig:
    """Multi-sample inference and decoding."""

    num_samples: int = 8  # K samples per image, aggregated by averaging predicted coefficients
    num_steps: int = 25  # S sampler steps
    sampler: str = "ddim"
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic)
    guidance: float = 1.0  # classifier-free guidance scale (1 = off)
    rho_km: float = 0.0  # decoder filter radius (SHDD.decode's rho_km); 0 = no filter
    top_k: int = 5  # modes reported per image
    batch_size: int = 256  # images per forward chunk (each chunk runs images × K samples)
    # size of the uniform anchor set the decoder searches (and SHDD-KL draws from); 0 = SHDD's default
    # max(10,000, 4·(L+1)²), spacing ~0.8 of the kernel's half-width
    decoder_anchors: int = 0
    # LocDiff-H (docs/design.md §3; chosen on `val` by benchmarks/method, see docs/results.md): the first
    # `hybrid_modes` of LocDiff's modes propose regions; among the image's `hybrid_candidates` most
    # similar gallery images, those within `hybrid_radius_km` of a mode are candidates; `hybrid_rule`
    # "best" takes the most similar, "vote" the one whose 25 km neighbourhood carries most similarity.
    hybrid_radius_km: float = 200.0
    hybrid_rule: str = "best"
    hybrid_modes: int = 5
    # mode-mass gate in [0, 1): of those modes, the ones after the first whose mass (`modes_mass`, after
    # `mass_calibration`) is below it propose no region; the first always does; 0 = every mode proposes.
    # 0.2 chosen on `val` for R = 200 km (docs/results.md, "Mode-mass gate"; at R = 1000 km 0.1 is best)
    hybrid_min_mass: float = 0.2
    hybrid_candidates: int = 256
    # "similarity": cosine to the run's own training images (the retrieval index); "geoclip": GeoCLIP's
    # pretrained image–location scorer over its 100 K MP16 gallery (CLIP ViT-L/14 features only)
    hybrid_scorer: str = "similarity"
    # credible radii: the 50 % / 90 % quantiles of the K samples' distances to the point estimate, times
    # these calibration factors (fitted on a validation split by the evaluation stage; 1 = raw)
    radius50_scale: float = 1.0
    radius90_scale: float = 1.0
    # mode masses through a monotone map ((mass, hit rate), ...) fitted on val when the run was trained
    # (locdiff_core.metrics.fit_mass_calibration); () = the decoder's masses as they are
    mass_calibration: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        knots = tuple(tuple(float(v) for v in k) for k in self.mass_calibration)
        object.__setattr__(self, "mass_calibration", knots)
        if any(len(k) != 2 or not (0.0 <= k[0] <= 1.0 and 0.0 <= k[1] <= 1.0) for k in knots) or any(
            b[0] < a[0] or b[1] < a[1] for a, b in itertools.pairwise(knots)
        ):
            raise ValueError(
                f"infer.mass_calibration={self.mass_calibration!r} must be (mass, rate) pairs in [0, 1], "
                "non-decreasing in both"
            )
        _check_positive("infer.decoder_anchors", self.decoder_anchors, allow_zero=True)
        for name in (
            "hybrid_radius_km",
            "hybrid_modes",
            "hybrid_candidates",
            "radius50_scale",
            "radius90_scale",
        ):
            _check_positive(f"infer.{name}", getattr(self, name))
        if not 0.0 <= self.hybrid_min_mass < 1.0:
            raise ValueError(f"infer.hybrid_min_mass={self.hybrid_min_mass} must be in [0, 1)")
        _check_choice("infer.hybrid_rule", self.hybrid_rule, ("best", "vote"))
        _check_choice("infer.hybrid_scorer", self.hybrid_scorer, ("similarity", "geoclip"))
        for name in ("num_samples", "num_steps", "top_k", "batch_size"):
            _check_positive(f"infer.{name}", getattr(self, name))
        _check_choice("infer.sampler", self.sampler, SAMPLERS)
        _check_positive("infer.eta", self.eta, allow_zero=True)
        _check_positive("infer.guidance", self.guidance, allow_zero=True)
        _check_positive("infer.rho_km", self.rho_km, allow_zero=True)


_SECTIONS = {
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "infer": InferConfig,
}


@dataclass(frozen=True)
class LocDiffConfig:
    """Everything that defines a LocDiff model and how it is trained and queried."""

    max_degree: int = 32  # L: spherical-harmonic degree; the code has D = (L+1)² coordinates
    embed_dim: int = 768  # width of the image embedding (768 = CLIP ViT-L/14)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def __post_init__(self) -> None:
        if int(self.max_degree) < 1:
            raise ValueError(f"max_degree={self.max_degree} must be >= 1")
        _check_positive("embed_dim", self.embed_dim)
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")

    @property
    def dim(self) -> int:
        """D = (L+1)², the width of the diffusion variable."""
        return (self.max_degree + 1) ** 2

    @property
    def decoder_anchor_count(self) -> int:
        """Anchors of the decoder's uniform set: ``infer.decoder_anchors``, else SHDD's default count,
        max(10,000, 4 D) (``SHDD.default_anchor_count``, written out here so the config imports no math;
        tests/core/test_config.py checks the two agree)."""
        return self.infer.decoder_anchors or max(10_000, 4 * self.dim)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["model"]["widths"] = list(self.model.widths)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LocDiffConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in _SECTIONS:
                kwargs[key] = _section_from_dict(key, value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def replace(self, **overrides: Any) -> LocDiffConfig:
        """A copy with overrides; sub-configs take dicts of field overrides."""
        kwargs: dict[str, Any] = {}
        for key, value in overrides.items():
            if key in _SECTIONS and isinstance(value, dict):
                current = dataclasses.asdict(getattr(self, key))
                _reject_unknown(key, value, current)
                current.update(value)
                kwargs[key] = _section_from_dict(key, current)
            else:
                kwargs[key] = value
        known = {f.name for f in dataclasses.fields(self)}
        _reject_unknown("config", kwargs, known)
        return dataclasses.replace(self, **kwargs)


def _reject_unknown(section: str, given: dict, allowed) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {section} keys {unknown}; allowed: {sorted(allowed)}")


def _section_from_dict(name: str, value: Any):
    cls = _SECTIONS[name]
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict or {cls.__name__}, got {type(value).__name__}")
    _reject_unknown(name, value, {f.name for f in dataclasses.fields(cls)})
    value = dict(value)
    if name == "model" and "widths" in value:
        value["widths"] = tuple(value["widths"])
    return cls(**value)


def config_diff(a: LocDiffConfig, b: LocDiffConfig) -> dict[str, tuple[Any, Any]]:
    """Flattened ``{"section.field": (a_value, b_value)}`` for every field that differs."""
    fa, fb = _flatten(a.to_dict()), _flatten(b.to_dict())
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _presets() -> dict[str, LocDiffConfig]:
    tiny = LocDiffConfig(
        max_degree=8,
        embed_dim=32,
        model=ModelConfig(widths=(128, 64), cond_dim=64, time_embed_dim=32),
        loss=LossConfig(n_uniform_anchors=128, n_data_anchors=64, n_near_anchors=2),
        train=TrainConfig(
            batch_size=64,
            max_steps=200,
            lr=2e-3,
            warmup_steps=20,
            ema_decay=0.99,
            log_every=20,
            eval_every=0,
            eval_size=128,
            eval_samples=4,
            eval_steps=10,
            checkpoint_every=0,
            baseline_steps=50,
        ),
        infer=InferConfig(num_samples=4, num_steps=10, batch_size=128),
    )
    cpu = LocDiffConfig(
        # L=16: L=32 at the same CPU budget was far worse (docs/results.md, ablation A-L32)
        max_degree=16,
        embed_dim=1280,
        model=ModelConfig(widths=(512, 256, 128), cond_dim=256, time_embed_dim=64),
        # loss "mse" (the LossConfig default): MSE+SHDD-KL at tau 0.1/0.3 no better, KL alone worse
        # (docs/results.md, ablations A-msekl, A-tau03, A-kl)
        loss=LossConfig(n_uniform_anchors=256, n_data_anchors=128, n_near_anchors=2),
        train=TrainConfig(
            batch_size=256,
            max_steps=3000,
            lr=1e-3,
            warmup_steps=100,
            ema_decay=0.995,
            log_every=100,
            eval_every=500,
            eval_size=256,
            checkpoint_every=500,
            baseline_steps=200,  # the method benchmark's shared budget (docs/results.md)
        ),
        # S=10 DDIM steps: as accurate as S=25 at 200 and at 3000 training steps, 2.5x less sampling
        # (docs/results.md, ablations A-S10 and B-3000 S=10); K=8: K=1 clearly worse (A-K1);
        # rho_km=0 and guidance 1.0: a 300/1000 km filter and guidance 2.0 changed nothing measurable
        # (A-rho300, A-rho1000, A-G2); EMA weights kept (A-noEMA: no difference at this budget)
        infer=InferConfig(num_samples=8, num_steps=10),
    )
    # MSE + SHDD-KL at L >= 32: at L=32 it doubled plain MSE's accuracy at 200 km on the buffered test
    # (22.7 vs 11.1 %; median 674 +- 223 vs 976 +- 266 km, 2 seeds; docs/results.md, ablations A-L32kl vs
    # A-L32), while at L=16 the two tie (A-msekl)
    default = LocDiffConfig(loss=LossConfig(kind="mse+kl"))
    mp16 = default.replace(max_degree=64, train={"batch_size": 1024, "max_steps": 200_000})
    return {"tiny": tiny, "cpu": cpu, "default": default, "mp16": mp16}


PRESET_NAMES = ("tiny", "cpu", "default", "mp16")


def get_preset(name: str, **overrides: Any) -> LocDiffConfig:
    """A named preset (``tiny``, ``cpu``, ``default``, ``mp16``) with optional overrides."""
    _check_choice("preset", name, PRESET_NAMES)
    cfg = _presets()[name]
    return cfg.replace(**overrides) if overrides else cfg
