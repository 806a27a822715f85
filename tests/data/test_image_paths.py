import os

import pytest
from data_helpers import noisy_png_bytes, png_bytes

from bpo.data import (
    CorruptImageError,
    ImagePathError,
    MissingImageError,
    load_image,
    load_image_bytes,
    resolve_image_path,
)


def test_resolve_keeps_paths_inside_the_root(image_root):
    assert resolve_image_path(image_root, "sub/b.png") == (image_root / "sub" / "b.png").resolve()
    # `..` that stays inside the root is harmless.
    assert resolve_image_path(image_root, "sub/../a.png") == (image_root / "a.png").resolve()


def test_symlink_to_a_file_inside_the_root_is_allowed(image_root):
    os.symlink(image_root / "a.png", image_root / "sub" / "alias.png")

    assert resolve_image_path(image_root, "sub/alias.png") == (image_root / "a.png").resolve()


@pytest.mark.parametrize("relative", ["../secret.png", "sub/../../secret.png", "link.png"])
def test_paths_leaving_the_root_are_refused(image_root, tmp_path, relative):
    os.symlink(tmp_path / "secret.png", image_root / "link.png")

    with pytest.raises(ImagePathError, match="outside --image-root") as info:
        resolve_image_path(image_root, relative)

    assert info.value.reason == "image_outside_root"


def test_absolute_paths_are_refused_even_inside_the_root(image_root):
    with pytest.raises(ImagePathError, match="is an absolute path"):
        resolve_image_path(image_root, str(image_root / "a.png"))


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "grey.png"
    path.write_bytes(png_bytes(color=128, mode="L"))

    image = load_image(path)

    assert (image.mode, image.size, image.getpixel((3, 3))) == ("RGB", (8, 8), (128, 128, 128))


def test_load_image_errors_carry_reason_and_path(tmp_path):
    truncated = noisy_png_bytes()
    (tmp_path / "cut.png").write_bytes(truncated[: len(truncated) // 2])

    with pytest.raises(MissingImageError, match=r"nope\.png not found") as missing:
        load_image(tmp_path / "nope.png")
    with pytest.raises(
        CorruptImageError, match=r"cut\.png' cannot be decoded \(OSError: image file is truncated"
    ) as corrupt:
        load_image(tmp_path / "cut.png")

    assert (missing.value.reason, corrupt.value.reason) == ("missing_image", "corrupt_image")


def test_load_image_bytes_names_the_label_on_failure():
    assert load_image_bytes(png_bytes((1, 2, 3))).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(CorruptImageError, match=r"image 'x\.jpg' cannot be decoded"):
        load_image_bytes(b"junk", "'x.jpg'")
