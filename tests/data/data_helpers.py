"""Small images and files for the data-layer tests (a plain module: `from conftest import`
is ambiguous once several test folders have a conftest.py)."""

import io
import json
from pathlib import Path

from PIL import Image


def png_bytes(color=(255, 0, 0), size=(8, 8), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def noisy_png_bytes(size=(32, 32)) -> bytes:
    """A PNG whose pixel data is long enough that cutting it leaves a readable header."""
    image = Image.frombytes(
        "RGB", size, bytes((i * 37 + i // 7) % 256 for i in range(size[0] * size[1] * 3))
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(path: Path, lines: list) -> Path:
    """Write objects as JSON lines; str items are written verbatim (for malformed lines)."""
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path
