"""Devices and dtypes: the names every stage's `model:` section accepts, resolved one way.

`bpo.models.config.check_model` checks a config's names with these before anything loads.
"""

from __future__ import annotations

import torch

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
