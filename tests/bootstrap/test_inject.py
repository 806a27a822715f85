"""Error-injected negatives: validation and the lexical injector (the rewriters that use a
language model: test_rewriters.py)."""

from __future__ import annotations

import pytest

from bpo.bootstrap.config import EDIT_TYPES, InjectConfig
from bpo.bootstrap.inject.lexical import InjectionVocabulary, inject_errors
from bpo.bootstrap.inject.rewriters import LexicalRewriter, inject_seed
from bpo.bootstrap.inject.validate import (
    InjectionStats,
    normalize,
    strip_preamble,
    validate_rewrite,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOLD = "A brown dog sleeps on a grey sofa."  # 7 words


# --- Validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("Sure! Here is the rewritten description: A cat.", "A cat."),
        ("Rewritten answer: A cat.", "A cat."),
        ('"A cat on a mat."', "A cat on a mat."),
        ("Answer: 'A cat.'", "A cat."),
        ("Certainly. Here's the modified caption:\n\u201cA cat.\u201d", "A cat."),
        ("Assistant: A cat.", "A cat."),
        ("A sure thing: a cat.", "A sure thing: a cat."),  # only leading preambles go
        ("Here is a dog: it sleeps.", "Here is a dog: it sleeps."),  # an answer, not a preamble
    ],
)
def test_preambles_and_quotes_are_stripped(raw, cleaned):
    assert strip_preamble(raw) == cleaned


def test_validation_by_hand():
    # identical after lower-casing, punctuation and whitespace are dropped
    assert normalize("A  brown DOG, sleeps on a grey sofa!") == "a brown dog sleeps on a grey sofa"
    assert validate_rewrite(GOLD, "a brown dog sleeps on a GREY sofa") == (None, "identical")
    assert validate_rewrite(GOLD, "Sure! Here is the rewritten description: " + GOLD) == (
        None,
        "identical",
    )
    assert validate_rewrite(GOLD, "") == (None, "empty")
    assert validate_rewrite(GOLD, None) == (None, "empty")
    assert validate_rewrite(GOLD, 'Rewritten answer: "..."') == (None, "empty")
    # 3 words / 7 = 0.43 < 0.5; 4 / 7 = 0.57 passes
    assert validate_rewrite(GOLD, "A brown cat.") == (None, "too_short")
    assert validate_rewrite(GOLD, "A brown cat sleeps.") == ("A brown cat sleeps.", None)
    # 15 words / 7 = 2.14 > 2.0; 14 / 7 = 2.0 passes
    long = "A brown dog sleeps on a grey sofa while a black cat watches it from the"
    assert validate_rewrite(GOLD, long + " window.") == (None, "too_long")
    assert validate_rewrite(GOLD, long) == (long, None)
    assert validate_rewrite(GOLD, "A cat.", min_ratio=0.2) == ("A cat.", None)


def test_stats_count_accepted_and_each_reason():
    stats = InjectionStats()
    for raw in ["", "A brown dog sleeps on a grey sofa", "A cat.", "A cat sleeps on a sofa."]:
        stats.record(validate_rewrite(GOLD, raw)[1])
    stats.record(validate_rewrite(GOLD, " ".join(["dog"] * 20))[1])
    assert stats.as_dict() == {
        "accepted": 1,
        "rejected": {"empty": 1, "identical": 1, "too_long": 1, "too_short": 1},
    }


# --- Lexical injector -------------------------------------------------------------------------

SHAPE_CAPTION = "a red circle, a purple cross and a blue ring."
COCO_TEXT = "Two dogs sit on the left of a red sofa, next to a cat and an apple."


@pytest.fixture(scope="module")
def shapes() -> InjectionVocabulary:
    return InjectionVocabulary.shapeworld()


@pytest.fixture(scope="module")
def coco() -> InjectionVocabulary:
    return InjectionVocabulary.coco()


