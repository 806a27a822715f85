"""Bootstrapping negatives: generation backends, noise, weakened and error-injected answers.

The optional vLLM backend lives in `bpo.bootstrap.vllm_backend` (imported on use: vllm is optional).
"""

from bpo.bootstrap.generate import (
    GenerateConfig,
    GenerationRequest,
    VllmConfig,
    generate_answers,
    generate_with_config,
)
from bpo.bootstrap.inject import (
    EndpointRewriter,
    Injection,
    InjectionStats,
    InjectionVocabulary,
    LocalRewriter,
    causal_lm_from_mllm,
    inject_errors,
    validate_rewrite,
)
from bpo.bootstrap.noise import add_noise, alphas_cumprod
from bpo.bootstrap.weaken import WeakenConfig, WeakenedAnswer, weakened_answers

__all__ = [
    "EndpointRewriter",
    "GenerateConfig",
    "GenerationRequest",
    "Injection",
    "InjectionStats",
    "InjectionVocabulary",
    "LocalRewriter",
    "VllmConfig",
    "WeakenConfig",
    "WeakenedAnswer",
    "add_noise",
    "alphas_cumprod",
    "causal_lm_from_mllm",
    "generate_answers",
    "generate_with_config",
    "inject_errors",
    "validate_rewrite",
    "weakened_answers",
]
