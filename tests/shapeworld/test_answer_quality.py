"""Answer quality on cases worked by hand: the caption grammar, repeats, lengths, the aggregates."""

import numpy as np
import pytest

from bpo.shapeworld.metrics import answer_quality, answer_quality_scores, is_well_formed
from bpo.shapeworld.world import Scene, ShapeObject, WorldConfig, caption, sample_scene


def scene(*objects: tuple[str, str]) -> Scene:
    """A scene of (colour, shape) objects, one per cell of the first row."""
    return Scene(tuple(ShapeObject(s, c, 0, k) for k, (c, s) in enumerate(objects)))


@pytest.mark.parametrize(
    "answer",
    [
        "a red circle.",
        "a red circle and a blue square.",
        "a red circle, a purple cross and a blue ring.",
        "a red circle, a purple cross, a white ring and a green frame.",
        "nothing.",
        "  a green bar.\n",  # whitespace at the ends is ignored
        "a blue square and a red circle.",  # out of the world's order: grammar only
        "a purple square, a purple square and a purple diamond.",  # a repeat: grammar only
    ],
)
def test_well_formed_captions(answer):
    assert is_well_formed(answer)


@pytest.mark.parametrize(
    "answer",
    [
        "a blue circle and a red",  # cut mid-phrase
        "a red circle a blue square.",  # no joining word
        "a red circle and a blue square",  # no final period
        "a red hexagon.",  # unknown shape
        "a orange circle.",  # unknown colour
        "a red circle, a blue square.",  # ', ' before the last phrase instead of ' and '
        "a red circle and a blue square and a green bar.",  # ' and ' where ', ' belongs
        "a red circle, a blue square, and a green bar.",  # serial comma
        "a red circle. a blue square.",  # two sentences
        "a red circle and a blue square. yes",  # words after the period
        "a red  circle.",  # two spaces inside
        "A red circle.",  # the world writes lower case
        "red circle.",  # no article
        "two circles.",
        "nothing",
        "",
    ],
)
def test_ill_formed_captions(answer):
    assert not is_well_formed(answer)


def test_every_gold_caption_is_well_formed():
    """The world's own captions, of 200 sampled scenes (0 to 4 objects), all parse."""
    rng = np.random.default_rng(0)
    cfg = WorldConfig(min_objects=0, max_objects=4)
    captions = [caption(sample_scene(rng, cfg)) for _ in range(200)]
    assert "nothing." in captions and all(is_well_formed(c) for c in captions)


def test_the_grammar_follows_the_given_shapes_and_colours():
    """With shapes (star, pale moon) and colours (black, sky blue), 'a red circle.' is foreign,
    and names of two words parse whole."""
    shapes, colours = ("star", "pale moon"), ("black", "sky blue")
    assert is_well_formed("a black star and a sky blue pale moon.", shapes, colours)
    assert not is_well_formed("a red circle.", shapes, colours)
    assert not is_well_formed("a sky star.", shapes, colours)


def test_answer_quality_of_a_repeating_caption():
    """'a purple square, a purple square and a purple diamond.' mentions square, square,
    diamond: 1 beyond the first of each shape; its words: a purple square, a purple square and a
    purple diamond. = 10. The gold caption 'a purple square and a purple diamond.' has 7."""
    truth = scene(("purple", "square"), ("purple", "diamond"))
    answer = "a purple square, a purple square and a purple diamond."
    assert answer_quality(answer, truth) == {
        "well_formed": True,
        "repeated": 1,
        "words": 10,
        "gold_words": 7,
    }


# Five answers and their scenes, worked by hand (gold caption in brackets, its words after it):
# 1. "a blue circle and a red" [a red circle and a blue square., 7]: cut short, ill-formed;
#    mentions circle; 0 repeated; 6 words (a, blue, circle, and, a, red).
# 2. "a purple square, a purple square and a purple diamond." [a purple square and a purple
#    diamond., 7]: well-formed; mentions square, square, diamond; 1 repeated; 10 words.
# 3. "a green triangle." [a green triangle., 3]: well-formed; mentions triangle; 0; 3 words.
# 4. "a ring, a ring and two rings." [nothing., 1]: ill-formed ('two rings' is no phrase of the
#    grammar); mentions ring three times (the plural included); 2 repeated; 7 words.
# 5. "nothing." [nothing., 1]: well-formed; no mentions; 0; 1 word.
SCENES = [
    scene(("red", "circle"), ("blue", "square")),
    scene(("purple", "square"), ("purple", "diamond")),
    scene(("green", "triangle")),
    scene(),
    scene(),
]
ANSWERS = [
    "a blue circle and a red",
    "a purple square, a purple square and a purple diamond.",
    "a green triangle.",
    "a ring, a ring and two rings.",
    "nothing.",
]


def test_answer_quality_per_answer_by_hand():
    """The five answers above, one by one."""
    assert [answer_quality(a, s) for a, s in zip(ANSWERS, SCENES, strict=True)] == [
        {"well_formed": False, "repeated": 0, "words": 6, "gold_words": 7},
        {"well_formed": True, "repeated": 1, "words": 10, "gold_words": 7},
        {"well_formed": True, "repeated": 0, "words": 3, "gold_words": 3},
        {"well_formed": False, "repeated": 2, "words": 7, "gold_words": 1},
        {"well_formed": True, "repeated": 0, "words": 1, "gold_words": 1},
    ]


def test_answer_quality_scores_by_hand():
    """well_formed = 3 of 5 answers (2, 3, 5) = 0.6; repetition = 2 of 5 (2 and 4) = 0.4;
    repeated_mentions = (0 + 1 + 0 + 2 + 0) / (1 + 3 + 1 + 3 + 0) = 3/8;
    length_ratio = (6 + 10 + 3 + 7 + 1) / (7 + 7 + 3 + 1 + 1) = 27/19."""
    assert answer_quality_scores(ANSWERS, SCENES) == {
        "well_formed": pytest.approx(0.6),
        "repetition": pytest.approx(0.4),
        "repeated_mentions": pytest.approx(3 / 8),
        "length_ratio": pytest.approx(27 / 19),
    }


def test_answer_quality_scores_of_no_answers_are_zero():
    assert answer_quality_scores([], []) == {
        "well_formed": 0.0,
        "repetition": 0.0,
        "repeated_mentions": 0.0,
        "length_ratio": 0.0,
    }


def test_answer_quality_scores_without_mentions_count_no_repeats():
    """'nothing.' for a scene of one red circle: well-formed (1/1), no mentions, so
    repeated_mentions is 0 by definition; length 1 word / 3 ('a red circle.')."""
    scores = answer_quality_scores(["nothing."], [scene(("red", "circle"))])
    assert scores == {
        "well_formed": 1.0,
        "repetition": 0.0,
        "repeated_mentions": 0.0,
        "length_ratio": pytest.approx(1 / 3),
    }


def test_answer_quality_scores_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        answer_quality_scores(["nothing."], [])
