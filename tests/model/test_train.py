import math

import pytest
import torch

from locdiff_core.checkpoint import check_compatible, from_bytes, to_bytes
from locdiff_core.config import get_preset
from locdiff_core.data import GeoEmbeddings
from locdiff_core.sampling import Predictor
from locdiff_core.sphere import haversine_km
from locdiff_core.train import ema_decay_at, lr_at, train

from ._data import location_embeddings


def tiny(**train_overrides):
    return get_preset("tiny", train={"max_steps": 12, "warmup_steps": 3, **train_overrides})


def test_lr_schedule_is_warmup_then_cosine():
    kw = dict(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos = 0
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(10**6, 0.999) == 0.999


@pytest.mark.parametrize("loss", ["mse", "mse+kl"])
def test_resume_continues_exactly(loss):
    data = location_embeddings(500, seed=4)
    cfg = tiny().replace(loss={"kind": loss}, model={"dropout": 0.1})
    straight = train(cfg, data)
    saved = []
    first = train(cfg, data, max_steps=5, checkpoint_callback=saved.append)
    assert first.step == 5 and saved[-1]["step"] == 5
    ckpt = from_bytes(to_bytes(saved[-1]))  # through the safe (weights_only) format, like the stage layer
    resumed = train(cfg, data, resume_from=ckpt)
    assert resumed.step == straight.step == 12
    for part in ("model", "ema"):
        a, b = straight.checkpoint[part], resumed.checkpoint[part]
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert straight.checkpoint["rng"]["loop"].equal(resumed.checkpoint["rng"]["loop"])
    # and a different seed really gives different weights (the comparison can fail)
    other = train(tiny(seed=1).replace(loss={"kind": loss}, model={"dropout": 0.1}), data)
    assert not torch.equal(
        other.checkpoint["model"]["head.weight"], straight.checkpoint["model"]["head.weight"]
    )


def test_checkpoint_from_other_config_is_refused_naming_fields():
    data = location_embeddings(200)
    ckpt = train(tiny(max_steps=2), data).checkpoint
    with pytest.raises(ValueError, match=r"train\.lr: checkpoint=0\.002, requested=0\.001"):
        train(tiny(max_steps=4, lr=1e-3), data, resume_from=ckpt)
    with pytest.raises(ValueError, match="max_degree"):
        check_compatible(tiny(max_steps=2).replace(max_degree=6), ckpt)
    # cadence fields may change
    check_compatible(tiny(max_steps=2, log_every=1, eval_every=7), ckpt)
    with pytest.raises(ValueError, match="not a LocDiff checkpoint"):
        train(tiny(), data, resume_from={"model": {}})


def test_bad_training_data():
    with pytest.raises(ValueError, match="row 1"):
        GeoEmbeddings(torch.tensor([[0.0], [math.nan]]), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"row 0: lat=95"):
        GeoEmbeddings(torch.zeros(1, 2), torch.tensor([95.0]), torch.zeros(1))
    with pytest.raises(ValueError, match="empty"):
        GeoEmbeddings(torch.zeros(0, 2), torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="config.embed_dim=32"):
        train(tiny(), GeoEmbeddings(torch.zeros(4, 5), torch.zeros(4), torch.zeros(4)))


@pytest.fixture(scope="module")
def trained():
    """A tiny LocDiff trained on embeddings that are a noisy function of location."""
    train_set = location_embeddings(4000, seed=5)
    val = location_embeddings(200, seed=6)
    cfg = get_preset(
        "tiny",
        train={"max_steps": 240, "eval_every": 120, "eval_size": 64, "log_every": 60},
    )
    events = []
    res = train(cfg, train_set, val, progress=events.append)
    return cfg, res, val, events


@pytest.mark.slow  # shares a ~5 s (unloaded 2-core) training fixture
def test_tiny_preset_learns_a_conditional_distribution(trained):
    cfg, res, val, events = trained
    pred = Predictor.from_checkpoint(res.checkpoint)
    g = torch.Generator().manual_seed(0)
    cond = pred.predict(val.emb, generator=g)
    uncond = pred.predict(val.emb, guidance=0.0, generator=torch.Generator().manual_seed(0))  # null condition
    err = haversine_km(val.lat_deg, val.lon_deg, cond.lat_deg, cond.lon_deg).median()
    err0 = haversine_km(val.lat_deg, val.lon_deg, uncond.lat_deg, uncond.lon_deg).median()
    assert err < 0.3 * err0, (float(err), float(err0))
    assert err < 2500
    # training curves and periodic validation were recorded and reported
    assert [r["step"] for r in res.curves["train"]] == [60, 120, 180, 240]
    assert res.curves["train"][-1]["loss"] < res.curves["train"][0]["loss"]
    assert [r["step"] for r in res.curves["val"]] == [120, 240]
    assert res.val_metrics["median_km"] > 0
    assert {e["event"] for e in events} == {"train", "val"}


@pytest.mark.slow  # shares a ~5 s (unloaded 2-core) training fixture
def test_predictor_outputs_and_determinism(trained):
    cfg, res, val, _ = trained
    pred = Predictor.from_checkpoint(res.checkpoint)
    emb = val.emb[:5]
    a = pred.predict(emb, K=3, steps=4, generator=torch.Generator().manual_seed(1))
    b = pred.predict(emb, K=3, steps=4, generator=torch.Generator().manual_seed(1))
    assert a.lat_deg.shape == (5,) and a.modes_lat_deg.shape == (5, cfg.infer.top_k)
    assert torch.equal(a.lat_deg, b.lat_deg)
    assert (a.modes_mass >= 0).all() and (a.modes_mass.sum(1) <= 1 + 1e-6).all()
    c = pred.predict(emb, K=3, steps=4, sampler="ddpm", generator=torch.Generator().manual_seed(1))
    assert c.lat_deg.shape == (5,)
    # guidance > 1 runs and is a different prediction
    d = pred.predict(emb, K=3, steps=4, guidance=3.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(d.score, a.score)


@pytest.mark.slow  # shares a ~5 s (unloaded 2-core) training fixture
def test_predictor_rejects_bad_inputs(trained):
    _, res, _, _ = trained
    pred = Predictor.from_checkpoint(res.checkpoint)
    with pytest.raises(ValueError, match=r"\[B, 32\]"):
        pred.predict(torch.zeros(2, 31))
    with pytest.raises(ValueError, match="NaN"):
        pred.predict(torch.full((2, 32), math.nan))
    with pytest.raises(ValueError, match="empty batch"):
        pred.predict(torch.zeros(0, 32))
    with pytest.raises(ValueError, match="'ddim', 'ddpm'"):
        pred.predict(torch.zeros(1, 32), sampler="euler")
    with pytest.raises(ValueError, match="not a LocDiff checkpoint"):
        Predictor.from_checkpoint({"format": "x"})
