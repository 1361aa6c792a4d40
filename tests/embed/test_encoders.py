"""Encoder registry: the offline EfficientNet-Lite0 (real ImageNet weights), open_clip, clear errors."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from locdiff.encoders import (
    ImagePreprocess,
    build_efficientnet_lite0,
    efficientnet_weights_path,
    load_encoder,
)
from locdiff.errors import UserError

MILITARY_UNIFORM = 652  # ImageNet-1k class index


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return load_encoder("efficientnet-lite0")


def test_fast_lite0_equals_timm_tf_reference(lite0):
    sd = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
    ref = build_efficientnet_lite0(sd, fast=False)
    for size in (128, 97):  # even sizes take asymmetric TF padding, odd ones symmetric
        x = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
        with torch.inference_mode():
            want = ref((x.float() / 255 - 0.5) / 0.5)
        got = lite0(x)
        assert got.shape == (3, 1280) and lite0.dim == 1280
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_lite0_weights_are_real_imagenet_weights(lite0):
    """The packaged weights classify a real photo correctly through our preprocess + fused network."""
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(photo) as im:
        x = ImagePreprocess(224)(im)
    feats = lite0(x[None])  # [1, 1280]
    sd = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
    w, b = list(sd.values())[-2:]  # the classifier, stored last
    logits = feats @ w.T + b
    assert int(logits.argmax()) == MILITARY_UNIFORM


def test_preprocess_resizes_shortest_side_and_centre_crops():
    arr = np.zeros((60, 120, 3), dtype=np.uint8)
    arr[:, 50:70] = 255  # a white vertical band in the centre
    out = ImagePreprocess(32, "bilinear")(Image.fromarray(arr))
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert out[:, :, 16].float().mean() > 200 and out[:, :, 0].float().mean() < 30
    gray = ImagePreprocess(16)(Image.fromarray(arr[:, :, 0], mode="L"))
    assert gray.shape == (3, 16, 16)


def test_open_clip_random_weights_without_download():
    with pytest.warns(UserWarning, match="RANDOM"):
        enc = load_encoder("ViT-B-32", pretrained=None)
    assert enc.weights == "random" and enc.image_size == 224
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    y = enc(x)
    assert y.shape == (2, enc.dim) and enc.dim == 512 and torch.isfinite(y).all()


def test_offline_missing_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the local cache") as err:
        load_encoder("ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))
    assert "--checkpoint" in err.value.hint


def test_bad_names_tags_and_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown encoder"):
        load_encoder("no-such-net")
    with pytest.raises(UserError, match="no pretrained weights tagged"):
        load_encoder("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(UserError, match="not found"):
        load_encoder("efficientnet-lite0", checkpoint=str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights"):
        load_encoder("efficientnet-lite0", checkpoint=str(bad))


def test_lite0_from_local_checkpoint_matches_packaged(tmp_path, lite0):
    sd = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
    path = tmp_path / "lite0.pth"
    torch.save({"state_dict": sd}, path)
    enc = load_encoder("efficientnet-lite0", checkpoint=str(path))
    assert enc.weights == "file:lite0.pth"
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(enc(x), lite0(x))


@pytest.mark.parametrize(
    ("name", "dim"),
    [("convnext_tiny", 1024), ("ViT-B-16-SigLIP", 768)],  # a timm ConvNeXt tower; SigLIP = CustomTextCLIP
)
def test_open_clip_image_towers_of_every_model_class_embed(name, dim):
    """Issue 24: "any open_clip model" -- ViT (above), ConvNeXt and SigLIP towers, random weights; the text
    tower is dropped without naming its attribute (CustomTextCLIP has no ``transformer``)."""
    import open_clip

    with pytest.warns(UserWarning, match="RANDOM"):
        enc = load_encoder(name, pretrained=None)
    assert not any(isinstance(m, open_clip.CustomTextCLIP | open_clip.CLIP) for m in enc.model.modules())
    x = torch.randint(0, 256, (1, 3, enc.image_size, enc.image_size), dtype=torch.uint8)
    y = enc(x)
    assert y.shape == (1, enc.dim) and enc.dim == dim and torch.isfinite(y).all()
