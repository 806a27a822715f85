"""What a backend is asked and what it answers: one request, one generation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from torch import Tensor


@dataclass
class GenerationRequest:
    """One prompt: chat messages (or an already rendered prompt) and an optional image.

    messages: simple-form chat messages (`content` a string), rendered by the processor's chat
        template with the image placeholder (`bpo.models.prompts.build_prompt`).
    prompt: a prompt already rendered as text, used instead of `messages` (text-only language
        models, e.g. an LM rewriting an answer through its own chat template).
    seed: this request's sampling seed (see `bpo.generate.sampling.stream_seed`); sampling
        needs one, so that the answer does not depend on the batch the request lands in.
    pixels: transformers backend: maps this request's processed pixel tensor (its row of the
        batch's `pixel_values`) to the one the model sees; image weakening noises it here.
    image_embeds: vLLM backend: the image's features, (1, image tokens, LM hidden), given to the
        engine in place of the image.
    """

    messages: list[dict[str, str]] | None = None
    image: Image.Image | None = None
    prompt: str | None = None
    seed: int | None = None
    pixels: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)
    image_embeds: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerationRequest needs exactly one of messages= and prompt=")


@dataclass
class Generation:
    """One answer: its text, its token ids up to and including the end of sequence."""

    text: str
    token_ids: list[int]
    logits: Tensor | None = field(default=None, repr=False)  # (steps, vocab), when asked for


def as_request(request: GenerationRequest | dict[str, Any]) -> GenerationRequest:
    """A request from a GenerationRequest or a dict with "messages" and an optional "image"."""
    if isinstance(request, GenerationRequest):
        return request
    return GenerationRequest(messages=request["messages"], image=request.get("image"))


def check_seeds(requests: list[GenerationRequest], temperature: float) -> None:
    """Sampling draws each request from its own seed: refuse a request that has none."""
    if temperature > 0:
        for position, request in enumerate(requests):
            if request.seed is None:
                raise ValueError(
                    f"request {position} has no seed; sampling (temperature > 0) needs one per "
                    "request, e.g. bpo.generate.stream_seed(seed, request key, 0, 'sample')"
                )
