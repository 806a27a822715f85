"""Captions, questions and mention extraction: the text side of ShapeWorld's exact ground truth."""

import re

import numpy as np
import pytest

from bpo.shapeworld.world import (
    SHAPES,
    Scene,
    ShapeObject,
    WorldConfig,
    caption,
    mentioned_shapes,
    questions,
    sample_scene,
)

RED_CIRCLE = ShapeObject("circle", "red", 0, 0)
BLUE_SQUARE = ShapeObject("square", "blue", 1, 2)
GREEN_CROSS = ShapeObject("cross", "green", 3, 3)
# Written out by hand so a wrong NUMBER_WORDS table fails here.
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def small_config(**overrides) -> WorldConfig:
    """Explicit numbers, so a retuned WorldConfig default does not move these tests."""
    values = dict(grid=4, cell_size=8, min_objects=1, max_objects=4, faint_prob=0.3)
    return WorldConfig(**{**values, **overrides})


@pytest.mark.parametrize(
    ("objects", "expected"),
    [
        ((), "nothing."),
        ((BLUE_SQUARE,), "a blue square."),
        ((RED_CIRCLE, BLUE_SQUARE), "a red circle and a blue square."),
        ((RED_CIRCLE, BLUE_SQUARE, GREEN_CROSS), "a red circle, a blue square and a green cross."),
    ],
)
def test_caption_exact_strings(objects, expected):
    """Oxford-comma-free list: 'a A, a B and a C.'; one object has no 'and'; none is 'nothing.'"""
    assert caption(Scene(objects)) == expected


def test_caption_keeps_the_order_the_scene_gives():
    """`caption` does not sort: Scene.objects are in caption order by contract (the samplers
    order them with `_ordered`), so a hand-built scene out of order is captioned as given."""
    assert caption(Scene((GREEN_CROSS, RED_CIRCLE))) == "a green cross and a red circle."


def test_sampled_captions_mention_every_shape_once_in_shape_order():
    """Over 500 sampled scenes the caption names exactly the scene's shapes, each once, in the
    order of cfg.shapes (not sampling order), and the extractor finds exactly those."""
    cfg = small_config()
    rng = np.random.default_rng(1234)
    sizes = set()
    for _ in range(500):
        scene = sample_scene(rng, cfg)
        sizes.add(len(scene.objects))
        expected = sorted(scene.shapes, key=cfg.shapes.index)
        assert mentioned_shapes(caption(scene), cfg.shapes) == expected
        assert len(expected) == len(scene.objects)
    assert sizes == {1, 2, 3, 4}  # every object count was exercised


def test_mentioned_shapes_plurals_punctuation_and_case():
    """Commas, full stops and question marks split words; 's' plurals map to the shape; case is
    ignored; repeats are kept in order; non-shape words ('shapes', 'bring') are not mentions."""
    text = "Two Circles, a square. Is there a ring? Bring shapes, rings."
    assert mentioned_shapes(text) == ["circle", "square", "ring", "ring"]


def test_mentioned_shapes_uses_the_given_vocabulary():
    """A word outside `shapes` is not a mention, even if it is in the default SHAPES."""
    assert mentioned_shapes("a red circle and a blue star.", ("star",)) == ["star"]


def test_mentioned_shapes_plural_of_cross():
    """English plural of 'cross' is 'crosses'; CHAIR should count it as a 'cross' mention."""
    assert mentioned_shapes("two crosses.", SHAPES) == ["cross"]


def test_questions_exact_for_a_scene_with_one_present_and_one_absent_shape():
    """With shapes (circle, square) and a scene holding only a red circle, every random choice
    has one option: shown = circle, missing = square. So the list is fixed whatever the rng."""
    cfg = small_config(shapes=("circle", "square"))
    scene = Scene((RED_CIRCLE,))
    assert questions(scene, np.random.default_rng(5), cfg) == [
        ("Is there a circle in the image?", "circle yes."),
        ("What color is the circle?", "The circle is red."),
        ("Is there a square in the image?", "square no."),
        ("How many shapes are in the image?", "There is one shape."),
    ]


def test_questions_for_an_empty_scene_and_a_full_scene():
    """Empty scene: no yes/colour question, one 'no.' about either shape, count 'zero'.
    Both shapes present: no 'no.' question; the shown shape's colour is its object's."""
    cfg = small_config(shapes=("circle", "square"))
    empty = questions(Scene(()), np.random.default_rng(0), cfg)
    assert empty[0] in [
        ("Is there a circle in the image?", "circle no."),
        ("Is there a square in the image?", "square no."),
    ]
    assert empty[1:] == [("How many shapes are in the image?", "There are zero shapes.")]
    full = questions(Scene((RED_CIRCLE, BLUE_SQUARE)), np.random.default_rng(0), cfg)
    assert full in (
        [
            ("Is there a circle in the image?", "circle yes."),
            ("What color is the circle?", "The circle is red."),
            ("How many shapes are in the image?", "There are two shapes."),
        ],
        [
            ("Is there a square in the image?", "square yes."),
            ("What color is the square?", "The square is blue."),
            ("How many shapes are in the image?", "There are two shapes."),
        ],
    )


EXISTS = re.compile(r"Is there a (\w+) in the image\?")
COLOUR = re.compile(r"What color is the (\w+)\?")


def test_sampled_question_answers_are_true_of_their_scenes():
    """For 500 sampled scenes: 'Is there a X' is 'X yes.' iff X is in the scene; the colour answer
    names that object's colour; the count answer names len(objects). One yes (scene never empty
    here), one no (at most 4 of 6 shapes present), one colour and one count question each."""
    cfg = small_config()
    rng = np.random.default_rng(99)
    for _ in range(500):
        scene = sample_scene(rng, cfg)
        colour_of = {o.shape: o.colour for o in scene.objects}
        qa = questions(scene, rng, cfg)
        answers = {"yes.": 0, "no.": 0}
        for question, answer in qa:
            if match := EXISTS.fullmatch(question):
                shape = match.group(1)
                word = "yes." if shape in scene.shapes else "no."
                assert answer == f"{shape} {word}"
                answers[word] += 1
            elif match := COLOUR.fullmatch(question):
                shape = match.group(1)
                assert answer == f"The {shape} is {colour_of[shape]}."
            else:
                n = len(scene.objects)
                assert question == "How many shapes are in the image?"
                expected = "one shape." if n == 1 else f"{COUNT_WORDS[n]} shapes."
                assert answer == ("There is " if n == 1 else "There are ") + expected
        assert answers == {"yes.": 1, "no.": 1}
        assert len(qa) == 4
