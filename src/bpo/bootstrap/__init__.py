"""Bootstrapping negatives; for now the generation backend every generating stage shares."""

from bpo.bootstrap.generate import (
    GenerateConfig,
    GenerationRequest,
    generate_answers,
    generate_with_config,
)

__all__ = ["GenerateConfig", "GenerationRequest", "generate_answers", "generate_with_config"]
