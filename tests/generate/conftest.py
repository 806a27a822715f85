"""Fixtures of the generation tests: the session's tiny LLaVA, loaded once per module."""

from __future__ import annotations

import pytest

from bpo.models import load_model_and_processor


@pytest.fixture(scope="module")
def loaded(tiny_llava_folder):
    """(model, processor) of the tiny LLaVA, fp32 on CPU with eager attention (exact logits)."""
    return load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )
