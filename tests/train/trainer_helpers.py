"""A small pair store with images on disk, and configs for the trainer tests (importable)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from bpo.data.records import PreferencePair
from bpo.data.store import PairWriter
from bpo.models.load import ModelConfig
from bpo.train.config import LoraSettings, TrainConfig

DESCRIBE = [{"role": "user", "content": "<image>\nDescribe the image."}]
SQUARE = [{"role": "user", "content": "<image>\nIs there a square in the image?"}]
# (id, image, prompt, chosen, rejected, source): words the session's tiny tokenizer knows.
ROWS = [
    ("p0", "red.png", DESCRIBE, "a red circle and a blue square .", "a dog .", "weaken"),
    ("p1", "blue.png", DESCRIBE, "a blue square .", "a green triangle and a cat .", "inject"),
    ("p2", "green.png", SQUARE, "no", "yes , a white ring .", "weaken"),
    ("p3", "red.png", SQUARE, "yes", "no", "inject"),
    ("p4", "blue.png", DESCRIBE, "a yellow diamond and a white ring .", "a red circle .", "weaken"),
    ("p5", "green.png", DESCRIBE, "a green triangle .", "a dog and a cat .", "inject"),
]
COLOURS = {"red.png": (255, 0, 0), "blue.png": (0, 0, 255), "green.png": (0, 255, 0)}


def make_pairs() -> list[PreferencePair]:
    return [PreferencePair(i, img, p, c, r, source=s) for i, img, p, c, r, s in ROWS]


def make_images() -> dict[str, Image.Image]:
    """The pairs' images by path: solid colours with a white square in one corner."""
    images = {}
    for name, colour in COLOURS.items():
        image = Image.new("RGB", (32, 32), colour)
        image.paste((255, 255, 255), (0, 0, 12, 12))
        images[name] = image
    return images


def write_store(root: Path, pairs: list[PreferencePair] | None = None) -> tuple[Path, Path]:
    """(pair store, image root) under `root`, holding `pairs` (default make_pairs())."""
    image_root = root / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    for name, image in make_images().items():
        image.save(image_root / name)
    store = root / "pairs"
    with PairWriter(store, {"stage": "trainer-test"}) as writer:
        for pair in pairs or make_pairs():
            writer.write(pair)
    return store, image_root


def tiny_config(model_folder: Path, out: Path | None, **overrides) -> TrainConfig:
    """A fast CPU config: fp32, LoRA r=4 without dropout, a high lr so weights move visibly."""
    values = dict(
        model=ModelConfig(
            str(model_folder), dtype="float32", device="cpu", attn_implementation="eager"
        ),
        out=str(out) if out is not None else None,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        lr=1e-2,
        epochs=1,
        batch_size=2,
        grad_accum=1,
        warmup_ratio=0.0,
        trackers=[],
    )
    values.update(overrides)
    return TrainConfig(**values)
