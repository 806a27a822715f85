"""Finding and opening images named by data files, safely."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image


class ImageError(ValueError):
    """An image a record names cannot be used; `reason` is the BadRecord reason."""

    reason = "image_error"


class ImagePathError(ImageError):
    """The path is absolute or escapes the image root."""

    reason = "image_outside_root"


class MissingImageError(ImageError):
    """No file at the resolved path."""

    reason = "missing_image"


class CorruptImageError(ImageError):
    """The file exists but does not decode in full."""

    reason = "corrupt_image"


def resolve_image_path(image_root: Path, relative: str) -> Path:
    """The resolved path of `relative` under `image_root`; ImagePathError if it leaves the root.

    Symlinks are followed, so a link inside the root that points outside it is refused too:
    data files must not be able to make us read arbitrary files.
    """
    root = Path(image_root).resolve()
    if Path(relative).is_absolute():
        raise ImagePathError(
            f"image '{relative}' is an absolute path; write it relative to --image-root {root}"
        )
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root):
        raise ImagePathError(
            f"image '{relative}' resolves to {resolved}, outside --image-root {root}; "
            "fix the path in the data, or point --image-root at the real directory "
            "(symlinks are followed)"
        )
    return resolved


def _decode(source: Path | io.BytesIO, label: str) -> Image.Image:
    try:
        with Image.open(source) as image:
            # open() only reads the header; load() decodes every byte so a truncated file fails
            # here, not in the middle of a batch.
            image.load()
            return image.convert("RGB")
    # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError... for bad data.
    except Exception as exc:
        raise CorruptImageError(
            f"image {label} cannot be decoded ({type(exc).__name__}: {exc}); "
            "re-download or replace the file, or drop the record"
        ) from exc


def load_image(path: str | Path) -> Image.Image:
    """Open, fully decode and convert to RGB; MissingImageError or CorruptImageError on failure."""
    path = Path(path)
    if not path.is_file():
        raise MissingImageError(f"image file {path} not found")
    return _decode(path, f"'{path}'")


def load_image_bytes(data: bytes, label: str = "<bytes>") -> Image.Image:
    """Decode an embedded image (e.g. a `datasets` Image column) to RGB; CorruptImageError if bad.

    Args:
        label: how to name the image in the error message (its original file name, say).
    """
    return _decode(io.BytesIO(data), label)


def check_image(image_root: Path, relative: str, decode: bool = True) -> Path:
    """Resolve `relative` under the root and check the file exists and (if `decode`) decodes.

    Raises an ImageError subclass whose message is ready to follow "file line N (id=...): ".
    """
    path = resolve_image_path(image_root, relative)
    if not path.is_file():
        raise MissingImageError(
            f"image '{relative}' not found under --image-root {Path(image_root).resolve()}; "
            "check --image-root or the path in the data"
        )
    if decode:
        load_image(path)
    return path
