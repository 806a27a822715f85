"""Image-weakened negatives: the model's own answer, sampled from the noised image alone.

For each request the processor turns the clean image into its normalized pixel tensor, the
diffusion forward process (`bpo.bootstrap.noise`) noises that tensor, and the model generates from
the noised pixels only: no clean-image forward pass, no mixing of clean and noisy logits (the
official code's VCD-style contrast), and the noised image sits in the prompt's KV cache for every
generated token (the official code's cache bug let the noise act on the first token only).

Randomness is keyed, not sequential: the noise and the token sampling of sample `j` of request `i`
each draw from their own generator seeded from `(seed, i, j)`, so an answer does not depend on the
batch size, the batch it lands in, or which other requests run (what a resumed or sharded run
needs). Pass the requests' global indices as `indices` when a run is split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import LogitsProcessorList

from bpo.bootstrap.generate import GenerationRequest, _as_request
from bpo.bootstrap.noise import add_noise
from bpo.models.prompts import build_prompt


@dataclass
class WeakenConfig:
    """How image-weakened negatives are made: the `weaken:` section of the bootstrap config."""

    noise_step: int = 900  # 0-based index into the T = 1000 schedule (the paper's 900)
    schedule: str = "sigmoid"  # "sigmoid" (the official code's) or "linear" (DDPM)
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus sampling; 1.0 keeps the whole distribution
    max_new_tokens: int = 512
    samples_per_prompt: int = 1
    seed: int = 0  # with the request and sample index, fixes the noise and the sampled tokens


@dataclass
class WeakenedAnswer:
    """One weakened sample: its text, its generated token ids, and what made it."""

    text: str
    token_ids: list[int]  # generated tokens, up to and including the end-of-sequence token
    meta: dict[str, Any]  # noise_step, schedule, temperature, top_p, seed, request/sample index
    logits: Tensor | None = field(default=None, repr=False)  # (steps, vocab), if asked for


def stream_seed(seed: int, request_index: int, sample_index: int, stream: str) -> int:
    """A 63-bit seed for one random stream ("noise" or "sample") of one sample of one request."""
    key = f"{seed}:{request_index}:{sample_index}:{stream}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def noise_pixels(
    pixel_values: Tensor, config: WeakenConfig, request_index: int, sample_index: int
) -> Tensor:
    """One request's normalized pixels noised as sample `sample_index` of the request.

    pixel_values: (1, C, H, W), or (1, images, C, H, W) for processors that split an image into
        crops (Idefics3/SmolVLM); there a row with fewer crops is padded with all-zero images,
        which the model drops, so they stay zero and the noise is drawn for the real ones only.
    The noise is drawn on the CPU from the keyed generator, so it is the same on every device.
    """
    generator = torch.Generator().manual_seed(
        stream_seed(config.seed, request_index, sample_index, "noise")
    )
    if pixel_values.dim() == 5:
        real = pixel_values.flatten(2).ne(0).any(-1)  # (1, images)
        noised = pixel_values.clone()
        noised[real] = add_noise(
            pixel_values[real], config.noise_step, config.schedule, generator=generator
        )
        return noised
    return add_noise(pixel_values, config.noise_step, config.schedule, generator=generator)


def nucleus(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """Logits (B, V) scaled by 1 / temperature with tokens outside the top-p nucleus at -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (as in
    transformers' TopPLogitsWarper); the most likely token is always kept.
    """
    scaled = logits / temperature
    if top_p >= 1.0:
        return scaled
    ascending, order = torch.sort(scaled, dim=-1)  # (B, V)
    mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)  # (B, V): mass of tokens up to each
    drop = mass_below <= 1.0 - top_p
    drop[:, -1] = False
    return scaled.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


class KeyedSampler:
    """A logits processor that samples each row from its own generator and forces that token.

    The one keyed sampling loop of the package: weakened negatives and the LM rewriters
    (`bpo.bootstrap.inject.LocalRewriter`) both decode through it.

    `model.generate` then decodes greedily: the forced token is the only one with finite score.
    Sampling this way, rather than with generate's `do_sample` (one global generator for the whole
    batch), makes a row's tokens independent of the other rows in its batch.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.seeds = seeds
        self.temperature = temperature
        self.top_p = top_p
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.temperature == 0:
            chosen = scores.argmax(dim=-1)  # (B,)
        else:
            if self.generators is None:
                self.generators = [
                    torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds
                ]
            probs = nucleus(scores.float(), self.temperature, self.top_p).softmax(dim=-1)  # (B, V)
            chosen = torch.cat(
                [
                    torch.multinomial(row, 1, generator=g)
                    for row, g in zip(probs, self.generators, strict=True)
                ]
            )  # (B,)
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(-1, chosen[:, None], 0.0)


