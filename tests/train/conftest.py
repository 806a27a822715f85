"""Fixtures of the training tests: the session's tiny LLaVA, an image, and preference pairs."""

from __future__ import annotations

import pytest
from PIL import Image

from bpo.data.records import PreferencePair
from bpo.models import load_model_and_processor


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def llava(request, tiny_llava_folder, one_torch_thread):
    """(model, processor) of the tiny LLaVA in fp32 on CPU, once per attention implementation."""
    return load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation=request.param
    )


@pytest.fixture(scope="session")
def processor(tiny_llava_folder):
    """The tiny LLaVA's processor alone (tokenization tests need no model)."""
    from bpo.models.load import load_processor

    return load_processor(str(tiny_llava_folder))


@pytest.fixture(scope="session")
def image():
    """A 40x30 RGB image, half red, half blue."""
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 30))
    return img


def make_pair(pair_id: str, prompt: list[dict], chosen: str, rejected: str) -> PreferencePair:
    """A pair with an image path (the image itself is passed to encode_pair separately)."""
    return PreferencePair(
        id=pair_id, image="x.png", prompt=prompt, chosen=chosen, rejected=rejected, source="test"
    )


@pytest.fixture(scope="session")
def pairs():
    """Three pairs with different prompt and answer lengths, one prompt multi-turn; the words
    are ones the tiny tokenizer knows."""
    return [
        make_pair(
            "one",
            [{"role": "user", "content": "<image>\nDescribe the image."}],
            "a red circle and a blue square .",
            "a dog .",
        ),
        make_pair(
            "two",
            [
                {"role": "user", "content": "<image>\nWhat is in the image?"},
                {"role": "assistant", "content": "a green triangle and a white ring ."},
                {"role": "user", "content": "Is there a circle in the image?"},
            ],
            "no",
            "yes , a yellow diamond and a red circle .",
        ),
        make_pair(
            "three",
            [
                {"role": "user", "content": "Is there a square in the image?"},
                {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "Is there an apple in the image?"},
                {"role": "assistant", "content": "no"},
                {"role": "user", "content": "Describe the image."},
            ],
            "a blue square .",
            "a dog and a cat and a green triangle .",
        ),
    ]
