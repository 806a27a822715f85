"""Devices and dtypes: the names every stage's `model:` section accepts, resolved one way."""

from __future__ import annotations

from typing import Any

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


def check_model(model: Any) -> None:
    """Raise ValueError on a `model.dtype` or `model.device` the loader would refuse.

    The loader refuses them only once the weights load, after the store has recorded them, so
    the corrected rerun was refused as a config mismatch.
    """
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