def image_requests(
    requests: Sequence[GenerationRequest | dict[str, Any]], indices: Sequence[int] | None
) -> tuple[list[GenerationRequest], list[int]]:
    """(requests, their global indices), each checked to have an image."""
    items = [_as_request(r) for r in requests]
    keys = list(range(len(items))) if indices is None else list(indices)
    if len(keys) != len(items):
        raise ValueError(f"{len(keys)} indices for {len(items)} requests")
    for position, item in enumerate(items):
        if item.image is None:
            raise ValueError(
                f"request {keys[position]} has no image; an image-weakened negative needs one"
            )
    return items, keys


def check_config(config: WeakenConfig) -> None:
    if config.temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {config.temperature}")
    if not 0 < config.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {config.top_p}")
    if config.samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be at least 1, got {config.samples_per_prompt}")
    if config.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {config.max_new_tokens}")
    # Fails early, before any model work, on a bad step or schedule.
    add_noise(torch.zeros(1), config.noise_step, config.schedule)


@torch.inference_mode()
def weakened_answers(
    model: Any,
    processor: Any,
    requests: Sequence[GenerationRequest | dict[str, Any]],
    config: WeakenConfig | None = None,
    batch_size: int = 8,
    indices: Sequence[int] | None = None,
    return_logits: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[list[WeakenedAnswer]]:
    """`config.samples_per_prompt` answers per request, each generated from its noised image alone.

    requests: GenerationRequests (or dicts with "messages" and "image"); every one needs an image.
    batch_size: samples per `model.generate` call; it changes speed, never the answers.
    indices: the requests' global indices (default 0, 1, ...), which key their noise and sampling.
    return_logits: keep each sample's raw per-step logits (tests; memory grows with the vocab).
    progress: called with the number of samples each finished batch added.
    """
    config = config or WeakenConfig()
    check_config(config)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    items, keys = image_requests(requests, indices)
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.padding_side != "left":
        raise ValueError(
            "the tokenizer pads on the right, so batched answers would follow pad tokens; load it "
            "with bpo.models.load_processor (which sets padding_side='left') or set it yourself"
        )
    prompts = [build_prompt(processor, item.messages, has_image=True) for item in items]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    # One row per (request, sample), in prompt-length order so that a batch pads little.
    rows = [(p, j) for p in range(len(items)) for j in range(config.samples_per_prompt)]
    rows.sort(key=lambda row: (lengths[row[0]], row))
    eos = eos_ids(model, tokenizer)
    answers: list[list[WeakenedAnswer | None]] = [[None] * config.samples_per_prompt for _ in items]
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        inputs = processor(
            text=[prompts[p] for p, _ in batch],
            images=[items[p].image for p, _ in batch],
            padding=True,
            return_tensors="pt",
        )
        clean = inputs["pixel_values"]  # (B, C, H, W): one image per row
        inputs["pixel_values"] = torch.cat(
            [noise_pixels(clean[b : b + 1], config, keys[p], j) for b, (p, j) in enumerate(batch)]
        )  # (B, C, H, W)
        inputs = inputs.to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        sampler = KeyedSampler(
            [stream_seed(config.seed, keys[p], j, "sample") for p, j in batch],
            config.temperature,
            config.top_p,
        )
        output = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=config.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            logits_processor=LogitsProcessorList([sampler]),
            return_dict_in_generate=True,
            output_logits=return_logits,
        )
        new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]  # (B, new)
        for b, (p, j) in enumerate(batch):
            ids = until_eos(new_tokens[b].tolist(), eos)
            logits = None
            if return_logits:
                logits = torch.stack([step[b] for step in output.logits[: len(ids)]]).cpu()
            answers[p][j] = WeakenedAnswer(
                text=tokenizer.decode(ids, skip_special_tokens=True).strip(),
                token_ids=ids,
                meta={
                    **answer_meta(config),
                    "request_index": keys[p],
                    "sample_index": j,
                },
                logits=logits,
            )
        if progress is not None:
            progress(len(batch))
    return answers  # type: ignore[return-value]


def answer_meta(config: WeakenConfig) -> dict[str, Any]:
    """What made a weakened sample (less the request and sample index): its answers' `meta`."""
    meta = asdict(config)
    del meta["samples_per_prompt"]
    return meta


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end an answer: the model's generation config's, else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


def until_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    """Generated ids up to and including the first end-of-sequence id (later ones are padding)."""
    for k, token in enumerate(ids):
        if token in eos_ids:
            return ids[: k + 1]
    return ids
