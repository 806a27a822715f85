"""POPE: answer parsing, metrics and question construction on cases worked by hand."""

from __future__ import annotations

import pytest

from bpo.evaluate.pope import (
    build_pope_questions,
    co_occurrence,
    object_frequency,
    parse_yes_no,
    pope_metrics,
    pope_question,
)


@pytest.mark.parametrize(
    ("answer", "yes"),
    [
        ("No, there is not.", False),  # "No" (comma dropped) in the first sentence
        ("Yes.", True),
        ("There is a dog.", True),  # neither no nor not: yes
        ("not sure", False),  # "not" means no
        ("NO!", False),  # case and punctuation do not hide the word
        ("Yes. There is no cat though.", True),  # only the first sentence counts
        ("There isn't one.", True),  # "isn't" is not "not", as in the reference code
        ("Nothing like that; a note.", True),  # "nothing" and "note" are not "no"/"not"
        ("", True),
    ],
)
def test_parse_yes_no(answer, yes):
    assert parse_yes_no(answer) is yes


def test_metrics_on_a_worked_case():
    """predictions Y Y N N Y N, labels Y N N Y Y N:
    tp = 2 (1st, 5th), fp = 1 (2nd), tn = 2 (3rd, 6th), fn = 1 (4th).
    accuracy 4/6, precision 2/3, recall 2/3, f1 2/3, yes_ratio = 3 yes predicted / 6 = 1/2."""
    predictions = [True, True, False, False, True, False]
    labels = [True, False, False, True, True, False]
    assert pope_metrics(predictions, labels) == {
        "accuracy": pytest.approx(4 / 6),
        "precision": pytest.approx(2 / 3),
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(2 / 3),
        "yes_ratio": pytest.approx(1 / 2),
        "questions": 6,
        "tp": 2,
        "fp": 1,
        "tn": 2,
        "fn": 1,
    }


def test_f1_of_unequal_precision_and_recall():
    """predictions Y Y Y N, labels Y N N N: tp 1, fp 2, fn 0 -> precision 1/3, recall 1,
    f1 = 2 * (1/3) * 1 / (1/3 + 1) = 1/2; yes_ratio 3/4."""
    scores = pope_metrics([True, True, True, False], [True, False, False, False])
    assert scores["precision"] == pytest.approx(1 / 3)
    assert scores["recall"] == pytest.approx(1.0)
    assert scores["f1"] == pytest.approx(1 / 2)
    assert scores["yes_ratio"] == pytest.approx(3 / 4)


def test_zero_divisions_give_zero():
    """All answers no: no yes predicted, so precision's denominator is 0 -> 0 (and f1 0);
    no yes label either -> recall 0. Accuracy is still 2/2. No question at all: everything 0."""
    none_yes = pope_metrics([False, False], [False, False])
    assert (none_yes["precision"], none_yes["recall"], none_yes["f1"]) == (0.0, 0.0, 0.0)
    assert none_yes["accuracy"] == 1.0
    assert none_yes["yes_ratio"] == 0.0
    empty = pope_metrics([], [])
    assert empty["accuracy"] == empty["precision"] == empty["f1"] == empty["yes_ratio"] == 0.0
    assert empty["questions"] == 0


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        pope_metrics([True, False], [True])


def test_question_template_with_article():
    assert pope_question("dog") == "Is there a dog in the image?"
    assert pope_question("orange") == "Is there an orange in the image?"
    assert pope_question("umbrella") == "Is there an umbrella in the image?"


# A: {dog, cat}  B: {dog, person}  C: {person, car}  D: {dog}
IMAGES = ["A", "B", "C", "D"]
SETS = [{"dog", "cat"}, {"dog", "person"}, {"person", "car"}, {"dog"}]


def test_frequency_and_co_occurrence_counts():
    """dog is in 3 images, person in 2, cat and car in 1. dog appears with cat once (A) and
    with person once (B); person with car once (C)."""
    assert object_frequency(SETS) == {"dog": 3, "person": 2, "cat": 1, "car": 1}
    pairs = co_occurrence(SETS)
    assert pairs["dog"] == {"cat": 1, "person": 1}
    assert pairs["person"] == {"dog": 1, "car": 1}
    assert pairs["car"] == {"person": 1}


def negatives(questions, image):
    return [q.object for q in questions if q.image == image and not q.label]


def test_popular_negatives_are_the_most_frequent_absent_objects():
    """D {dog} lacks car (1), cat (1), person (2): person first, then car before cat (a tie,
    broken by name). C {person, car} lacks cat (1), dog (3): dog."""
    questions = build_pope_questions(IMAGES, SETS, "popular", per_image=1)
    assert negatives(questions, "D") == ["person"]
    assert negatives(questions, "C") == ["dog"]
    two = build_pope_questions(
        ["D"],
        [{"dog"}],
        "popular",
        per_image=2,
        frequency=object_frequency(SETS),
        categories=["car", "cat", "dog", "person"],
    )
    # D has one object, so it gets one positive and one negative even when 2 are asked.
    assert [(q.object, q.label) for q in two] == [("dog", True), ("person", False)]


def test_adversarial_negatives_are_the_strongest_co_occurring_absent_objects():
    """D {dog}: dog co-occurs with cat 1, person 1, car 0 -> cat (tie with person, by name).
    C {person, car}: person's partners dog 1, car 1 plus car's partner person 1 -> absent ones:
    dog 1, cat 0 -> dog. A {dog, cat}: dog's partners person 1 (cat is present) plus cat's dog
    (present) -> person."""
    questions = build_pope_questions(IMAGES, SETS, "adversarial", per_image=1)
    assert negatives(questions, "D") == ["cat"]
    assert negatives(questions, "C") == ["dog"]
    assert negatives(questions, "A") == ["person"]


def test_random_questions_alternate_and_are_labelled_by_the_truth():
    questions = build_pope_questions(
        IMAGES,
        SETS,
        "random",
        per_image=2,
        seed=3,
        categories=["apple", "car", "cat", "dog", "person"],
    )
    for q in questions:
        assert (q.object in SETS[IMAGES.index(q.image)]) is q.label
    a = [q for q in questions if q.image == "A"]
    assert [q.label for q in a] == [True, False, True, False]  # yes and no alternate
    assert {q.object for q in a if q.label} == {"dog", "cat"}
    assert [q.question_id for q in a] == ["A:random:0", "A:random:1", "A:random:2", "A:random:3"]
    assert len({q.question_id for q in questions}) == len(questions)
    # Same seed, same questions.
    assert (
        build_pope_questions(
            IMAGES,
            SETS,
            "random",
            per_image=2,
            seed=3,
            categories=["apple", "car", "cat", "dog", "person"],
        )
        == questions
    )


def test_an_image_without_objects_gets_no_question():
    assert build_pope_questions(["E"], [set()], "random") == []


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="unknown POPE strategy 'hard'"):
        build_pope_questions(IMAGES, SETS, "hard")  # type: ignore[arg-type]
