"""Tiny LLaVA models built once per test run and saved the way every stage loads them."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from bpo.models.tiny import TinyLlavaConfig, build_tiny_llava, save_tiny_llava
from family_helpers import TEXTS


@pytest.fixture(scope="session")
def texts():
    """The text the tiny tokenizer is trained on."""
    return list(TEXTS)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model, processor, saved folder, config) of the default tiny LLaVA."""
    config = TinyLlavaConfig()
    model, processor = build_tiny_llava(TEXTS, config, seed=0)
    folder = save_tiny_llava(model, processor, tmp_path_factory.mktemp("tiny"), config)
    return model, processor, Path(folder), config


@pytest.fixture(scope="session")
def image():
    """A 40x30 RGB image: half red, half blue, so resizing and cropping both matter."""
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 30))
    return img
