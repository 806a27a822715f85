"""Requests shared by the generation and bootstrap tests (importable: tests/ is on sys.path)."""

from __future__ import annotations

from PIL import Image

from bpo.generate import GenerationRequest


def mixed_requests() -> list[GenerationRequest]:
    """Five requests of different prompt lengths (so batches pad) and images, one without one.

    The first three all have images: the weakened-negative tests use those.
    """
    red = Image.new("RGB", (32, 32), (255, 0, 0))
    blue = Image.new("RGB", (40, 30), (0, 0, 255))
    split = Image.new("RGB", (32, 32), (0, 255, 0))
    split.paste((255, 255, 0), (0, 0, 16, 32))
    long_turns = [
        {"role": "user", "content": "<image>\nDescribe the image."},
        {"role": "assistant", "content": "a red circle and a blue square ."},
        {"role": "user", "content": "Is there a square in the image?"},
    ]
    return [
        GenerationRequest([{"role": "user", "content": "Describe the image."}], red),
        GenerationRequest(long_turns, blue),
        GenerationRequest([{"role": "user", "content": "Is there a circle in the image?"}], split),
        GenerationRequest([{"role": "user", "content": "What is in the image?"}], None),
        GenerationRequest([{"role": "user", "content": "yes"}], blue),
    ]
