"""COCO object extraction for CHAIR on sentences worked by hand, and the COCO ground truth."""

from __future__ import annotations

import json

import pytest

from bpo.data.vocab import (
    ObjectVocabulary,
    coco_vocabulary,
    extract_objects,
    objects_to_categories,
    read_synonyms,
)
from bpo.evaluate.chair import chair_scores, coco_ground_truth


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Plurals are singularized: dogs -> dog, cats -> cat.
        ("Two dogs chase three cats.", ["dog", "cat"]),
        # Irregular plurals: people and men are person; mice -> mouse; knives -> knife.
        ("People and men watch mice near the knives.", ["person", "person", "mouse", "knife"]),
        # Two-word phrases are one mention of their own category, not of their last word:
        # "hot dog" is no dog, "teddy bear" no bear; plurals of phrases too (traffic lights).
        (
            "A hot dog, a teddy bear and two traffic lights.",
            ["hot dog", "teddy bear", "traffic light"],
        ),
        (
            "Wine glasses, cell phones and a motor bike.",
            ["wine glass", "cell phone", "motorcycle"],
        ),
        # "sports" is kept as written so that "sports ball" still matches.
        ("Sports balls and tennis rackets.", ["sports ball", "tennis racket"]),
        # baby/adult + animal is the animal; a bare baby is a person (a person synonym).
        ("A baby elephant, an adult zebra and a baby.", ["elephant", "zebra", "person"]),
        # baby + a non-COCO animal word mentions nothing.
        ("A baby animal.", []),
        # toilet seat -> toilet; a bare seat (a chair synonym) is dropped when a toilet is said.
        ("The toilet seat is up and a seat stands by the toilet.", ["toilet", "toilet"]),
        ("A seat by the window.", ["chair"]),
        # bow tie -> tie (one mention, not tie + bow).
        ("A man in a bow tie.", ["person", "tie"]),
        # passenger jet/train -> the vehicle, not a person; a bare passenger is a person.
        (
            "A passenger jet, a passenger train and a passenger.",
            ["airplane", "train", "person"],
        ),
        # Phrases that stand for no object silence their parts: no train in "train tracks".
        ("Train tracks lead to home plate.", []),
        # Repeats are kept, in order.
        ("A dog, a cat, another dog and a dog.", ["dog", "cat", "dog", "dog"]),
        # No mention at all.
        ("The weather is sunny and bright.", []),
        # Punctuation attached to words, and upper case.
        ("DOGS!! (a Cat), the dog's bowl; sofa.", ["dog", "cat", "dog", "bowl", "couch"]),
        ("An iPhone and a TV.", ["cell phone", "tv"]),
    ],
)
def test_extract_objects(text, expected):
    assert extract_objects(text) == expected


def test_chair_of_extracted_mentions():
    """Two captions against their truth, end to end.
    1 "Two dogs on a sofa next to a cat." vs {dog, couch}: mentions dog, couch, cat; cat is wrong.
    2 "A man rides a bicycle." vs {person, bicycle}: person, bicycle; none wrong.
    chair_s = 1/2, chair_i = 1/5, recall = (2 + 2) / (2 + 2) = 1."""
    captions = ["Two dogs on a sofa next to a cat.", "A man rides a bicycle."]
    mentions = [extract_objects(c) for c in captions]
    assert mentions == [["dog", "couch", "cat"], ["person", "bicycle"]]
    scores = chair_scores(mentions, [{"dog", "couch"}, {"person", "bicycle"}])
    assert scores["chair_s"] == pytest.approx(1 / 2)
    assert scores["chair_i"] == pytest.approx(1 / 5)
    assert scores["recall"] == pytest.approx(1.0)


def test_shipped_synonym_list_has_80_categories():
    synonyms = read_synonyms()
    assert len(set(synonyms.values())) == 80
    assert synonyms["iphone"] == "cell phone"  # lower-cased from "iPhone"
    assert synonyms["televison"] == "tv"  # the published misspelling is kept


def test_a_synonym_in_two_categories_is_refused(tmp_path):
    path = tmp_path / "synonyms.txt"
    path.write_text("dog, pup\ncat, pup\n")
    with pytest.raises(ValueError, match="line 2: 'pup' already names 'dog'"):
        read_synonyms(path)


def test_a_custom_vocabulary():
    """Any word table works: ShapeWorld-like shapes, with one phrase standing for nothing."""
    vocabulary = ObjectVocabulary(
        synonyms={"circle": "circle", "ring": "ring", "disc": "circle"},
        phrases={"boxing ring": "boxing ring"},
    )
    assert extract_objects("Two discs, a ring and a boxing ring.", vocabulary) == [
        "circle",
        "ring",
    ]


def test_objects_listed_by_a_judge():
    """Names singularized, then de-duplicated (as RLHF-V does): "dogs", "dog", "Dog" are one
    dog; "red car" is its noun, car; seat is dropped beside a toilet:
    ["dogs", "dog", "Dog", "toilet", "seat", "red car"] -> dog, toilet, car."""
    names = ["dogs", "dog", "Dog", "toilet", "seat", "red car"]
    assert objects_to_categories(names) == ["dog", "toilet", "car"]


def test_extraction_is_cached_per_word():
    vocabulary = coco_vocabulary()
    extract_objects("Seven giraffes.")
    assert vocabulary.singular("giraffes") == "giraffe"
    assert "giraffes" in vocabulary._singular


def test_coco_ground_truth_joins_segmentations_and_captions(tmp_path):
    """Image 1: a dog segmented, captions mention a dog and a sofa -> {dog, couch}.
    Image 2: a person segmented, a caption mentions a man on a bike -> {person, bicycle}.
    Image 3 has annotations but is not asked for, so it is left out."""
    instances = {
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 18},
            {"id": 11, "image_id": 2, "category_id": 1},
            {"id": 12, "image_id": 3, "category_id": 18},
        ],
    }
    captions = {
        "annotations": [
            {"id": 20, "image_id": 1, "caption": "A dog sleeps on a sofa."},
            {"id": 21, "image_id": 1, "caption": "A brown dog."},
            {"id": 22, "image_id": 2, "caption": "A man riding a bike."},
            {"id": 23, "image_id": 3, "caption": "A cat."},
        ]
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    truth = coco_ground_truth(tmp_path / "instances.json", [tmp_path / "captions.json"], [1, 2])
    assert truth == {1: {"dog", "couch"}, 2: {"person", "bicycle"}}


def test_coco_ground_truth_names_an_unknown_category(tmp_path):
    instances = {
        "categories": [{"id": 7, "name": "unicorn"}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 7}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    with pytest.raises(ValueError, match=r"annotation 5 has category 7 \('unicorn'\)"):
        coco_ground_truth(tmp_path / "instances.json")


def test_coco_ground_truth_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"instances file .*nope\.json not found"):
        coco_ground_truth(tmp_path / "nope.json")
