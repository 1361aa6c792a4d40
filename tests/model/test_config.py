import json

import pytest

from locdiff_core.config import (
    PRESET_NAMES,
    DiffusionConfig,
    LocDiffConfig,
    ModelConfig,
    config_diff,
    get_preset,
)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_round_trip_through_json(name):
    cfg = get_preset(name)
    again = LocDiffConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert isinstance(again.model.widths, tuple)


def test_preset_sizes_match_their_purpose():
    tiny, cpu, default = get_preset("tiny"), get_preset("cpu"), get_preset("default")
    assert tiny.max_degree < cpu.max_degree < default.max_degree
    assert default.model.widths == (1024, 512, 256) and default.embed_dim == 768
    assert cpu.embed_dim == 1280
    assert default.dim == 33**2


def test_overrides_nested_and_validated():
    cfg = get_preset("tiny", max_degree=5, train={"max_steps": 7}, model={"widths": [16, 8]})
    assert cfg.max_degree == 5 and cfg.train.max_steps == 7 and cfg.model.widths == (16, 8)
    assert cfg.train.batch_size == get_preset("tiny").train.batch_size
    with pytest.raises(ValueError, match="unknown train keys"):
        get_preset("tiny", train={"max_stepz": 3})
    with pytest.raises(ValueError, match="unknown config keys"):
        LocDiffConfig.from_dict({"max_degre": 3})


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: get_preset("nope"), "allowed values: 'tiny'"),
        (lambda: DiffusionConfig(beta_schedule="quadratic"), "allowed values: 'linear', 'cosine'"),
        (lambda: DiffusionConfig(timestep_spacing="odd"), "trailing"),
        (lambda: get_preset("tiny", loss={"kind": "l1"}), "'mse', 'kl', 'mse\\+kl'"),
        (lambda: get_preset("tiny", infer={"sampler": "euler"}), "'ddim', 'ddpm'"),
        (lambda: get_preset("tiny", train={"amp": "fp8"}), "'auto', 'bf16', 'none'"),
        (lambda: ModelConfig(widths=()), "non-empty"),
        (lambda: ModelConfig(p_uncond=1.5), "p_uncond"),
        (lambda: LocDiffConfig(max_degree=0), "max_degree"),
        (lambda: get_preset("tiny", train={"lr": -1.0}), "train.lr"),
    ],
)
def test_invalid_values_name_the_field_and_allowed_values(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_config_diff_names_fields():
    a = get_preset("tiny")
    b = a.replace(max_degree=9, train={"lr": 1e-3})
    diff = config_diff(a, b)
    assert set(diff) == {"max_degree", "train.lr"}
    assert diff["max_degree"] == (8, 9)


@pytest.mark.parametrize("max_degree", [1, 8, 16, 32, 49, 50, 64, 128])
def test_decoder_anchor_count_matches_shdd_without_importing_it(max_degree):
    import subprocess
    import sys

    from locdiff_core.shdd import SHDD

    cfg = get_preset("tiny", max_degree=max_degree)
    assert cfg.decoder_anchor_count == SHDD(max_degree).default_anchor_count()
    set_by_hand = get_preset("tiny", max_degree=max_degree, infer={"decoder_anchors": 123})
    assert set_by_hand.decoder_anchor_count == 123
    if max_degree == 1:  # the config imports no math module
        code = ("import sys, locdiff_core.config; "
                "print(sorted(m for m in sys.modules if m.startswith('locdiff_core.')))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "['locdiff_core.config']"
