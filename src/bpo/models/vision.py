"""The vision half of an image-text model: the tower and projector alone, and their features.

Image-weakened negatives with the vLLM backend need the image features of *noised* pixels, which
only the model's own vision tower and projector can make; vLLM's language model then reads them as
image embeddings. The features come from the call the model's own forward makes
(`get_image_features`, with the config's feature layer and select strategy).
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from bpo.models.family import UnsupportedModelError, family_of, language_model_name
from bpo.models.load import ModelConfig, load_from_config, resolve_device, resolve_dtype


def load_image_encoder(model: ModelConfig) -> tuple[Any, Any]:
    """(the model with its language model dropped, its processor): what encodes noised images.

    The model is loaded on the CPU and only the vision tower and projector move to the device,
    so a 7B language model never takes GPU memory a generation engine needs.
    """
    device = resolve_device(model.device)
    dtype = str(resolve_dtype(model.dtype, device)).removeprefix("torch.")
    encoder, processor = load_from_config(replace(model, device="cpu", dtype=dtype))
    family = family_of(encoder)  # load_from_config has refused unsupported families
    if not family.image_embeds:
        raise UnsupportedModelError(
            f"image weakening with the vLLM backend hands vLLM the noised image's features, which "
            f"is wired for LLaVA-1.5 only, not yet for {family.name!r}; use backend: transformers"
        )
    encoder.set_submodule(language_model_name(encoder), torch.nn.Identity())
    encoder.lm_head = None
    return encoder.to(device), processor


@torch.inference_mode()
def image_features(encoder: Any, vision: dict[str, Tensor]) -> Tensor:
    """(images, image tokens, LM hidden) features of a batch's vision tensors (`pixel_values`
    and what the family adds), as the model's forward makes them, for families with a fixed
    number of tokens per image (`Family.image_embeds`)."""
    accepted = inspect.signature(encoder.get_image_features).parameters
    kwargs = {k: v.to(encoder.device) for k, v in vision.items() if k in accepted}
    kwargs["pixel_values"] = kwargs["pixel_values"].to(encoder.dtype)
    out = encoder.get_image_features(**kwargs, return_dict=True)
    features = getattr(out, "pooler_output", out)  # transformers 5: an output; 4.x: the tensor
    if isinstance(features, (list, tuple)):
        features = torch.stack(list(features))  # one (tokens, hidden) per image
    return features
