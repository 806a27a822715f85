"""The model sections of the stage configs, importable without torch or transformers.

Every verb's schema names these dataclasses, and `bpo --help` builds every verb's schema, so they
live apart from the loaders: `ModelConfig` (the `model:` section), `TinyLlavaConfig` (the sizes of
a tiny LLaVA), and `check_model`, which imports torch only when a config is checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ModelConfig:
    """Which model a stage loads and how: the `model:` section of every stage's config."""

    name_or_path: str
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    revision: str | None = None


@dataclass
class TinyLlavaConfig:
    """Sizes of a tiny LLaVA model. Defaults give ~0.2M parameters: fast on one CPU core."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate_size: int = 128
    # -1: the last layer's patch features (a 2-layer tower has little to gain from LLaVA's -2).
    vision_feature_layer: int = -1
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 192
    vocab_size: int = 512
    max_position_embeddings: int = 256
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image: one per patch (the CLS position is dropped, strategy 'default')."""
        return (self.image_size // self.patch_size) ** 2


def check_model(model: Any) -> None:
    """Raise ValueError on a `model.dtype` or `model.device` the loader would refuse.

    The loader refuses them only once the weights load, after the store has recorded them, so
    the corrected rerun was refused as a config mismatch.
    """
    import torch

    from bpo.models.devices import resolve_device, resolve_dtype

    try:
        resolve_dtype(model.dtype, "cpu")  # "cpu": the name is checked, no CUDA query for "auto"
    except ValueError as error:
        raise ValueError(f"model.dtype: {error}") from None
    try:
        device = resolve_device(model.device)
    except RuntimeError:  # torch's message lists twenty device types
        raise ValueError(
            f"model.device {model.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if device.type in available and not available[device.type]():
        raise ValueError(
            f"model.device {model.device!r} but torch sees no {device.type.upper()} device; "
            "use auto or cpu"
        )
