"""vLLM as the generation backend on GPUs: clean-image answers and image-weakened negatives.

Status: written against vLLM's documented offline API (`LLM.generate` with `multi_modal_data`,
image embeddings under `LLM(..., enable_mm_embeds=True)`, one `SamplingParams` per request) and
tested only up to the engine's boundary, with a stand-in engine that records what it is handed.
It has not been run against a real vLLM engine here (no GPU where it was written). What the tests
verify is our side: the prompts, the image embeddings, the sampling parameters and the handling of
the answers. A first GPU run should compare a few greedy answers with the transformers backend.

Clean images (evaluation) go to vLLM as PIL images: `{"prompt": p, "multi_modal_data": {"image":
image}}`, with the prompt as llava-hf models document it (one `<image>` placeholder, which vLLM
expands to the image's tokens itself).

Image-weakened negatives need the noise on the processor's *normalized* pixel tensor, whose values
leave the image range, so no PIL image can carry it. The noised pixels therefore go through the
model's vision tower and projector here, in transformers (`get_image_features`, the call LLaVA's
own forward makes, with the config's vision_feature_layer and select strategy), and vLLM gets the
features as image embeddings, shape (1, image tokens, LM hidden size) per sample. The pixels are
made by the same processor call and noised by the same `noise_pixels`, keyed per (seed, request,
sample), as in `bpo.bootstrap.weaken`, so vLLM's language model sees exactly the image features
the transformers backend's sees (the tests check equality to the bit on a tiny LLaVA). This path
needs a LLaVA-architecture model (`get_image_features(pixel_values=...)` without extra inputs).

Sampling: each (request, sample) gets its own `SamplingParams(seed=stream_seed(seed, i, j,
"sample"))`, so in vLLM too an answer does not depend on the batch it runs in, and a resumed or
sharded run remakes it (given the same vLLM version, GPUs and parallelism). vLLM's sampler is not
ours, so the two backends draw from the same distribution (same temperature and top-p over the
same logits, up to numerics), not the same tokens: do not mix backends in one pair store.

Memory: beside the engine, `load_image_encoder` keeps only the vision tower and projector on the
GPU (about 0.6 GB in bf16 for LLaVA-1.5's CLIP ViT-L/336), after loading the model on the CPU.
The embeddings of one call wait on the CPU: 576 x 4096 x 2 bytes (4.7 MB) a sample for LLaVA-1.5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from bpo.bootstrap.generate import GenerationRequest, VllmConfig, _as_request
from bpo.bootstrap.inject import LocalRewriter
from bpo.bootstrap.weaken import (
    WeakenConfig,
    WeakenedAnswer,
    answer_meta,
    check_config,
    eos_ids,
    image_requests,
    noise_pixels,
    stream_seed,
    until_eos,
)
from bpo.models.load import ModelConfig, resolve_device, resolve_dtype
from bpo.models.prompts import build_prompt

# A stand-in for `vllm.LLM` needs only this method: generate(prompts, sampling_params, use_tqdm=).
Engine = Any
EngineFactory = Callable[[ModelConfig, VllmConfig], Engine]


class VllmUnavailableError(ImportError):
    """The vllm package is not installed (or does not import) where backend "vllm" was asked for."""


def require_vllm() -> ModuleType:
    """The vllm module, or a VllmUnavailableError that says how to get it."""
    try:
        import vllm
    except ImportError as error:
        raise VllmUnavailableError(
            f"generation backend 'vllm' needs the vllm package, which does not import here "
            f"({error}). On a machine with a CUDA GPU: pip install 'bpo[vllm]'. Elsewhere set "
            "backend: transformers."
        ) from error
    return vllm


def engine_kwargs(model: ModelConfig, config: VllmConfig) -> dict[str, Any]:
    """The `vllm.LLM(...)` arguments for `model` with the engine options `config`.

    The dtype is resolved the way the transformers loader resolves it (so "auto" is bfloat16 on a
    GPU that has it, as for the encoder of noised images): both halves of the model then match.
    """
    dtype = resolve_dtype(config.dtype or model.dtype, resolve_device(model.device))
    kwargs: dict[str, Any] = {
        "model": model.name_or_path,
        "revision": model.revision,
        "trust_remote_code": model.trust_remote_code,
        "dtype": str(dtype).removeprefix("torch."),
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "enforce_eager": config.enforce_eager,
        "limit_mm_per_prompt": {"image": 1},
        # Weakened negatives arrive as image embeddings, which vLLM accepts only when asked to.
        "enable_mm_embeds": True,
    }
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    return {**kwargs, **config.extra}


def make_engine(model: ModelConfig, config: VllmConfig) -> Engine:
    """A `vllm.LLM` for `model` (the default engine factory)."""
    vllm = require_vllm()
    kwargs = engine_kwargs(model, config)
    if "enable_mm_embeds" not in {f.name for f in fields(vllm.EngineArgs)}:
        kwargs.pop("enable_mm_embeds")  # vLLM before the switch took embeddings without one
    return vllm.LLM(**kwargs)


def load_image_encoder(model: ModelConfig) -> tuple[Any, Any]:
    """(the model with its language model dropped, its processor): what encodes noised images.

    The model is loaded on the CPU and only the vision tower and projector move to the device,
    so a 7B language model never takes GPU memory the engine needs.
    """
    from bpo.models.load import load_from_config

    device = resolve_device(model.device)
    encoder, processor = load_from_config(
        replace(
            model,
            device="cpu",
            dtype=str(resolve_dtype(model.dtype, device)).removeprefix("torch."),
        )
    )
    encoder.model.language_model = None
    encoder.lm_head = None
    return encoder.to(device), processor


@torch.inference_mode()
def image_features(encoder: Any, pixel_values: Tensor) -> Tensor:
    """(B, image tokens, LM hidden) features of pixels (B, C, H, W), as LLaVA's forward makes them.

    The same call the forward makes: `get_image_features` with the config's feature layer and
    select strategy, through the vision tower and the projector.
    """
    out = encoder.get_image_features(pixel_values=pixel_values, return_dict=True)
    features = getattr(out, "pooler_output", out)  # transformers 5: an output; 4.x: the tensor
    if isinstance(features, (list, tuple)):
        features = torch.stack(list(features))  # one (tokens, hidden) per image
    return features


@dataclass
class VllmGenerator:
    """A vLLM engine, the processor whose prompts it answers, and the encoder of noised images.

    engine: a `vllm.LLM`, or a stand-in with its `generate(prompts, sampling_params, use_tqdm=)`.
    processor: the model's transformers processor (prompts, pixels, decoding).
    encoder: the transformers model whose vision tower and projector encode noised pixels
        (`load_image_encoder`); needed for weakened negatives only.
    sampling_params: makes one request's sampling parameters (default `vllm.SamplingParams`).
    batch_size: images the encoder encodes at once (the engine gets all of a call's requests).
    """

    engine: Engine
    processor: Any
    encoder: Any = None
    sampling_params: Callable[..., Any] | None = None
    batch_size: int = 8

    @classmethod
    def from_config(
        cls,
        model: ModelConfig,
        config: VllmConfig,
        batch_size: int = 8,
        with_encoder: bool = True,
        engine_factory: EngineFactory | None = None,
    ) -> VllmGenerator:
        """The generator of `model`: encoder (if `with_encoder`) and processor, then the engine."""
        if with_encoder:
            encoder, processor = load_image_encoder(model)
        else:
            from bpo.models.load import load_processor

            encoder = None
            processor = load_processor(model.name_or_path, model.trust_remote_code, model.revision)
        engine = (engine_factory or make_engine)(model, config)
        return cls(engine, processor, encoder, batch_size=batch_size)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def _params(self, **kwargs: Any) -> Any:
        make = self.sampling_params or require_vllm().SamplingParams
        return make(n=1, **kwargs)

    def _generate(
        self,
        prompts: list[dict[str, Any]],
        params: list[Any],
        progress: Callable[[int], None] | None = None,
    ) -> list[list[int]]:
        """Each prompt's generated token ids, up to and including the end of sequence."""
        if not prompts:
            return []
        # vLLM schedules the whole list itself (continuous batching) and answers in input order.
        outputs = self.engine.generate(prompts, params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"the engine answered {len(outputs)} of {len(prompts)} prompts")
        eos = eos_ids(self.encoder, self.tokenizer)
        ids = [until_eos(list(out.outputs[0].token_ids), eos) for out in outputs]
        if progress is not None:
            progress(len(prompts))
        return ids

    def _decode(self, ids: list[int]) -> str:
        # Our tokenizer, not vLLM's text: the same ids give the same text in both backends.
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def answers(
        self,
        requests: Sequence[GenerationRequest | dict[str, Any]],
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        progress: Callable[[int], None] | None = None,
        indices: Sequence[int] | None = None,
        **sampling_kwargs: Any,
    ) -> list[str]:
        """The answer to each request (clean image or none), in request order.

        seed: with do_sample, request k is sampled with seed `stream_seed(seed, indices[k], 0,
            "sample")` (indices default to 0, 1, ...).
        sampling_kwargs: more `SamplingParams` fields (e.g. repetition_penalty).
        """
        items = [_as_request(r) for r in requests]
        keys = list(range(len(items))) if indices is None else list(indices)
        prompts = []
        for item in items:
            prompt = build_prompt(self.processor, item.messages, has_image=item.image is not None)
            entry: dict[str, Any] = {"prompt": prompt}
            if item.image is not None:
                entry["multi_modal_data"] = {"image": item.image}
            prompts.append(entry)
        params = [
            self._params(
                max_tokens=max_new_tokens,
                temperature=temperature if do_sample else 0.0,
                top_p=top_p if do_sample else 1.0,
                seed=stream_seed(seed, key, 0, "sample") if do_sample else None,
                **sampling_kwargs,
            )
            for key in keys
        ]
        return [self._decode(ids) for ids in self._generate(prompts, params, progress)]

    def noised_image_embeds(
        self, items: list[GenerationRequest], keys: list[int], config: WeakenConfig
    ) -> list[Tensor]:
        """One (1, image tokens, LM hidden) CPU tensor per (request, sample), in that order.

        Pixels come from the processor call `weakened_answers` makes, noised by `noise_pixels`
        with the same keys, and cast to the encoder's device and dtype in the same order.
        """
        if self.encoder is None:
            raise ValueError(
                "weakened negatives with vLLM need the encoder of noised images; build the "
                "VllmGenerator with with_encoder=True (or pass encoder=load_image_encoder(...))"
            )
        prompts = [build_prompt(self.processor, item.messages, has_image=True) for item in items]
        rows = [(p, j) for p in range(len(items)) for j in range(config.samples_per_prompt)]
        embeds: list[Tensor] = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            clean = self.processor(
                text=[prompts[p] for p, _ in batch],
                images=[items[p].image for p, _ in batch],
                padding=True,
                return_tensors="pt",
            )["pixel_values"]  # (B, C, H, W): one image per row
            noised = torch.cat(
                [
                    noise_pixels(clean[b : b + 1], config, keys[p], j)
                    for b, (p, j) in enumerate(batch)
                ]
            )  # (B, C, H, W)
            noised = noised.to(self.encoder.device).to(self.encoder.dtype)
            features = image_features(self.encoder, noised)  # (B, tokens, hidden)
            embeds.extend(row[None].cpu() for row in features)
        return embeds

    def weakened(
        self,
        requests: Sequence[GenerationRequest | dict[str, Any]],
        config: WeakenConfig | None = None,
        indices: Sequence[int] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[list[WeakenedAnswer]]:
        """`weakened_answers` through vLLM: same records, same keys, vLLM's sampler.

        indices: the requests' global indices (default 0, 1, ...), which key noise and sampling.
        """
        config = config or WeakenConfig()
        check_config(config)
        items, keys = image_requests(requests, indices)
        embeds = self.noised_image_embeds(items, keys, config)
        rows = [(p, j) for p in range(len(items)) for j in range(config.samples_per_prompt)]
        prompts = [
            {
                "prompt": build_prompt(self.processor, items[p].messages, has_image=True),
                "multi_modal_data": {"image": embed},
            }
            for (p, _), embed in zip(rows, embeds, strict=True)
        ]
        params = [
            self._params(
                max_tokens=config.max_new_tokens,
                temperature=config.temperature,
                top_p=config.top_p,
                seed=stream_seed(config.seed, keys[p], j, "sample"),
            )
            for p, j in rows
        ]
        answers: list[list[Any]] = [[None] * config.samples_per_prompt for _ in items]
        for (p, j), ids in zip(rows, self._generate(prompts, params, progress), strict=True):
            answers[p][j] = WeakenedAnswer(
                text=self._decode(ids),
                token_ids=ids,
                meta={**answer_meta(config), "request_index": keys[p], "sample_index": j},
            )
        return answers

    def complete_ids(
        self,
        prompt_ids: Sequence[list[int]],
        seeds: Sequence[int],
        temperature: float,
        top_p: float,
        max_new_tokens: int,
    ) -> list[list[int]]:
        """Text-only continuations of tokenized prompts, request k sampled with seeds[k]."""
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        params = [
            self._params(
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p if temperature > 0 else 1.0,
                seed=seed,
            )
            for seed in seeds
        ]
        return self._generate(prompts, params)


class VllmRewriter(LocalRewriter):
    """`LocalRewriter` whose continuations come from the vLLM engine's language model, text only.

    The prompts are the same text, handed over as the token ids LocalRewriter's model would get
    (no second BOS), and request i is sampled with the same keyed seed; vLLM's sampler draws the
    tokens, so the rewrites follow LocalRewriter's distribution, not its exact tokens.
    """

    def __init__(self, generator: VllmGenerator, tokenizer: Any, **kwargs: Any):
        super().__init__(None, tokenizer, **kwargs)
        self.generator = generator

    def generate_ids(
        self, prompts: Sequence[str], indices: Sequence[int] | None = None
    ) -> list[list[int]]:
        """The new tokens of each prompt's continuation (at most max_new_tokens)."""
        seeds = self.seeds(len(prompts), indices)
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return self.generator.complete_ids(
            ids, seeds, self.temperature, self.top_p, self.max_new_tokens
        )
