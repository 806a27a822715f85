"""Image-weakened negatives: the model's own answer, sampled from the noised image alone.

For each request the processor turns the clean image into its normalized pixel tensor, the
diffusion forward process (`bpo.models.noise`) noises that tensor, and the model generates from
the noised pixels only: no clean-image forward pass, no mixing of clean and noisy logits (the
official code's VCD-style contrast), and the noised image sits in the prompt's KV cache for every
generated token (the official code's cache bug let the noise act on the first token only).

Each request makes `samples_per_prompt` samples at each of `noise_steps`; sample `k` of request
`i` draws its noise and its tokens from their own generators, seeded by
`stream_seed(seed, i, k, "noise" | "sample")`, so an answer does not depend on the batch size,
the batch it lands in, or which other requests run (what a resumed or sharded run needs). Pass
the requests' global indices as `indices` when a run is split.

Two routes to the same generation layer (`bpo.generate`):
- transformers: each request carries a `pixels` transform that noises its own processed pixels
  (the generator encodes every request alone, in any family's pixel layout);
- vLLM: the noised pixels go through the model's own vision tower and projector here
  (`bpo.models.vision`, the call the model's forward makes), and the engine gets the features as
  image embeddings. Pixels, noise and keys are those of the transformers route, so the engine's
  language model sees the image features the transformers model would; its sampler draws the
  same distribution, not the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch import Tensor

from bpo.bootstrap.config import WeakenConfig, check_weaken, weaken_steps
from bpo.generate import Decoding, GenerationRequest, Generator, stream_seed
from bpo.generate.requests import as_request
from bpo.models.family import encode_sample, join_vision, vision_keys
from bpo.models.noise import noise_pixels as models_noise_pixels
from bpo.models.prompts import build_prompt
from bpo.models.vision import image_features


@dataclass
class WeakenedAnswer:
    """One weakened sample: its text, its generated token ids, and what made it."""

    text: str
    token_ids: list[int]  # generated tokens, up to and including the end-of-sequence token
    meta: dict[str, Any]  # noise_step, schedule, temperature, top_p, seed, request/sample index
    logits: Tensor | None = field(default=None, repr=False)  # (steps, vocab), if asked for


def noise_pixels(
    pixel_values: Tensor,
    step: int,
    config: WeakenConfig,
    request_index: int,
    sample_index: int,
) -> Tensor:
    """One request's normalized pixels noised at `step` as sample `sample_index` of the request.

    `bpo.models.noise.noise_pixels` keyed by (config.seed, request_index, sample_index, "noise"):
    any family's pixel layout, the noise drawn on the CPU. Training's image-contrast term noises a
    weakened pair's image with the same key, read from the pair's meta.
    """
    return models_noise_pixels(
        pixel_values, step, config.schedule, config.seed, request_index, sample_index
    )


def image_requests(
    requests: Sequence[GenerationRequest | dict[str, Any]], indices: Sequence[int] | None
) -> tuple[list[GenerationRequest], list[int]]:
    """(requests, their global indices), each checked to have an image."""
    items = [as_request(r) for r in requests]
    keys = list(range(len(items))) if indices is None else list(indices)
    if len(keys) != len(items):
        raise ValueError(f"{len(keys)} indices for {len(items)} requests")
    for position, item in enumerate(items):
        if item.image is None:
            raise ValueError(
                f"request {keys[position]} has no image; an image-weakened negative needs one"
            )
    return items, keys


def _rows(items: list[GenerationRequest], config: WeakenConfig) -> list[tuple[int, int, int]]:
    """(request position, sample index, noise step) of every sample, request by request."""
    steps = weaken_steps(config)
    return [(p, k, step) for p in range(len(items)) for k, step in enumerate(steps)]


def _pixel_requests(items, keys, config: WeakenConfig) -> list[GenerationRequest]:
    """The transformers route: each sample noises its own pixels inside the batch."""
    return [
        GenerationRequest(
            messages=items[p].messages,
            image=items[p].image,
            seed=stream_seed(config.seed, keys[p], k, "sample"),
            pixels=partial(
                noise_pixels, step=step, config=config, request_index=keys[p], sample_index=k
            ),
        )
        for p, k, step in _rows(items, config)
    ]


def _embedding_requests(
    items, keys, config: WeakenConfig, encoder: Any, processor: Any, batch_size: int
) -> list[GenerationRequest]:
    """The vLLM route: each sample's noised pixels encoded to image features, batch by batch.

    The pixels come from the per-sample processor call the transformers route makes
    (`bpo.models.family.encode_sample`), noised by the same `noise_pixels` with the same keys,
    then joined (`join_vision`) and encoded `batch_size` at a time. The route serves families
    with one image per row (`Family.image_embeds`), so row b of the features is sample b's.
    """
    rows = _rows(items, config)
    prompts = [build_prompt(processor, item.messages, has_image=True) for item in items]
    requests = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        samples = [encode_sample(processor, prompts[p], items[p].image) for p, _, _ in batch]
        for sample, (p, k, step) in zip(samples, batch, strict=True):
            sample["pixel_values"] = noise_pixels(sample["pixel_values"], step, config, keys[p], k)
        vision = {
            name: join_vision([sample[name] for sample in samples])
            for name in vision_keys(samples[0])
        }
        features = image_features(encoder, vision)  # (B, tokens, hidden)
        for (p, k, _), row in zip(batch, features, strict=True):
            requests.append(
                GenerationRequest(
                    messages=items[p].messages,
                    seed=stream_seed(config.seed, keys[p], k, "sample"),
                    image_embeds=row[None].cpu(),
                )
            )
    return requests


def answer_meta(config: WeakenConfig, step: int) -> dict[str, Any]:
    """What made a weakened sample (less its request and sample index): its answer's `meta`."""
    return {
        "noise_step": step,
        "schedule": config.schedule,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
    }


def weakened_answers(
    generator: Generator,
    requests: Sequence[GenerationRequest | dict[str, Any]],
    config: WeakenConfig | None = None,
    indices: Sequence[int] | None = None,
    encoder: Any = None,
    batch_size: int = 8,
    return_logits: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[list[WeakenedAnswer]]:
    """Per request, its samples at every noise step, each generated from its noised image alone.

    requests: GenerationRequests (or dicts with "messages" and "image"); every one needs an image.
    indices: the requests' global indices (default 0, 1, ...), which key their noise and sampling.
    encoder: the vLLM route's encoder of noised pixels (`bpo.models.vision.load_image_encoder`);
        None for the transformers route.
    batch_size: noised images the encoder encodes at once (the vLLM route).
    return_logits: keep each sample's raw per-step logits (transformers; tests).
    progress: called with the number of samples each finished batch added.
    """
    config = config or WeakenConfig()
    check_weaken(config)
    items, keys = image_requests(requests, indices)
    if encoder is None:
        flat = _pixel_requests(items, keys, config)
    else:
        flat = _embedding_requests(items, keys, config, encoder, generator.processor, batch_size)
    decoding = Decoding(config.max_new_tokens, config.temperature, config.top_p)
    generations = generator.generate(flat, decoding, progress=progress, return_logits=return_logits)
    answers: list[list[WeakenedAnswer]] = [[] for _ in items]
    for (p, k, step), generation in zip(_rows(items, config), generations, strict=True):
        meta = {**answer_meta(config, step), "request_index": keys[p], "sample_index": k}
        answers[p].append(
            WeakenedAnswer(generation.text, generation.token_ids, meta, generation.logits)
        )
    return answers
