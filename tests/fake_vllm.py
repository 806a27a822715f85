"""A stand-in for the `vllm` module (`LLM`, `SamplingParams`, `EngineArgs`) for CPU tests.

Importable from every test folder (`import fake_vllm`: tests/ is on sys.path).

`FakeLLM` records every call, and answers by running the transformers model at `model` on
exactly what it was handed, the way vLLM's LLaVA does: the prompt is tokenized (with the
tokenizer's special tokens, as `LLM.generate` does for text prompts; token-id prompts as given),
its one `<image>` placeholder becomes one position per image-feature row, and those positions
take the image embeddings handed over (or, for a PIL image, the model's features of it). It then
decodes with full forward passes: greedy at temperature 0, else sampled from
softmax(logits / temperature) with a generator seeded by the request's seed (its own sampler,
as vLLM's is; no top-p). So greedy answers through it must equal the transformers backend's only
if the prompts and embeddings we hand over are the right ones.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image

from bpo.models import load_model_and_processor


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    repetition_penalty: float = 1.0


@dataclass
class EngineArgs:
    model: str = ""
    enable_mm_embeds: bool = False


@dataclass
class CompletionOutput:
    token_ids: list[int]
    text: str


@dataclass
class RequestOutput:
    prompt: Any
    outputs: list[CompletionOutput] = field(default_factory=list)


class FakeLLM:
    """Records `kwargs` and each `generate` call's (prompts, params); answers with the HF model."""

    instances: ClassVar[list[FakeLLM]] = []

    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs
        self.calls: list[tuple[list[dict], list[SamplingParams]]] = []
        self.model, self.processor = load_model_and_processor(
            kwargs["model"], dtype=kwargs["dtype"], device="cpu", attn_implementation="eager"
        )
        FakeLLM.instances.append(self)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert len(prompts) == len(sampling_params)
        self.calls.append((list(prompts), list(sampling_params)))
        return [self._one(p, s) for p, s in zip(prompts, sampling_params, strict=True)]

    @torch.no_grad()
    def _one(self, prompt: dict, params: SamplingParams) -> RequestOutput:
        model, image_id = self.model, self.model.config.image_token_id
        if "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
        else:
            ids = self.tokenizer(prompt["prompt"])["input_ids"]
        image = prompt.get("multi_modal_data", {}).get("image")
        assert ids.count(image_id) == (0 if image is None else 1), "one unexpanded placeholder"
        features = None
        if isinstance(image, Image.Image):
            pixels = self.processor.image_processor(images=[image], return_tensors="pt")
            out = model.get_image_features(pixel_values=pixels["pixel_values"], return_dict=True)
            features = out.pooler_output[0]  # (tokens, hidden)
        elif image is not None:
            assert image.dim() == 3 and image.shape[0] == 1, "(1, tokens, hidden) per image"
            features = image[0]
        if features is not None:
            at = ids.index(image_id)
            ids = ids[:at] + [image_id] * features.shape[0] + ids[at + 1 :]
        embed = model.get_input_embeddings()
        prefix = embed(torch.tensor([ids]))  # (1, T, hidden)
        if features is not None:
            prefix[0, at : at + features.shape[0]] = features.to(prefix.dtype)
        generator = torch.Generator().manual_seed(params.seed or 0)
        eos = model.generation_config.eos_token_id
        eos = set(eos) if isinstance(eos, list) else {eos}
        new: list[int] = []
        for _ in range(params.max_tokens):
            tail = embed(torch.tensor([new], dtype=torch.long))  # (1, steps, hidden)
            inputs = torch.cat([prefix, tail], dim=1)
            logits = model(inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2]))
            last = logits.logits[0, -1].float()  # (V,)
            if params.temperature == 0:
                token = int(last.argmax())
            else:
                probs = (last / params.temperature).softmax(-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            new.append(token)
            if token in eos:
                break
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return RequestOutput(prompt, [CompletionOutput(new, text)])


def install(monkeypatch) -> types.ModuleType:
    """Put the stand-in at `sys.modules["vllm"]` for one test; returns it."""
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = SamplingParams
    module.EngineArgs = EngineArgs
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module
