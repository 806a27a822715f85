"""Tiny LLaVA models built once per test run and saved the way every stage loads them."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from PIL import Image

from bpo.models.tiny import TinyLlavaConfig, build_tiny_llava, save_tiny_llava

COLOURS = ["red", "blue", "green", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle"]
PROMPTS = ["Describe the image.", "What is in the image?", "How many shapes are there?"]
# ~50 short captions plus the prompts: enough text for a 512-token BPE vocabulary.
TEXTS = [
    f"a {c1} {s1} and a {c2} {s2} ."
    for (c1, s1), (c2, s2) in itertools.islice(
        itertools.combinations(itertools.product(COLOURS, SHAPES), 2), 50
    )
] + PROMPTS


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
