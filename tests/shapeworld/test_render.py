"""Rendering scenes to pixels, and the per-cell labels the tiny vision tower is checked against."""

import numpy as np

from bpo.shapeworld.world import Scene, ShapeObject, WorldConfig, cell_labels, render

# Byte values worked by hand with the renderer's rounding, floor(v * 255 + 0.5):
# BACKGROUND 0.30 -> 76.5 -> 77; red (0.92, 0.16, 0.14) -> (234.6, 40.8, 35.7) -> (235, 41, 36).
BACKGROUND_BYTE = 77
RED_BYTES = (235, 41, 36)
# A circle in an 8-pixel cell: centre 3.5, radius 0.42 * 8 = 3.36 (r^2 = 11.29). Offsets are
# +-0.5, 1.5, 2.5, 3.5; 3.5^2 = 12.25 is out, and 2.5^2 + 2.5^2 = 12.5 is out, so:
CIRCLE_8 = """
........
..####..
.######.
.######.
.######.
.######.
..####..
........
"""


def mask_from(art: str) -> np.ndarray:
    return np.array([[ch == "#" for ch in row] for row in art.split()])


def config(**overrides) -> WorldConfig:
    values = dict(grid=3, cell_size=8, pixel_noise=0.0)
    return WorldConfig(**{**values, **overrides})


def test_image_shape_and_dtype_follow_the_config():
    """grid 3, cells of 5 pixels: a 15 x 15 RGB uint8 image."""
    image = render(Scene((), grid=3), config(cell_size=5, pixel_noise=0.1))
    assert image.shape == (15, 15, 3)
    assert image.dtype == np.uint8


def test_empty_scene_without_noise_is_background_everywhere():
    image = render(Scene((), grid=3), config())
    assert (image == BACKGROUND_BYTE).all()


def test_solid_red_circle_paints_exactly_its_mask_in_its_cell():
    """Red circle, alpha 1, at row 1, col 2 of a 3x3 grid of 8-pixel cells: pixels rows 8..15,
    cols 16..23. Inside the hand-drawn circle mask: exactly RED_BYTES (32 pixels); everywhere
    else, in the cell and outside it: the background."""
    scene = Scene((ShapeObject("circle", "red", row=1, col=2, alpha=1.0),), grid=3)
    image = render(scene, config())
    expected = np.full((24, 24, 3), BACKGROUND_BYTE, np.uint8)
    mask = mask_from(CIRCLE_8)
    assert mask.sum() == 32
    expected[8:16, 16:24][mask] = RED_BYTES
    np.testing.assert_array_equal(image, expected)


def test_faint_object_blends_with_the_background():
    """Green (0.18, 0.80, 0.22) at alpha 0.5 over 0.30: (0.24, 0.55, 0.26) -> bytes
    (61.2, 140.25, 66.3) -> (61, 140, 66) on the mask; background elsewhere."""
    scene = Scene((ShapeObject("circle", "green", row=0, col=0, alpha=0.5),), grid=3)
    image = render(scene, config())
    mask = mask_from(CIRCLE_8)
    assert (image[:8, :8][mask] == (61, 140, 66)).all()
    assert (image[:8, :8][~mask] == BACKGROUND_BYTE).all()
    assert (image[8:, :] == BACKGROUND_BYTE).all() and (image[:, 8:] == BACKGROUND_BYTE).all()


def test_render_is_deterministic_and_the_noise_is_seeded_by_the_scene():
    """Same scene -> same pixels (noise included); another scene seed -> other noise."""
    cfg = config(pixel_noise=0.12)
    objects = (ShapeObject("square", "blue", 0, 1, 0.9), ShapeObject("ring", "white", 2, 2, 0.3))
    scene = Scene(objects, grid=3, seed=42)
    np.testing.assert_array_equal(render(scene, cfg), render(scene, cfg))
    assert not np.array_equal(render(scene, cfg), render(Scene(objects, 3, seed=43), cfg))
    assert not np.array_equal(render(scene, cfg), render(scene, config()))


def test_cell_labels_for_a_hand_built_scene():
    """3x3 grid, shapes (circle, square, ring), colours (red, blue). Red circle at (0, 0) ->
    cell 0, labels (1, 1); blue ring at (2, 1) -> cell 2*3 + 1 = 7, labels (3, 2); red square at
    (1, 2) -> cell 5, labels (2, 1). Other cells 0 (empty)."""
    cfg = config(shapes=("circle", "square", "ring"), colours=("red", "blue"))
    scene = Scene(
        (
            ShapeObject("circle", "red", 0, 0),
            ShapeObject("square", "red", 1, 2),
            ShapeObject("ring", "blue", 2, 1),
        ),
        grid=3,
    )
    shape, colour = cell_labels(scene, cfg)
    assert shape.tolist() == [1, 0, 0, 0, 0, 2, 0, 3, 0]
    assert colour.tolist() == [1, 0, 0, 0, 0, 1, 0, 2, 0]
