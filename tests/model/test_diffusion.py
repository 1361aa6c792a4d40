"""Golden values: expected numbers are written out by hand from the DDPM/DDIM formulas."""

import math

import pytest
import torch

from locdiff_core.config import DiffusionConfig
from locdiff_core.diffusion import NoiseSchedule

# T = 4, linear β = 0.1, 0.2, 0.3, 0.4  ->  ᾱ = 0.9, 0.72, 0.504, 0.3024
ABAR = [0.9, 0.72, 0.504, 0.3024]


def small(spacing="trailing"):
    return NoiseSchedule(
        DiffusionConfig(
            num_train_timesteps=4,
            beta_schedule="linear",
            beta_start=0.1,
            beta_end=0.4,
            timestep_spacing=spacing,
        )
    )


def test_linear_schedule_golden():
    s = small()
    assert torch.allclose(s.betas, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    assert torch.allclose(s.alphas_cumprod, torch.tensor(ABAR, dtype=torch.float64))


def test_cosine_schedule_golden():
    s = NoiseSchedule(DiffusionConfig(beta_schedule="cosine"))
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert s.betas[0].item() == pytest.approx(1 - f(1) / f(0), rel=1e-12)
    assert s.alphas_cumprod[499].item() == pytest.approx(f(500) / f(0), rel=1e-9)
    assert s.betas[-1].item() == pytest.approx(0.999)  # clipped
    assert torch.all(s.alphas_cumprod[1:] < s.alphas_cumprod[:-1])


def test_add_noise_golden():
    s = small()
    x0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    noise = torch.tensor([[2.0, 0.5]], dtype=torch.float64)
    out = s.add_noise(x0, noise, torch.tensor([2]))
    expected = [math.sqrt(0.504) * 1 + math.sqrt(0.496) * 2, math.sqrt(0.504) * -2 + math.sqrt(0.496) * 0.5]
    assert out[0].tolist() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        s.add_noise(x0, noise, torch.tensor([4]))


@pytest.mark.parametrize(
    "spacing, steps, expected",
    [("trailing", 2, [3, 1]), ("leading", 2, [2, 0]), ("linspace", 2, [3, 0]), ("trailing", 4, [3, 2, 1, 0])],
)
def test_set_timesteps(spacing, steps, expected):
    assert small(spacing).set_timesteps(steps).tolist() == expected


def test_ddim_step_golden_and_final_step_returns_x0():
    s = small()
    s.set_timesteps(2)  # [3, 1]
    x_t = torch.tensor([1.0], dtype=torch.float64)
    x0 = torch.tensor([0.5], dtype=torch.float64)
    out = s.step(x0, 3, x_t, sampler="ddim").prev_sample
    eps = (1.0 - math.sqrt(0.3024) * 0.5) / math.sqrt(1 - 0.3024)
    assert out.item() == pytest.approx(math.sqrt(0.72) * 0.5 + math.sqrt(0.28) * eps, rel=1e-12)
    last = s.step(x0, 1, out, sampler="ddim").prev_sample
    assert last.item() == pytest.approx(0.5, rel=1e-12)


def test_ddpm_step_golden_mean_and_variance():
    s = small()
    s.set_timesteps(2)
    x_t = torch.tensor([1.0, 1.0], dtype=torch.float64)
    x0 = torch.tensor([0.5, 0.5], dtype=torch.float64)
    out = s.step(x0, 3, x_t, sampler="ddpm", generator=torch.Generator().manual_seed(7)).prev_sample
    z = torch.randn(2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    alpha, beta = 0.3024 / 0.72, 1 - 0.3024 / 0.72
    mean = math.sqrt(0.72) * beta / 0.6976 * 0.5 + math.sqrt(alpha) * 0.28 / 0.6976 * 1.0
    std = math.sqrt(beta * 0.28 / 0.6976)
    assert out.tolist() == pytest.approx((mean + std * z).tolist(), rel=1e-12)
    # last step: no noise, returns x0
    assert s.step(x0, 1, out, sampler="ddpm").prev_sample.tolist() == pytest.approx([0.5, 0.5])


def test_ddim_eta_one_has_ddpm_variance():
    s = small()
    s.set_timesteps(2)
    x_t, x0 = torch.ones(20000, dtype=torch.float64), torch.full((20000,), 0.5, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    a = s.step(x0, 3, x_t, sampler="ddim", eta=1.0, generator=g).prev_sample
    b = s.step(x0, 3, x_t, sampler="ddpm", generator=g).prev_sample
    assert a.std().item() == pytest.approx(b.std().item(), rel=0.03)
    assert a.mean().item() == pytest.approx(b.mean().item(), abs=0.02)


def test_sampling_loop_with_linear_dummy_denoiser_golden():
    """Denoiser x̂₀ = 0.5·x_t over the 2-step trailing grid, unrolled by hand."""
    s = small()
    ts = s.set_timesteps(2)
    x = torch.tensor([2.0], dtype=torch.float64)
    for t in ts.tolist():
        x = s.step(0.5 * x, t, x).prev_sample
    # step 1 (t=3 -> 1): x0 = 1, eps = (2 - √.3024)/√.6976, x = √.72·1 + √.28·eps ; step 2 returns 0.5·x
    eps = (2 - math.sqrt(0.3024)) / math.sqrt(0.6976)
    x1 = math.sqrt(0.72) + math.sqrt(0.28) * eps
    assert x.item() == pytest.approx(0.5 * x1, rel=1e-12)


def test_step_errors():
    s = small()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.zeros(1), 3, torch.zeros(1))
    s.set_timesteps(2)
    with pytest.raises(ValueError, match="'ddim', 'ddpm'"):
        s.step(torch.zeros(1), 3, torch.zeros(1), sampler="euler")
    with pytest.raises(ValueError, match="not on the current grid"):
        s.step(torch.zeros(1), 2, torch.zeros(1))
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        s.set_timesteps(5)


def test_schedule_config_round_trip():
    s = small("leading")
    again = NoiseSchedule.from_dict(s.to_dict())
    assert again.config == s.config and torch.equal(again.alphas_cumprod, s.alphas_cumprod)