def test_shapeworld_edits_exact(shapes):
    def one(kind: str, seed: int = 1):
        injection = inject_errors(SHAPE_CAPTION, shapes, seed=seed, edit_types=[kind])
        return injection.text, injection.edits

    # every rewrite is a caption in the world's format: shape order, "a, b and c."
    assert one("swap_object") == (
        "a purple cross, a blue ring and a red frame.",
        [{"type": "swap_object", "from": "circle", "to": "frame"}],
    )
    assert one("insert_object") == (
        "a red circle, a purple cross, a red square and a blue ring.",
        [{"type": "insert_object", "object": "square", "colour": "red"}],
    )
    assert one("delete_object") == (
        "a purple cross and a blue ring.",
        [{"type": "delete_object", "object": "circle"}],
    )
    assert one("change_colour") == (
        "a white circle, a purple cross and a blue ring.",
        [{"type": "change_colour", "from": "red", "to": "white", "object": "circle"}],
    )
    # a caption states no count or position: reported, not dropped
    stats = InjectionStats()
    result = inject_errors(SHAPE_CAPTION, shapes, edit_types=["change_count"], stats=stats)
    assert (result.text, result.reason) == (None, "no_edit")
    assert stats.as_dict() == {"accepted": 0, "rejected": {"no_edit": 1}}
    # answers that are not captions get the generic edits
    counted = inject_errors("There are three shapes.", shapes, seed=0)
    assert (counted.text, counted.edits) == (
        "There are nine shapes.",
        [{"type": "change_count", "from": "three", "to": "nine"}],
    )


def test_shapeworld_insertion_follows_partners(shapes):
    # the only present shape is the circle; its partner (the cross) is the only one with weight
    for seed in range(10):
        injection = inject_errors(
            "a red circle.", shapes, seed=seed, edit_types=["insert_object"], max_ratio=3.0
        )
        assert injection.edits[0]["object"] == "cross"
        assert injection.text == f"a red circle and a {injection.edits[0]['colour']} cross."


def test_coco_edits_exact(coco):
    def one(kind: str, seed: int = 0) -> tuple[str | None, list]:
        injection = inject_errors(COCO_TEXT, coco, seed=seed, edit_types=[kind])
        return injection.text, injection.edits

    start = "Two dogs sit on the left of a red sofa, next to a cat"
    assert one("swap_object") == (
        start + " and a chair.",  # "an apple" -> "a chair": the article follows
        [{"type": "swap_object", "from": "apple", "to": "chair"}],
    )
    assert one("swap_object", seed=2) == (
        "Two stop signs" + COCO_TEXT[8:],  # plural kept
        [{"type": "swap_object", "from": "dog", "to": "stop sign"}],
    )
    assert one("insert_object", seed=1) == (
        "Two dogs and a cow" + COCO_TEXT[8:],
        [{"type": "insert_object", "object": "cow", "after": "dog"}],
    )
    assert one("delete_object") == (
        start + ".",
        [{"type": "delete_object", "object": "apple"}],
    )
    assert one("delete_object", seed=1) == (
        "Two dogs sit on the left of a red sofa, next to an apple.",
        [{"type": "delete_object", "object": "cat"}],
    )
    assert one("change_colour") == (
        COCO_TEXT.replace("red", "brown"),
        [{"type": "change_colour", "from": "red", "to": "brown"}],
    )
    assert one("change_count") == (
        "Nine" + COCO_TEXT[3:],  # capital kept
        [{"type": "change_count", "from": "two", "to": "nine"}],
    )
    assert one("change_position") == (
        COCO_TEXT.replace("left", "right"),
        [{"type": "change_position", "from": "left", "to": "right"}],
    )


def test_coco_list_deletion_stays_grammatical(coco):
    texts = {
        inject_errors(
            "A man, a dog and a traffic light.", coco, seed=s, edit_types=["delete_object"]
        ).text
        for s in range(8)
    }
    assert texts == {
        "A man and a traffic light.",
        "A dog and a traffic light.",
        "A man and a dog.",  # the list's comma became its "and"
    }
    # the last of three: "a, b and C" -> "a and b"
    text = "I see a cat, a dog and a bird on the grass here."
    results = {
        inject_errors(text, coco, seed=s, edit_types=["delete_object"]).text for s in range(12)
    }
    assert "I see a cat and a dog on the grass here." in results
    assert results <= {
        "I see a cat and a dog on the grass here.",
        "I see a cat and a bird on the grass here.",
        "I see a dog and a bird on the grass here.",
    }


