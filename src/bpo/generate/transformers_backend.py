"""Generation in a loaded transformers model: batched, left-padded, keyed sampling.

Each request is encoded alone by the processor and the samples joined (`bpo.models.family`), so
a request's pixels are its own whatever the family's pixel layout. Requests are sorted by prompt
length (rows with and without an image apart, and rows whose
template wrote the BOS apart from those that need one), so that a batch pads little; prompts pad
on the left, so every row's next token is at the last position; each row samples from its own
keyed generator (`KeyedSampler`), so batching never changes an answer; answers come back in the
order of the requests, cut at the end of sequence.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList

from bpo.generate.config import Decoding, check_decoding
from bpo.generate.requests import Generation, GenerationRequest, as_request, check_seeds
from bpo.generate.sampling import KeyedSampler, eos_ids, until_eos
from bpo.models.family import encode_sample, join_samples
from bpo.models.prompts import adds_special_tokens, build_prompt


def prompt_text(processor: Any, request: GenerationRequest) -> str:
    """The request's prompt as text: given, or its messages through the chat template."""
    if request.prompt is not None:
        return request.prompt
    return build_prompt(processor, request.messages, has_image=request.image is not None)


class TransformersGenerator:
    """A transformers model and its processor (or, for a text-only LM, its tokenizer)."""

    def __init__(self, model: Any, processor: Any, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.processor, self.batch_size = model, processor, batch_size
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if self.tokenizer.pad_token is None:
            # Padding is masked out of attention, so any token serves; causal LMs often have none.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.eos = eos_ids(model, self.tokenizer)

    def batches(self, prompts: list[str], requests: list[GenerationRequest]) -> list[list[int]]:
        """Request indices in batches: alike rows together, each group in length order."""
        specials = [adds_special_tokens(self.tokenizer, p) for p in prompts]
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False).input_ids]

        def group(i: int) -> tuple[bool, bool]:
            return specials[i], requests[i].image is None

        order = sorted(range(len(prompts)), key=lambda i: (group(i), lengths[i], i))
        batches = []
        for _, rows in itertools.groupby(order, key=group):
            rows = list(rows)
            batches += [rows[s : s + self.batch_size] for s in range(0, len(rows), self.batch_size)]
        return batches

    def inputs(self, prompts: list[str], requests: list[GenerationRequest]) -> Any:
        """One batch of alike rows: each request encoded alone (`bpo.models.family`), its pixels
        transformed where it asks, then joined and left-padded."""
        specials = adds_special_tokens(self.tokenizer, prompts[0])
        samples = []
        for prompt, request in zip(prompts, requests, strict=True):
            sample = encode_sample(self.processor, prompt, request.image, specials)
            if request.pixels is not None:
                sample["pixel_values"] = request.pixels(sample["pixel_values"])
            samples.append(sample)
        inputs = join_samples(samples, self.tokenizer.pad_token_id, side="left")
        inputs = {name: tensor.to(self.model.device) for name, tensor in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    @torch.inference_mode()
    def generate(
        self,
        requests: Sequence[GenerationRequest | dict[str, Any]],
        decoding: Decoding,
        *,
        progress: Callable[[int], None] | None = None,
        return_logits: bool = False,
    ) -> list[Generation]:
        """The model's answer to each request, in request order.

        progress: called with the number of answers each finished batch added.
        return_logits: keep each answer's raw per-step logits (tests; memory grows with vocab).
        """
        check_decoding(decoding)
        items = [as_request(r) for r in requests]
        if any(r.image_embeds is not None for r in items):
            raise ValueError(
                "the transformers backend takes images (and a `pixels` transform), not image "
                "embeddings; image_embeds are for the vLLM backend"
            )
        check_seeds(items, decoding.temperature)
        if not items:
            return []  # the tokenizer cannot batch no prompts
        prompts = [prompt_text(self.processor, r) for r in items]
        answers: list[Generation | None] = [None] * len(items)
        for rows in self.batches(prompts, items):
            batch = [items[i] for i in rows]
            inputs = self.inputs([prompts[i] for i in rows], batch)
            sampler = KeyedSampler(
                [r.seed or 0 for r in batch], decoding.temperature, decoding.top_p
            )
            output = self.model.generate(
                **inputs,
                do_sample=False,  # the keyed sampler picks every token
                max_new_tokens=decoding.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                use_cache=True,
                logits_processor=LogitsProcessorList([sampler]),
                return_dict_in_generate=True,
                output_logits=return_logits,
                **decoding.extra,
            )
            new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]  # (B, new)
            for b, i in enumerate(rows):
                ids = until_eos(new_tokens[b].tolist(), self.eos)
                logits = None
                if return_logits:
                    logits = torch.stack([step[b] for step in output.logits[: len(ids)]]).cpu()
                text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                answers[i] = Generation(text, ids, logits)
            if progress is not None:
                progress(len(rows))
        return answers  # type: ignore[return-value]
