"""Load any image-text-to-text model and its processor, the one way every stage does it.

Weights are read from safetensors only (never pickle), remote code runs only when asked for, and
the tokenizer pads on the left so batched generation works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device to run on: "auto" (or None) picks cuda, then mps, then cpu."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(
    dtype: str | torch.dtype | None, device: str | torch.device | None = "auto"
) -> torch.dtype:
    """The weight dtype: a name ("bf16", "float32", ...), a torch.dtype, or "auto"/None.

    "auto" is bfloat16 on a CUDA device that supports it, float16 on other CUDA devices and on
    mps (where float32 would double the memory for no gain in generation), float32 on cpu.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        device = resolve_device(device)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown dtype {dtype!r}; use 'auto' or one of {', '.join(sorted(_DTYPES))}"
        ) from None


def _check_source(name_or_path: str) -> None:
    """Fail early and clearly on a missing local folder or a folder of pickle-only weights.

    Without this, a mistyped local path falls through to a hub lookup whose error talks about
    repo ids, and a folder holding only pytorch_model.bin fails deep inside from_pretrained.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() and not any(path.glob("*.safetensors")):
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(
                p.name for p in path.glob("*.pt")
            )
            if pickles:
                raise OSError(
                    f"{path} holds only PyTorch pickle weights ({', '.join(pickles)}); bpo loads "
                    "safetensors only. Convert once with `model.save_pretrained(folder, "
                    "safe_serialization=True)` from a trusted environment."
                )
        return
    looks_local = name_or_path.startswith((".", "/", "~", "\\")) or Path(name_or_path).is_absolute()
    if not looks_local:
        try:
            validate_repo_id(name_or_path)
        except HFValidationError:
            looks_local = True
    if looks_local:
        raise FileNotFoundError(
            f"model folder {name_or_path!r} not found (resolved to {path.resolve()}); pass an "
            "existing local folder or a hub id like 'llava-hf/llava-1.5-7b-hf'"
        )


def load_processor(
    name_or_path: str, trust_remote_code: bool = False, revision: str | None = None
) -> ProcessorMixin:
    """The model's processor (image processor + tokenizer + chat template), padding on the left."""
    _check_source(name_or_path)
    processor = AutoProcessor.from_pretrained(
        name_or_path, trust_remote_code=trust_remote_code, revision=revision
    )
    # Decoder-only generation appends new tokens at the end of every row; with right padding a
    # short prompt's next token would follow pad tokens, so batched generation must pad on the left.
    # Training stages that want right padding set it themselves on their own copy.
    processor.tokenizer.padding_side = "left"
    return processor


def load_model_and_processor(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    revision: str | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load an AutoModelForImageTextToText (eval mode, on `device`) and its processor.

    name_or_path: a local folder or a hub id; weights must be safetensors.
    dtype: "auto", a name ("bf16", "fp16", "fp32", ...) or a torch.dtype; see `resolve_dtype`.
    attn_implementation: "eager", "sdpa", "flash_attention_2", or None for transformers' default.
    """
    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = _load_weights(AutoModelForImageTextToText, name_or_path, dtype, device, **kwargs)
    processor = load_processor(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    return model, processor


def _load_weights(auto_class: Any, name_or_path: str, dtype: Any, device: Any, **kwargs: Any):
    """`auto_class.from_pretrained` from safetensors only, in eval mode, on `device`."""
    _check_source(name_or_path)
    device = resolve_device(device)
    model = auto_class.from_pretrained(
        name_or_path,
        dtype=resolve_dtype(dtype, device),
        # Loads straight onto the device: a 7B model never sits in CPU memory in full.
        device_map=device,
        use_safetensors=True,
        **kwargs,
    )
    return model.eval()


def load_causal_lm(
    name_or_path: str,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    revision: str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """A text-only causal LM (eval mode, on `device`) and its tokenizer; safetensors only, no
    remote code (a rewriter is never trusted to run its own code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _load_weights(AutoModelForCausalLM, name_or_path, dtype, device, revision=revision)
    return model, AutoTokenizer.from_pretrained(name_or_path, revision=revision)


def count_image_tokens(processor: ProcessorMixin, image: Image.Image | None = None) -> int:
    """How many image tokens the processor puts in the text for one image.

    image: the image to count for (models such as LLaVA-NeXT tile by size); default a black
    square at the processor's crop size, or 336 px when it has none.
    """
    if image is None:
        crop = getattr(processor.image_processor, "crop_size", None) or {}
        height, width = crop.get("height", 336), crop.get("width", 336)
        image = Image.new("RGB", (width, height))
    encoded = processor(images=image, text=processor.image_token, return_tensors="pt")
    return int((encoded["input_ids"] == processor.image_token_id).sum())


@dataclass
class ModelConfig:
    """Which model a stage loads and how: the `model:` section of every stage's config."""

    name_or_path: str
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    revision: str | None = None


def load_from_config(config: ModelConfig) -> tuple[PreTrainedModel, ProcessorMixin]:
    """`load_model_and_processor` with the settings of a ModelConfig."""
    return load_model_and_processor(
        config.name_or_path,
        dtype=config.dtype,
        device=config.device,
        trust_remote_code=config.trust_remote_code,
        attn_implementation=config.attn_implementation,
        revision=config.revision,
    )
