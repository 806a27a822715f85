"""Answer generation for every stage that generates: evaluation and bootstrapping.

One small interface, `generate_with_config(model, processor, requests, config) -> list[str]`, with
two backends named by `GenerateConfig.backend`:

- "transformers" (`generate_answers`): pads on the left (every row's next token is at the last
  position), sorts the requests by prompt length so that a batch pads little, generates with the
  KV cache under `torch.inference_mode`, and returns the answers in the order of the requests.
- "vllm" (`bpo.bootstrap.vllm_backend`, optional, CUDA only): an offline vLLM engine, passed as
  `model` in the form of a `VllmGenerator`; same requests, same answer format. Greedy answers
  agree with the transformers backend's up to numerics; sampled ones follow the same distribution
  but not the same tokens (vLLM's sampler is its own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from bpo.models.prompts import build_prompt


@dataclass
class GenerationRequest:
    """One prompt: chat messages (simple form, `content` a string) and an optional image."""

    messages: list[dict[str, str]]
    image: Image.Image | None = None


Backend = Literal["transformers", "vllm"]
BACKENDS = ("transformers", "vllm")


@dataclass
class VllmConfig:
    """The vLLM engine's options: the `vllm:` section, read when the backend is "vllm"."""

    tensor_parallel_size: int = 1  # GPUs one engine spans
    # Share of each GPU's memory the engine takes (weights + KV cache). Leave room for what runs
    # beside it: the vision tower + projector that encode noised images (~0.6 GB for LLaVA-1.5).
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None  # null: the model's context length
    dtype: str | None = None  # null: the `model:` section's dtype, so both backends match
    enforce_eager: bool = False  # true skips CUDA graphs (slower, starts faster, less memory)
    extra: dict[str, Any] = field(default_factory=dict)  # more vllm.LLM(...) kwargs


@dataclass
class GenerateConfig:
    """How answers are generated: the `generation:` section of a generating stage's config."""

    backend: Backend = "transformers"  # "vllm": an offline vLLM engine (CUDA; bpo[vllm])
    batch_size: int = 8
    max_new_tokens: int = 512
    do_sample: bool = False  # greedy by default, as benchmark answers are reported
    temperature: float = 1.0  # sampling only
    top_p: float = 1.0  # sampling only
    # sampling only. transformers: batch k is seeded with seed + k; vllm: request k of a call
    # gets its own seed, keyed by (seed, k).
    seed: int = 0
    # More model.generate kwargs (transformers) or vllm.SamplingParams kwargs (vllm).
    extra: dict[str, Any] = field(default_factory=dict)
    vllm: VllmConfig = field(default_factory=VllmConfig)  # backend "vllm" only


def check_backend(backend: str) -> None:
    """Fail before any work on an unknown backend, or on "vllm" where vLLM is not installed."""
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown generation backend {backend!r}; use one of {', '.join(map(repr, BACKENDS))}"
        )
    if backend == "vllm":
        from bpo.bootstrap.vllm_backend import require_vllm

        require_vllm()


def _as_request(request: GenerationRequest | dict[str, Any]) -> GenerationRequest:
    if isinstance(request, GenerationRequest):
        return request
    return GenerationRequest(messages=request["messages"], image=request.get("image"))


def _batch_inputs(processor: Any, prompts: list[str], images: list[Image.Image | None]) -> dict:
    # Only rows with an image hold a placeholder, and processors match images to placeholders in
    # row order, so the images of the rows that have one are passed as they come.
    present = [image for image in images if image is not None]
    kwargs: dict[str, Any] = {"text": prompts, "padding": True, "return_tensors": "pt"}
    if present:
        kwargs["images"] = present
    return processor(**kwargs)


@torch.inference_mode()
def generate_answers(
    model: Any,
    processor: Any,
    requests: Sequence[GenerationRequest | dict[str, Any]],
    batch_size: int = 8,
    max_new_tokens: int = 512,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """The model's answer to each request, in request order (transformers backend).

    requests: GenerationRequests, or dicts with "messages" and an optional "image".
    seed: with do_sample, batch k (in length order) runs under torch.manual_seed(seed + k), so a
        rerun with the same requests and batch size samples the same answers.
    progress: called with the number of answers each finished batch added.
    generate_kwargs: passed on to `model.generate` (e.g. repetition_penalty).
    """
    items = [_as_request(r) for r in requests]
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.padding_side != "left":
        raise ValueError(
            "the tokenizer pads on the right, so batched answers would follow pad tokens; load it "
            "with bpo.models.load_processor (which sets padding_side='left') or set it yourself"
        )
    prompts = [
        build_prompt(processor, item.messages, has_image=item.image is not None) for item in items
    ]
    # Length in tokens before image expansion: a good enough key to group similar prompts. Rows
    # with and without an image are kept apart, so that an image batch is all images.
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(items)), key=lambda i: (items[i].image is None, lengths[i], i))
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    answers: list[str] = [""] * len(items)
    for k, start in enumerate(range(0, len(order), batch_size)):
        rows = order[start : start + batch_size]
        inputs = _batch_inputs(
            processor, [prompts[i] for i in rows], [items[i].image for i in rows]
        )
        inputs = inputs.to(model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        if do_sample:
            torch.manual_seed(seed + k)
        output = model.generate(
            **inputs,
            do_sample=do_sample,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            **sampling,
            **generate_kwargs,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]  # (B, new)
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for row, text in zip(rows, texts, strict=True):
            answers[row] = text.strip()
        if progress is not None:
            progress(len(rows))
    return answers


def generate_with_config(
    model: Any,
    processor: Any,
    requests: Sequence[GenerationRequest | dict[str, Any]],
    config: GenerateConfig,
    progress: Callable[[int], None] | None = None,
    max_new_tokens: int | None = None,
) -> list[str]:
    """The answers of the backend named in `config`, in request order.

    model: a transformers model, or for backend "vllm" a `bpo.bootstrap.vllm_backend.VllmGenerator`
        (which holds the engine and its processor; `processor` is then not used).
    max_new_tokens: overrides the config's (a benchmark of one-word answers needs few).
    """
    settings = dict(
        max_new_tokens=max_new_tokens or config.max_new_tokens,
        do_sample=config.do_sample,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
        progress=progress,
        **config.extra,
    )
    if config.backend == "vllm":
        from bpo.bootstrap.vllm_backend import VllmGenerator

        if not isinstance(model, VllmGenerator):
            check_backend("vllm")  # a missing vllm is the likelier mistake: say so first
            raise TypeError(
                "backend 'vllm' answers with a VllmGenerator (see "
                "bpo.bootstrap.vllm_backend.VllmGenerator.from_config), not a "
                f"{type(model).__name__}"
            )
        return model.answers(requests, **settings)
    check_backend(config.backend)
    return generate_answers(model, processor, requests, batch_size=config.batch_size, **settings)
