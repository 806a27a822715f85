"""CHAIR on mention lists worked by hand."""

import pytest

from bpo.evaluate.chair import chair_scores


def test_chair_scores_on_four_responses():
    """
    response                         truth             mentions  hallucinated  recalled
    1 circle, square, circle         {circle}          3         1 (square)    1 {circle}
    2 (none)                         {triangle}        0         0             0
    3 ring, ring, cross              {cross, diamond}  3         2 (ring x2)   1 {cross}
    4 triangle                       {triangle}        1         0             1 {triangle}
    chair_s = 2 bad / 4 = 1/2; chair_i = 3 / 7 (repeats count); recall = 3 / (1+1+2+1) = 3/5;
    chair_s_mentioned = 2 bad / 3 responses that mention something = 2/3.
    """
    mentions = [["circle", "square", "circle"], [], ["ring", "ring", "cross"], ["triangle"]]
    truth = [{"circle"}, {"triangle"}, {"cross", "diamond"}, {"triangle"}]
    assert chair_scores(mentions, truth) == {
        "chair_s": pytest.approx(1 / 2),
        "chair_i": pytest.approx(3 / 7),
        "recall": pytest.approx(3 / 5),
        "chair_s_mentioned": pytest.approx(2 / 3),
        "responses": 4,
        "mentions": 7,
        "hallucinated_mentions": 3,
    }


def test_repeats_count_in_chair_i_but_not_in_recall():
    """ring, ring, circle, circle, circle vs {circle, square}: chair_i = 2/5 (unique mentions
    would give 1/2); recall = |{circle}| / 2 = 1/2 (counting repeats would give 3/2)."""
    scores = chair_scores([["ring", "ring", "circle", "circle", "circle"]], [{"circle", "square"}])
    assert scores["chair_i"] == pytest.approx(2 / 5)
    assert scores["recall"] == pytest.approx(1 / 2)
    assert scores["chair_s"] == 1.0
    assert (scores["mentions"], scores["hallucinated_mentions"]) == (5, 2)


def test_a_response_without_mentions_is_not_hallucinating():
    """No mentions: chair_s 0, chair_i 0 (no division by zero), recall 0 of the 2 truths,
    chair_s_mentioned 0 (no response mentions anything)."""
    assert chair_scores([[]], [{"circle", "square"}]) == {
        "chair_s": 0.0,
        "chair_i": 0.0,
        "recall": 0.0,
        "chair_s_mentioned": 0.0,
        "responses": 1,
        "mentions": 0,
        "hallucinated_mentions": 0,
    }


def test_no_responses_gives_zeros():
    scores = chair_scores([], [])
    assert scores["responses"] == 0
    assert scores["chair_s"] == scores["chair_i"] == scores["recall"] == 0.0


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 responses but 1 ground-truth sets"):
        chair_scores([["circle"], []], [{"circle"}])
