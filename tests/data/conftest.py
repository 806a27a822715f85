"""Fixtures for the data-layer tests."""

from pathlib import Path

import pytest
from data_helpers import png_bytes


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """An image root with a.png (red), sub/b.png (green), and a secret.png outside it."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(png_bytes((255, 0, 0)))
    (root / "sub" / "b.png").write_bytes(png_bytes((0, 255, 0)))
    (tmp_path / "secret.png").write_bytes(png_bytes((0, 0, 255)))
    return root
