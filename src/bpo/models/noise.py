"""The diffusion forward process that weakens an image: `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`.

Bootstrapping noises an image to sample a weakened negative from it (`bpo.bootstrap.weaken`);
training's image-contrast term scores the chosen answer on that same noised image
(`bpo.train.image_noise`). Both call `noise_pixels`, so one key gives one noised image.

It acts on the processor's *normalized* pixel tensor (what the vision tower sees), as the BPO
paper does, with `T = 1000` steps and a named beta schedule:

- `"linear"`: betas = linspace(1e-4, 0.02, T), as in DDPM;
- `"sigmoid"`: betas = sigmoid(linspace(-6, 6, T)) * (5e-3 - 1e-5) + 1e-5, the official code's.

`abar_t = prod_{s <= t} (1 - beta_s)`, with `t` a 0-based index into the schedule. The schedule is
computed in float64 (the official code used float32; the two differ by ~1e-7 in `abar`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bpo.utils.seeds import stream_seed

SCHEDULES = ("linear", "sigmoid")
NUM_STEPS = 1000


def betas(schedule: str = "sigmoid", num_steps: int = NUM_STEPS) -> Tensor:
    """The named schedule's betas, float64, shape (num_steps,)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if schedule == "linear":
        return torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64)
    if schedule == "sigmoid":
        ramp = torch.linspace(-6.0, 6.0, num_steps, dtype=torch.float64)
        return torch.sigmoid(ramp) * (5e-3 - 1e-5) + 1e-5
    raise ValueError(f"unknown noise schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def alphas_cumprod(schedule: str = "sigmoid", num_steps: int = NUM_STEPS) -> Tensor:
    """`abar_t = prod_{s <= t} (1 - beta_s)` for t = 0 .. num_steps - 1, float64, (num_steps,)."""
    return torch.cumprod(1.0 - betas(schedule, num_steps), dim=0)


def add_noise(
    pixel_values: Tensor,
    step: int,
    schedule: str = "sigmoid",
    generator: torch.Generator | None = None,
    num_steps: int = NUM_STEPS,
) -> Tensor:
    """`x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`, eps ~ N(0, I), on normalized pixels.

    pixel_values: x_0, the processor's normalized tensor, any shape; dtype and device are kept.
    step: t, a 0-based index into the schedule, in [0, num_steps - 1] (999 is the noisiest).
    generator: draws eps (on the generator's device, then moved), so a seeded generator gives the
        same noise whatever the device of `pixel_values`; None uses torch's global generator.
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < num_steps:
        raise ValueError(
            f"noise step must be an integer in [0, {num_steps - 1}] (a 0-based index into the "
            f"{num_steps}-step schedule), got {step!r}"
        )
    abar = float(alphas_cumprod(schedule, num_steps)[step])
    device = generator.device if generator is not None else pixel_values.device
    # eps in float32 whatever the input dtype, so bf16 and fp32 callers see the same noise.
    eps = torch.randn(pixel_values.shape, generator=generator, dtype=torch.float32, device=device)
    x0 = pixel_values.to(torch.float32)
    xt = abar**0.5 * x0 + (1.0 - abar) ** 0.5 * eps.to(pixel_values.device)
    return xt.to(pixel_values.dtype)


def noise_pixels(
    pixel_values: Tensor,
    step: int,
    schedule: str,
    seed: int,
    request_index: int | str,
    sample_index: int,
    stream: str = "noise",
) -> Tensor:
    """One image's normalized pixels noised at `step`, eps keyed by (seed, request, sample, stream).

    pixel_values: one image's pixels in its family's layout (`bpo.models.family`): (1, C, H, W)
        for LLaVA; (tiles, C, H, W) for InternVL; (patches, C*T*P*P) for Qwen-VL; or
        (1, crops, C, H, W) for processors that split an image into crops (Idefics3/SmolVLM,
        LLaVA-NeXT), where all-zero padding crops, which the model drops, stay zero and the
        noise is drawn for the real ones only. The noise is elementwise, so any layout of the
        normalized pixels is noised as the image itself would be.
    request_index, sample_index, stream: the key of eps, `stream_seed(seed, request_index,
        sample_index, stream)`; a weakened negative's is (its request's global index, its sample
        index, "noise").
    The noise is drawn on the CPU from the keyed generator, so it is the same on every device.
    """
    generator = torch.Generator().manual_seed(
        stream_seed(seed, request_index, sample_index, stream)
    )
    if pixel_values.dim() == 5:
        real = pixel_values.flatten(2).ne(0).any(-1)  # (1, images)
        noised = pixel_values.clone()
        noised[real] = add_noise(pixel_values[real], step, schedule, generator=generator)
        return noised
    return add_noise(pixel_values, step, schedule, generator=generator)
