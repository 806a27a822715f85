"""Finding and opening images named by data files, safely.

Three rules hold for every stage that opens an image a data file names: the path stays under the
image root (`resolve_image_path`), a path the operating system cannot look up is a bad record, not
a crash, and the decoded size is bounded from the header before any pixel is decoded
(`max_image_pixels`): a 165 KB PNG can declare 12000 x 12000 pixels, 0.4 GiB decoded.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image

# 50 megapixels: an RGB image takes 3 bytes a pixel, and converting it to RGB briefly holds a
# second copy, so a 50 MP image costs up to 300 MB while it loads and a batch of 8 stays under
# 2.5 GB. Every model bpo serves resizes its input to a few megapixels at most, and the largest
# photos datasets hold (8K frames, 33 MP; 48 MP phone sensors) still pass. Pillow's own bomb limit
# (179 MP) is far above what a batch of images can afford.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# One process-wide way to change the limit, read on every load, for every stage that reads images.
MAX_IMAGE_PIXELS_ENV = "BPO_MAX_IMAGE_PIXELS"


class ImageError(ValueError):
    """An image a record names cannot be used; `reason` is the BadRecord reason."""

    reason = "image_error"


class ImagePathError(ImageError):
    """The path is absolute or escapes the image root."""

    reason = "image_outside_root"


class InvalidImagePathError(ImagePathError):
    """The path is no file name the operating system can look up (a NUL byte, a name too long)."""

    reason = "invalid_image_path"


class MissingImageError(ImageError):
    """No file at the resolved path."""

    reason = "missing_image"


class CorruptImageError(ImageError):
    """The file exists but does not decode in full."""

    reason = "corrupt_image"


class ImageTooLargeError(ImageError):
    """The header declares more pixels than `max_image_pixels` allows."""

    reason = "image_too_large"


def max_image_pixels() -> int:
    """The decoded-size limit in pixels: $BPO_MAX_IMAGE_PIXELS if set, else 50 megapixels."""
    value = os.environ.get(MAX_IMAGE_PIXELS_ENV)
    if value is None or not value.strip():
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(
            f"{MAX_IMAGE_PIXELS_ENV}={value!r} must be a positive number of pixels, e.g. "
            f"{DEFAULT_MAX_IMAGE_PIXELS} (the default)"
        )
    return limit


def check_image_size(size: tuple[int, int], label: str, max_pixels: int | None = None) -> None:
    """ImageTooLargeError if an image of `size` (width, height) is above the pixel limit.

    Args:
        max_pixels: the limit; None reads `max_image_pixels()`.
    """
    limit = max_image_pixels() if max_pixels is None else max_pixels
    width, height = size
    if width * height > limit:
        raise ImageTooLargeError(
            f"image {label} is {width} x {height} pixels ({width * height / 1e6:.1f} megapixels), "
            f"above max_image_pixels = {limit} ({limit / 1e6:g} megapixels), so it is not "
            f"decoded; downscale it, drop the record, or raise the limit with the environment "
            f"variable {MAX_IMAGE_PIXELS_ENV}"
        )


def _invalid_path(relative: str, why: str) -> InvalidImagePathError:
    return InvalidImagePathError(
        f"image path {relative!r} {why}; fix the path in the data, or drop the record"
    )


def resolve_image_path(image_root: Path, relative: str) -> Path:
    """The resolved path of `relative` under `image_root`; ImagePathError if it leaves the root.

    Symlinks are followed, so a link inside the root that points outside it is refused too:
    data files must not be able to make us read arbitrary files. A path no file can have (a NUL
    byte) raises InvalidImagePathError, an ImagePathError, instead of the OS's ValueError.
    """
    root = Path(image_root).resolve()
    if "\x00" in relative:
        raise _invalid_path(relative, "contains a NUL byte, which no file name can hold")
    if Path(relative).is_absolute():
        raise ImagePathError(
            f"image '{relative}' is an absolute path; write it relative to --image-root {root}"
        )
    try:
        resolved = (root / relative).resolve()
    except (OSError, ValueError) as exc:
        raise _invalid_path(relative, f"cannot be resolved ({exc})") from exc
    if not resolved.is_relative_to(root):
        raise ImagePathError(
            f"image '{relative}' resolves to {resolved}, outside --image-root {root}; "
            "fix the path in the data, or point --image-root at the real directory "
            "(symlinks are followed)"
        )
    return resolved


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    # is_file() answers False for a missing file but raises for a name too long or a folder it
    # may not read: for a path from the data, that is one bad record, not the end of the run.
    except OSError as exc:
        raise _invalid_path(str(path), f"cannot be looked up ({exc.strerror})") from exc


def _decode(source: Path | io.BytesIO, label: str, max_pixels: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit (89 MP); ours, checked next, is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
        with image:
            # open() only reads the header: the size is known before a pixel is decoded.
            check_image_size(image.size, label, max_pixels)
            # load() decodes every byte so a truncated file fails here, not in a batch.
            image.load()
            return image.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            f"image {label} is above Pillow's decompression-bomb limit ({exc}); downscale it "
            "or drop the record"
        ) from exc
    # PIL raises OSError, SyntaxError, ValueError... for bad data.
    except Exception as exc:
        raise CorruptImageError(
            f"image {label} cannot be decoded ({type(exc).__name__}: {exc}); "
            "re-download or replace the file, or drop the record"
        ) from exc


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Open, fully decode and convert to RGB; an ImageError subclass on failure.

    Args:
        max_pixels: refuse (ImageTooLargeError) an image whose header declares more pixels;
            None reads `max_image_pixels()`.
    """
    path = Path(path)
    if not _is_file(path):
        raise MissingImageError(f"image file {path} not found")
    return _decode(path, f"'{path}'", max_pixels)


def load_image_bytes(
    data: bytes, label: str = "<bytes>", max_pixels: int | None = None
) -> Image.Image:
    """Decode an embedded image (e.g. a `datasets` Image column) to RGB; an ImageError if bad.

    Args:
        label: how to name the image in the error message (its original file name, say).
        max_pixels: as in `load_image`.
    """
    return _decode(io.BytesIO(data), label, max_pixels)


def check_image(
    image_root: Path, relative: str, decode: bool = True, max_pixels: int | None = None
) -> Path:
    """Resolve `relative` under the root and check the file exists and (if `decode`) decodes.

    Raises an ImageError subclass whose message is ready to follow "file line N (id=...): ".
    """
    path = resolve_image_path(image_root, relative)
    if not _is_file(path):
        raise MissingImageError(
            f"image '{relative}' not found under --image-root {Path(image_root).resolve()}; "
            "check --image-root or the path in the data"
        )
    if decode:
        load_image(path, max_pixels)
    return path
