"""Grid descriptions: the scene cell by cell, in the corpus the LM reads scenes from."""

from __future__ import annotations

import numpy as np

from bpo.models.tiny import train_bpe_tokenizer
from bpo.shapeworld.world import (
    EMPTY_CELL,
    UNKNOWN_CELL,
    Scene,
    ShapeObject,
    WorldConfig,
    cell_word,
    grid_description,
    grid_vocabulary,
)

SCENE = Scene(
    (ShapeObject("circle", "red", 0, 1), ShapeObject("ring", "white", 1, 0)), grid=2, seed=0
)


def test_grid_description_lists_cells_in_row_major_order():
    """2x2 grid, red circle at (0, 1), white ring at (1, 0): cells 0..3 are
    empty, red circle, white ring, empty."""
    text = grid_description(SCENE, np.random.default_rng(0), unknown_prob=0.0)
    assert text == "[empty][red circle][white ring][empty]"


def test_unknown_cells_hide_exactly_the_objects():
    """unknown_prob = 1 hides every object and no empty cell."""
    text = grid_description(SCENE, np.random.default_rng(0), unknown_prob=1.0)
    assert text == "[empty][?][?][empty]"


def test_grid_words_are_single_tokens_of_the_tiny_tokenizer():
    """Each cell word is one token, so 16 cells line up with 16 image tokens."""
    cfg = WorldConfig(shapes=("circle", "ring"), colours=("red", "white"))
    vocabulary = grid_vocabulary(cfg)
    assert vocabulary == [
        EMPTY_CELL,
        UNKNOWN_CELL,
        "[red circle]",
        "[white circle]",
        "[red ring]",
        "[white ring]",
    ]
    tokenizer = train_bpe_tokenizer(
        ["a red circle and a white ring."] * 20, vocab_size=300, extra_tokens=vocabulary
    )
    text = cell_word("red", "circle") + EMPTY_CELL + UNKNOWN_CELL + cell_word("white", "ring")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 4
    assert tokenizer.decode(ids) == text
