"""The model layer: load any image-text-to-text model and processor, build prompts, tiny models."""

from bpo.models.load import (
    count_image_tokens,
    load_model_and_processor,
    load_processor,
    resolve_device,
    resolve_dtype,
)
from bpo.models.prompts import (
    IMAGE_PLACEHOLDER,
    build_full_text,
    build_prompt,
    tokenize_prompt_and_answer,
)

__all__ = [
    "IMAGE_PLACEHOLDER",
    "build_full_text",
    "build_prompt",
    "count_image_tokens",
    "load_model_and_processor",
    "load_processor",
    "resolve_device",
    "resolve_dtype",
    "tokenize_prompt_and_answer",
]
