"""vLLM as the generation backend on GPUs: an offline engine answering the same requests.

Written against vLLM's documented offline API (`LLM.generate` with `multi_modal_data`, image
embeddings under `LLM(..., enable_mm_embeds=True)`, one `SamplingParams` per request) and tested
up to the engine's boundary with a stand-in engine that records what it is handed.

- Chat requests go to vLLM as text prompts rendered by our `build_prompt` (one `<image>`
  placeholder, which vLLM expands to the image's tokens itself) with the image as a PIL image,
  or, for a weakened image, as its features (`GenerationRequest.image_embeds`, shape (1, image
  tokens, LM hidden)): the normalized pixels a weakened negative needs leave the image range, so
  no PIL image can carry them, and the features are made from them in transformers.
- Rendered prompts (text-only rewriting) go as token ids, tokenized as the transformers backend
  tokenizes them (no second BOS); a chat prompt whose template wrote the BOS goes without it when
  vLLM's tokenizer adds one itself.
- Sampling: each request gets `SamplingParams(seed=request.seed)`, so an answer does not depend
  on the batch it runs in and a resumed or sharded run remakes it (given the same vLLM version,
  GPUs and parallelism). vLLM's sampler is not ours: the two backends draw from the same
  distribution (same temperature and top-p over the same logits, up to numerics), not the same
  tokens, so a pair store refuses to resume with the other backend.
- Answers are decoded by our tokenizer from the token ids, cut at the end of sequence, so the same
  ids give the same text in both backends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Any

from bpo.generate.config import Decoding, VllmConfig, check_decoding, require_vllm
from bpo.generate.requests import Generation, GenerationRequest, as_request, check_seeds
from bpo.generate.sampling import eos_ids, until_eos
from bpo.models.load import ModelConfig, load_processor, resolve_device, resolve_dtype
from bpo.models.prompts import adds_special_tokens, build_prompt

# A stand-in for `vllm.LLM` needs only this method: generate(prompts, sampling_params, use_tqdm=).
Engine = Any
EngineFactory = Callable[[ModelConfig, VllmConfig], Engine]


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
        # vLLM's "auto" falls back to pickled .bin weights; bpo loads safetensors only.
        "load_format": "safetensors",
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


def _generation_config(model: ModelConfig) -> Any:
    """An object with the model's generation config (None when the model ships none)."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model.name_or_path, revision=model.revision)
    except OSError:
        config = None
    return SimpleNamespace(generation_config=config)


@dataclass
class VllmGenerator:
    """A vLLM engine and the processor whose prompts it answers.

    engine: a `vllm.LLM`, or a stand-in with its `generate(prompts, sampling_params, use_tqdm=)`.
    processor: the model's transformers processor (prompts and decoding).
    eos: the ids that end an answer (default the tokenizer's eos).
    sampling_params: makes one request's sampling parameters (default `vllm.SamplingParams`).
    """

    engine: Engine
    processor: Any
    eos: set[int] | None = None
    sampling_params: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.eos is None:
            self.eos = {self.tokenizer.eos_token_id}

    @classmethod
    def from_config(
        cls,
        model: ModelConfig,
        config: VllmConfig,
        engine_factory: EngineFactory | None = None,
        processor: Any = None,
    ) -> VllmGenerator:
        """The generator of `model`: its processor (unless given) and end-of-sequence ids (the
        model's generation config's), then the engine, last: it takes its share of whatever GPU
        memory is left."""
        if processor is None:
            processor = load_processor(model.name_or_path, model.trust_remote_code, model.revision)
        eos = eos_ids(_generation_config(model), getattr(processor, "tokenizer", processor))
        return cls((engine_factory or make_engine)(model, config), processor, eos)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def _without_template_bos(self, text: str) -> str:
        """The text prompt vLLM should tokenize: vLLM adds the tokenizer's specials to a text
        prompt, so a BOS the chat template wrote (SmolVLM, Gemma) would come twice; it is left
        out here when the tokenizer adds it itself."""
        bos = self.tokenizer.bos_token
        if not bos or not text.startswith(bos):
            return text
        adds_bos = self.tokenizer("a")["input_ids"][:1] == [self.tokenizer.bos_token_id]
        return text[len(bos) :] if adds_bos else text

    def _prompt(self, request: GenerationRequest) -> dict[str, Any]:
        if request.pixels is not None:
            raise ValueError(
                "the vLLM backend takes a weakened image as its features (image_embeds), not a "
                "`pixels` transform; encode the noised pixels first (bpo.bootstrap.weaken does)"
            )
        if request.prompt is not None:
            specials = adds_special_tokens(self.tokenizer, request.prompt)
            ids = self.tokenizer(request.prompt, add_special_tokens=specials)["input_ids"]
            return {"prompt_token_ids": list(ids)}
        has_image = request.image is not None or request.image_embeds is not None
        text = build_prompt(self.processor, request.messages, has_image=has_image)
        entry: dict[str, Any] = {"prompt": self._without_template_bos(text)}
        if request.image_embeds is not None:
            entry["multi_modal_data"] = {"image": request.image_embeds}
        elif request.image is not None:
            entry["multi_modal_data"] = {"image": request.image}
        return entry

    def _params(self, request: GenerationRequest, decoding: Decoding) -> Any:
        make = self.sampling_params or require_vllm().SamplingParams
        sampled = decoding.temperature > 0
        return make(
            n=1,
            max_tokens=decoding.max_new_tokens,
            temperature=decoding.temperature,
            top_p=decoding.top_p if sampled else 1.0,
            seed=request.seed if sampled else None,
            **decoding.extra,
        )

    def generate(
        self,
        requests: Sequence[GenerationRequest | dict[str, Any]],
        decoding: Decoding,
        *,
        progress: Callable[[int], None] | None = None,
        return_logits: bool = False,
    ) -> list[Generation]:
        """The engine's answer to each request, in request order (vLLM batches them itself)."""
        if return_logits:
            raise ValueError("the vLLM backend does not return logits; use the transformers one")
        check_decoding(decoding)
        items = [as_request(r) for r in requests]
        check_seeds(items, decoding.temperature)
        if not items:
            return []
        prompts = [self._prompt(r) for r in items]
        params = [self._params(r, decoding) for r in items]
        outputs = self.engine.generate(prompts, params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"the engine answered {len(outputs)} of {len(prompts)} prompts")
        answers = []
        for out in outputs:
            ids = until_eos(list(out.outputs[0].token_ids), self.eos)
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            answers.append(Generation(text, ids))
        if progress is not None:
            progress(len(items))
        return answers
