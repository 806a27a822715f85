"""Partner (language-prior) scores on cases worked by hand."""

import pytest

from bpo.shapeworld.metrics import partner_scores

SIX = ("circle", "square", "triangle", "diamond", "cross", "ring")
PAIRS = {
    "circle": "square",
    "square": "circle",
    "triangle": "diamond",
    "diamond": "triangle",
    "cross": "ring",
    "ring": "cross",
}


def test_partner_scores_by_hand():
    """
    1. truth {circle, triangle}, said circle, square, ring. Absent: square, diamond, cross, ring
       (4); partners of the truth not in it: {square, diamond}. Hallucinated: square (a partner,
       chance 2/4) and ring (not one, chance 2/4).
    2. truth {circle}, said square, square. Absent: 5; partners {square}. Both hallucinated
       mentions are partners, chance 1/5 each.
    share = 3 partner mentions / 4 hallucinated = 0.75;
    chance = (2/4 + 2/4 + 1/5 + 1/5) / 4 = 1.4 / 4 = 0.35.
    """
    mentions = [["circle", "square", "ring"], ["square", "square"]]
    truth = [{"circle", "triangle"}, {"circle"}]
    scores = partner_scores(mentions, truth, partners=PAIRS, shapes=SIX)
    assert scores == {"partner_share": pytest.approx(0.75), "partner_chance": pytest.approx(0.35)}


def test_partner_scores_single_case_from_the_brief():
    """truth {circle, triangle}, hallucinated square (partner) and ring: share 1/2, chance
    |{square, diamond}| / |{square, diamond, cross, ring}| = 2/4."""
    scores = partner_scores([["square", "ring"]], [{"circle", "triangle"}], PAIRS, SIX)
    assert scores == {"partner_share": 0.5, "partner_chance": 0.5}


def test_partner_scores_with_one_sided_partners_and_a_small_vocabulary():
    """partners {circle: square}, shapes (circle, square, ring). truth {ring}: ring has no
    partner, so hallucinated circle is not a partner mention and its chance is 0/2.
    truth {circle}: absent square, ring; hallucinated ring -> miss, chance 1/2.
    share 0/2 = 0; chance (0 + 1/2) / 2 = 1/4."""
    scores = partner_scores(
        [["circle"], ["ring", "circle"]],
        [{"ring"}, {"circle"}],
        partners={"circle": "square"},
        shapes=("circle", "square", "ring"),
    )
    assert scores == {"partner_share": 0.0, "partner_chance": pytest.approx(0.25)}


def test_partner_scores_without_hallucinations_are_zero():
    assert partner_scores([["circle"], []], [{"circle"}, {"ring"}], PAIRS, SIX) == {
        "partner_share": 0.0,
        "partner_chance": 0.0,
    }


def test_partner_scores_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        partner_scores([["circle"]], [{"circle"}, {"ring"}], PAIRS, SIX)
