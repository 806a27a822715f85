"""The generator a stage's config asks for: a transformers model, or a vLLM engine."""

from __future__ import annotations

from typing import Any

from bpo.generate.config import Backend, VllmConfig, check_backend
from bpo.generate.transformers_backend import TransformersGenerator
from bpo.generate.vllm_backend import EngineFactory, VllmGenerator
from bpo.models.load import ModelConfig, load_from_config

Generator = TransformersGenerator | VllmGenerator


def load_generator(
    model: ModelConfig,
    backend: Backend = "transformers",
    batch_size: int = 8,
    vllm: VllmConfig | None = None,
    loaded: tuple[Any, Any] | None = None,
    engine_factory: EngineFactory | None = None,
) -> Generator:
    """The generator of `model` on `backend`.

    loaded: an already loaded (model, processor) for the transformers backend.
    engine_factory: backend "vllm": makes the engine from (model, vllm) instead of `vllm.LLM`
        (tests hand in a stand-in; vllm must still import, for its `SamplingParams`).
    """
    check_backend(backend)  # before anything loads
    if backend == "vllm":
        return VllmGenerator.from_config(model, vllm or VllmConfig(), engine_factory)
    model_and_processor = loaded if loaded is not None else load_from_config(model)
    return TransformersGenerator(*model_and_processor, batch_size=batch_size)
