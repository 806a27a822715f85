"""CHAIR's words as the references read them: NLTK tokenization, plural-only singularizing, and
RLHF-V's mapping of a judge's object names. Every expected value is worked by hand below."""

from __future__ import annotations

import json

import pytest

from bpo.data.vocab import (
    coco_vocabulary,
    extract_objects,
    objects_to_categories,
    plural_lemma,
    word_tokens,
)
from bpo.evaluate.chair import coco_ground_truth


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        # Compounds stay whole; the clitic splits off only at a word's end; the final period
        # stands alone.
        (
            "a bird's-eye view of a man-made lake.",
            ["a", "bird's-eye", "view", "of", "a", "man-made", "lake", "."],
        ),
        # Commas split off, but not inside numbers; a sentence-final period mid-text does too,
        # an abbreviation's does not; slashes stay inside a word.
        (
            "3,000 dogs, e.g. here. a cat/dog",
            ["3,000", "dogs", ",", "e.g.", "here", ".", "a", "cat/dog"],
        ),
        # Brackets, semicolons, "?" and a plural possessive's apostrophe stand alone.
        ("(two) dogs' toys; why?", ["(", "two", ")", "dogs", "'", "toys", ";", "why", "?"]),
    ],
)
def test_words_split_as_nltk_splits_them(text, tokens):
    """Each expected list is what nltk 3.10's word_tokenize gives (quotes aside)."""
    assert word_tokens(text) == tokens


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Split at every non-letter these were: bird, person, orange, car, bus + airplane.
        ("A bird's-eye view of a man-made pier.", []),
        ("An orange-colored wall by a car-free street.", []),
        ("A bi-plane in the sky.", []),
        # The parts of a hyphenated compound are no mention; the plain words still are.
        ("A car-free street with a car.", ["car"]),
    ],
)
def test_compounds_are_one_word(text, expected):
    assert extract_objects(text) == expected


@pytest.mark.parametrize(
    ("word", "lemma"),
    [
        ("ferrying", "ferrying"),  # a verb form: not ferry (-> boat)
        ("pursed", "pursed"),  # not purse (-> handbag)
        ("clocked", "clocked"),  # not clock
        ("dogs", "dog"),
        ("knives", "knife"),
        ("men", "man"),
        ("bi-planes", "bi-plane"),  # unknown, but a plural -s
        ("bi-plane", "bi-plane"),
    ],
)
def test_only_plural_nouns_are_singularized(word, lemma):
    assert plural_lemma(word) == lemma


def test_verb_forms_name_no_object():
    """ "ferrying", "pursed", "clocked" were boat, handbag, clock; here ferry (a boat synonym),
    people and clocks are the mentions: boat, person, clock."""
    text = "A ferry service ferrying people, pursed lips, a runner clocked and two clocks."
    assert extract_objects(text) == ["boat", "person", "clock"]


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("dog bed", ["dog bed"]),  # a run of nouns counts only whole
        ("tennis player", ["tennis player"]),
        ("coffee cup", ["coffee cup"]),
        ("police car", ["police car"]),
        ("red car", ["car"]),  # the adjective is no part of the run
        ("bunch of bananas", ["bunch", "banana"]),  # two runs
        ("baby elephant", ["elephant"]),  # a phrase wins over the runs
        ("tennis rackets", ["tennis racket"]),
        ("two people", ["people"]),
    ],
)
def test_a_judges_name_becomes_its_phrases_or_noun_runs(name, words):
    assert coco_vocabulary().name_objects(name) == words


def test_judge_names_map_whole_and_deduplicate_after_singularizing():
    """dog bed, tennis player, coffee cup, police car: no category (each run whole is no
    synonym). dog, dogs: one dog. toilet, toilet seat: one toilet (the phrase is the toilet).
    bunch of bananas: banana. -> dog, toilet, banana."""
    names = [
        "dog bed",
        "tennis player",
        "coffee cup",
        "police car",
        "dog",
        "dogs",
        "toilet",
        "toilet seat",
        "bunch of bananas",
    ]
    assert objects_to_categories(names) == ["dog", "toilet", "banana"]


def test_ground_truth_from_captions_uses_the_same_words(tmp_path):
    """A caption "A man-made pier and a bi-plane." names nothing (was person, airplane); "Two
    dogs." names a dog. No segmentation: image 1 -> {dog}."""
    (tmp_path / "instances.json").write_text(json.dumps({"categories": [], "annotations": []}))
    captions = {
        "annotations": [
            {"id": 1, "image_id": 1, "caption": "A man-made pier and a bi-plane."},
            {"id": 2, "image_id": 1, "caption": "Two dogs."},
        ]
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    truth = coco_ground_truth(tmp_path / "instances.json", tmp_path / "captions.json", [1])
    assert truth == {1: {"dog"}}