def test_cooccurrence_makes_an_insertion_certain(coco):
    prior = {"dog": {"frisbee": 5.0}, "person": {"frisbee": 1.0, "kite": 2.0}}
    vocabulary = InjectionVocabulary.coco(cooccurrence=prior)
    for seed in range(10):
        got = inject_errors("A dog runs.", vocabulary, seed=seed, edit_types=["insert_object"])
        assert got.text == "A dog and a frisbee runs."
    # with a man and a dog present, kite (2) and frisbee (5 + 1) are the only candidates
    drawn = {
        inject_errors("A man and a dog.", vocabulary, seed=s, edit_types=["insert_object"]).edits[
            0
        ]["object"]
        for s in range(30)
    }
    assert drawn == {"frisbee", "kite"}


def test_injection_is_deterministic_and_always_accounted(coco, shapes):
    golds = [COCO_TEXT, "A man, a dog and a traffic light.", "A cat.", "Nothing to see here."]
    stats = InjectionStats()
    first = [inject_errors(g, coco, seed=7, num_edits=2, stats=stats) for g in golds]
    again = [inject_errors(g, coco, seed=7, num_edits=2) for g in golds]
    assert [(i.text, i.edits) for i in first] == [(i.text, i.edits) for i in again]
    # every output is either valid or rejected with its reason
    for injection in first:
        if injection.text is None:
            assert injection.reason is not None
        else:
            assert validate_rewrite(injection.gold, injection.text) == (injection.text, None)
    assert first[3].reason == "no_edit"
    assert len(first[0].edits) == 2
    assert stats.accepted + sum(stats.rejected.values()) == len(golds)
    with pytest.raises(ValueError, match="unknown edit types"):
        inject_errors(COCO_TEXT, coco, edit_types=["recolour"])
    assert set(EDIT_TYPES) == {
        "swap_object",
        "insert_object",
        "delete_object",
        "change_colour",
        "change_count",
        "change_position",
        "flip_answer",
    }


@pytest.mark.parametrize(
    ("gold", "flipped", "was", "now"),
    [
        ("Yes.", "No.", "yes", "no"),
        ("No.", "Yes.", "no", "yes"),
        ("yes", "no", "yes", "no"),
        ("NO, it is not.", "YES, it is not.", "no", "yes"),
        ("ring yes.", "ring no.", "yes", "no"),
        ("circle no.", "circle yes.", "no", "yes"),
    ],
)
def test_a_yes_no_answer_is_flipped(shapes, gold, flipped, was, now):
    """A yes/no answer has one error to make: the opposite answer, case and the rest kept."""
    injection = inject_errors(gold, shapes, seed=3)
    assert injection.text == flipped
    assert injection.edits == [{"type": "flip_answer", "from": was, "to": now}]


def test_the_flip_leaves_other_texts_to_the_other_edits(shapes):
    """Only a yes/no first or last word flips ("There is no dog." does not), and a caption's rewrite is
    the one it had before the flip existed: the same shuffle of the other edit types."""
    caption_text = "a red circle and a blue ring."
    others = [kind for kind in EDIT_TYPES if kind != "flip_answer"]
    for seed in range(5):
        assert inject_errors(caption_text, shapes, seed=seed) == inject_errors(
            caption_text, shapes, seed=seed, edit_types=others
        )
    assert inject_errors("There is no dog.", shapes, seed=0, edit_types=["flip_answer"]).reason == (
        "no_edit"
    )


def test_lexical_rewriter_keys_each_rewrite_by_its_index(shapes):
    """Request i is `inject_errors` seeded by inject_seed(seed, i), with the config's edits."""
    config = InjectConfig(
        kind="lexical", vocabulary="shapeworld", seed=4, edit_types=["delete_object"]
    )
    rewriter = LexicalRewriter(config)
    got = rewriter.rewrite_all([SHAPE_CAPTION] * 3, [None] * 3, [0, 1, 9])
    expected = [
        inject_errors(SHAPE_CAPTION, shapes, seed=inject_seed(4, i), edit_types=["delete_object"])
        for i in (0, 1, 9)
    ]
    assert [(r.text, r.edits) for r in got] == [(r.text, r.edits) for r in expected]
    assert {e["type"] for r in got for e in r.edits} == {"delete_object"}
    assert rewriter.generator == "lexical:shapeworld"
