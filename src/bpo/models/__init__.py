"""The model layer: load any image-text-to-text model and processor, build prompts, tiny models."""

from bpo.utils.lazy import lazy_exports

_EXPORTS = {
    "IMAGE_PLACEHOLDER": "prompts",
    "build_full_text": "prompts",
    "build_prompt": "prompts",
    "count_image_tokens": "load",
    "load_model_and_processor": "load",
    "load_processor": "load",
    "resolve_device": "load",
    "resolve_dtype": "load",
    "tokenize_prompt_and_answer": "prompts",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
