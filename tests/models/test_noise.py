"""The forward diffusion process: schedules against hand-worked values, noise with the right law."""

from __future__ import annotations

import math

import pytest
import torch

from bpo.models.noise import add_noise, alphas_cumprod, noise_pixels
from bpo.utils.seeds import stream_seed

T = 1000


def abar_by_hand(schedule: str, t: int) -> float:
    """abar_t = prod_{s=0..t} (1 - beta_s), with beta_s written out from the schedule's formula.

    linspace(a, b, T)[s] = a + (b - a) * s / (T - 1); sigmoid(x) = 1 / (1 + exp(-x)).
    """
    abar = 1.0
    for s in range(t + 1):
        if schedule == "linear":
            beta = 1e-4 + (0.02 - 1e-4) * s / (T - 1)
        else:
            x = -6.0 + 12.0 * s / (T - 1)
            beta = 1.0 / (1.0 + math.exp(-x)) * (5e-3 - 1e-5) + 1e-5
        abar *= 1.0 - beta
    return abar


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("linear", {0: 0.9999499987, 499: 0.2803341629, 899: 0.01658933127}),
        ("sigmoid", {0: 0.9999888307, 499: 0.8641033157, 899: 0.3657961235}),
    ],
)
def test_sqrt_alphas_cumprod_match_hand_worked_values(schedule, expected):
    """sqrt(abar_t) at t = 0, 499, 899 (0-based), worked with the loop in `abar_by_hand`.

    linear:  beta_0 = 1e-4, so sqrt(abar_0) = sqrt(0.9999) = 0.9999499987;
             sqrt(abar_499) = 0.2803341629; sqrt(abar_899) = 0.01658933127 (nearly pure noise).
    sigmoid: beta_0 = sigmoid(-6) * 4.99e-3 + 1e-5 = 0.0024726 * 4.99e-3 + 1e-5 = 2.2338e-5, so
             sqrt(abar_0) = sqrt(1 - 2.2338e-5) = 0.9999888307; sqrt(abar_499) = 0.8641033157;
             sqrt(abar_899) = 0.3657961235 (the paper's step: a third of the image is left).
    """
    abar = alphas_cumprod(schedule)
    assert abar.shape == (T,)
    assert abar.dtype == torch.float64
    for t, value in expected.items():
        assert math.sqrt(abar_by_hand(schedule, t)) == pytest.approx(value, abs=1e-10)
        assert math.sqrt(float(abar[t])) == pytest.approx(value, abs=1e-10)


def test_sigmoid_is_the_default_schedule_and_abar_decreases():
    assert torch.equal(alphas_cumprod(), alphas_cumprod("sigmoid", 1000))
    for schedule in ("linear", "sigmoid"):
        assert bool((alphas_cumprod(schedule).diff() < 0).all())


@pytest.mark.parametrize(("schedule", "step"), [("sigmoid", 899), ("linear", 499), ("sigmoid", 0)])
def test_noise_has_mean_zero_and_std_sqrt_one_minus_abar(schedule, step):
    """r = x_t - sqrt(abar_t) x_0 must be sqrt(1 - abar_t) * eps with eps ~ N(0, 1).

    x_0 = 3 + N(0, 1) on n = 4 * 3 * 64 * 64 = 49152 values: a large offset, so a wrong x_0
    coefficient would leave 3 * (error) in the mean of r. With s = sqrt(1 - abar_t), the sample
    mean of r has standard error s / sqrt(n) = s / 221.7, and the sample std has relative standard
    error 1 / sqrt(2n) = 0.0032. Tolerances are 5 standard errors: |mean| < 5 s / 221.7 and
    |std / s - 1| < 0.016. (s = 0.930695007, 0.9599024727, 0.004726350553 for the three cases.)
    The seed is fixed, so the test is deterministic; the tolerances say it is not tuned to it.
    """
    x0 = 3.0 + torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    n = x0.numel()
    abar = abar_by_hand(schedule, step)
    s = math.sqrt(1.0 - abar)
    xt = add_noise(x0, step, schedule, generator=torch.Generator().manual_seed(2))
    r = (xt.double() - math.sqrt(abar) * x0.double()).flatten()
    assert abs(float(r.mean())) < 5 * s / math.sqrt(n)
    assert abs(float(r.std()) / s - 1.0) < 5 / math.sqrt(2 * n)
    # eps is independent of x_0: their correlation is within 5 standard errors (1 / sqrt(n)) of 0.
    corr = torch.corrcoef(torch.stack([r, x0.double().flatten()]))[0, 1]
    assert abs(float(corr)) < 5 / math.sqrt(n)


def test_same_seed_same_noise_other_seed_other_noise():
    x0 = torch.randn(2, 3, 8, 8)
    first = add_noise(x0, 900, generator=torch.Generator().manual_seed(5))
    again = add_noise(x0, 900, generator=torch.Generator().manual_seed(5))
    other = add_noise(x0, 900, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_and_shape_are_kept(dtype):
    """The bf16 output is the fp32 computation rounded to bf16 (eps is drawn in fp32 for both)."""
    x0 = torch.randn(2, 3, 8, 8)
    noisy = add_noise(x0.to(dtype), 900, generator=torch.Generator().manual_seed(0))
    assert noisy.dtype == dtype
    assert noisy.shape == x0.shape
    full = add_noise(x0.to(dtype).float(), 900, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy, full.to(dtype))


@pytest.mark.parametrize("step", [-1, 1000, 900.0, True])
def test_step_outside_the_schedule_is_refused(step):
    with pytest.raises(ValueError, match=r"noise step must be an integer in \[0, 999\]"):
        add_noise(torch.zeros(1, 3, 4, 4), step)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="unknown noise schedule 'cosine'; use one of linear"):
        alphas_cumprod("cosine")


def test_noise_pixels_draws_eps_from_its_keyed_stream():
    """noise_pixels = add_noise with a CPU generator seeded by stream_seed(seed, request, sample,
    stream): the same key gives the same tensor; another stream name (training's "image" beside
    bootstrapping's "noise") or another request key gives another."""
    x0 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(stream_seed(4, "p:inject:0", 0, "image"))
    expected = add_noise(x0, 600, "linear", generator=generator)
    assert torch.equal(noise_pixels(x0, 600, "linear", 4, "p:inject:0", 0, "image"), expected)
    assert not torch.allclose(noise_pixels(x0, 600, "linear", 4, "p:inject:0", 0), expected)
    assert not torch.allclose(
        noise_pixels(x0, 600, "linear", 4, "q:inject:0", 0, "image"), expected
    )


def test_noise_pixels_keeps_padding_crops_zero():
    """A (1, crops, C, H, W) tensor whose third crop is all-zero padding: that crop stays zero, and
    the two real crops are noised as add_noise noises them alone, with the same keyed generator."""
    crops = torch.randn(1, 3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    crops[0, 2] = 0.0
    noised = noise_pixels(crops, 900, "sigmoid", 0, 5, 1)
    assert torch.equal(noised[0, 2], torch.zeros(3, 4, 4))
    generator = torch.Generator().manual_seed(stream_seed(0, 5, 1, "noise"))
    assert torch.equal(noised[0, :2], add_noise(crops[0, :2], 900, "sigmoid", generator=generator))
