"""The noised image of the image-contrast term: which noise each pair's chosen answer is scored on.

The term (`bpo.train.losses.image_contrast_loss`) prefers the chosen answer on the clean image
over the same answer on a noised image. Which noised image:

- a pair made by image weakening (source "weaken") is scored on the very image its negative was
  sampled from: the step, schedule and seed of its meta, eps keyed by its request and sample
  index, as `bpo.bootstrap.weaken.noise_pixels` drew it;
- any other pair (e.g. "inject") on the run's `loss.image_noise_step` and `loss.image_schedule`,
  eps keyed by `stream_seed(run.seed, pair key, 0, "image")`.

Both go through `bpo.models.noise.noise_pixels` on the processor's normalized pixel tensor of the
pair, in its family's layout, before collation (what bootstrapping noised). A pair's `NoiseKey`
also enters its reference-cache hash, so a pair whose noise changes is rescored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor

from bpo.data.records import PreferencePair
from bpo.models.noise import NUM_STEPS, SCHEDULES, noise_pixels
from bpo.train.config import TrainConfig

# The meta keys a weakened pair's noise is read from (`bpo.bootstrap.weaken.answer_meta`).
WEAKEN_META = ("noise_step", "schedule", "seed", "request_index", "sample_index")


class NoiseMetaError(ValueError):
    """A weakened pair whose meta does not say how its image was noised; names the pair."""

    reason = "no_noise_meta"


@dataclass(frozen=True)
class ImageNoise:
    """The run's noise for pairs not made by weakening: step, schedule, and the run's seed."""

    step: int
    schedule: str
    seed: int

    def fingerprint_part(self) -> dict[str, Any]:
        """What the reference cache's fingerprint adds when the term is on."""
        return asdict(self)


@dataclass(frozen=True)
class NoiseKey:
    """One pair's noise: `noise_pixels(pixels, step, schedule, seed, request, sample, stream)`."""

    step: int
    schedule: str
    seed: int
    request: int | str
    sample: int
    stream: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def image_noise(config: TrainConfig) -> ImageNoise | None:
    """The run's noise settings when the image-contrast term is on (loss.image_weight > 0)."""
    loss = config.loss
    if not loss.image_weight > 0:
        return None
    return ImageNoise(loss.image_noise_step, loss.image_schedule, config.seed)


def pair_noise(pair: PreferencePair, noise: ImageNoise) -> NoiseKey:
    """The noise of one pair's image: its own weakening noise, or the run's (module doc).

    A weakened pair whose meta lacks the keys its noise was drawn with, or holds a step or
    schedule the diffusion process does not have, raises NoiseMetaError: scoring it on another
    noised image than its negative's would contrast something else.
    """
    if pair.source != "weaken":
        return NoiseKey(noise.step, noise.schedule, noise.seed, pair.key, 0, "image")
    meta = pair.meta
    missing = [name for name in WEAKEN_META if name not in meta]
    step, schedule = meta.get("noise_step"), meta.get("schedule")
    steps_ok = isinstance(step, int) and not isinstance(step, bool) and 0 <= step < NUM_STEPS
    if missing or not steps_ok or schedule not in SCHEDULES:
        problem = f"lacks {', '.join(missing)}" if missing else f"holds {step!r}, {schedule!r}"
        raise NoiseMetaError(
            f"pair {pair.key}: a weakened pair's meta {problem}, so the noised image its negative "
            "was sampled from is unknown; bootstrap the pairs again, or set loss.image_weight: 0"
        )
    return NoiseKey(
        step, schedule, meta["seed"], meta["request_index"], meta["sample_index"], "noise"
    )


def noised_vision(vision: dict[str, Tensor], key: NoiseKey) -> dict[str, Tensor]:
    """A pair's vision tensors with `pixel_values` noised by `key` (the rest as they are); {}
    for a pair without an image. Only `pixel_values` is noised, as bootstrapping noises it."""
    if "pixel_values" not in vision:
        return {}
    pixels = noise_pixels(
        vision["pixel_values"],
        key.step,
        key.schedule,
        key.seed,
        key.request,
        key.sample,
        key.stream,
    )
    return {**vision, "pixel_values": pixels}
