"""The demo's claim (BPO's CHAIR_i interval below SFT's and the base's means, recall and
well-formed answers kept) and the base model's checks, on hand-made arm summaries."""

from __future__ import annotations

import pytest

from bpo.demo.claim import (
    ablation,
    ablation_sentence,
    beyond,
    beyond_sentence,
    check_base,
    claim,
    claim_sentence,
)

METHOD = "a two-level percentile bootstrap (test)"


def arm(chair_i: float, recall: float, ci=None, well_formed=None, in_results=True) -> dict:
    """An arm's summary as results.json holds it: means, and `intervals` when `ci` is given.

    well_formed: the arm's mean share; at the top (results.json's metric) when in_results,
        else only among the intervals' means (a metric only the judgments carry).
    """
    summary = {"chair_i": chair_i, "recall": recall, "std": {}, "per_seed": []}
    means = {"chair_i": chair_i, "recall": recall}
    if well_formed is not None:
        means["well_formed"] = well_formed
        if in_results:
            summary["well_formed"] = well_formed
    if ci is not None:
        summary["intervals"] = {"method": METHOD, "mean": means, "ci": {"chair_i": ci}}
    return summary


def arms(bpo: dict, sft=None, base=None) -> dict:
    return {
        "base": base or arm(0.10, 0.85, [0.09, 0.11]),
        "sft": sft or arm(0.08, 0.80, [0.07, 0.09]),
        "bpo": bpo,
    }


def test_the_claim_holds_when_bpo_s_whole_interval_is_below():
    """BPO [0.04, 0.06] below SFT's 0.08 and the base's 0.10; recall 0.79 >= 0.80 - 0.02."""
    result = claim(arms(arm(0.05, 0.79, [0.04, 0.06])))
    assert result["holds"] is True
    assert result["checks"] == {
        "bpo_chair_i_ci<sft_chair_i": True,
        "bpo_chair_i_ci<base_chair_i": True,
        "bpo_recall>=sft_recall-0.02": True,
    }
    assert result["method"] == METHOD
    assert result["chair_i"] == {"base": 0.10, "sft": 0.08, "bpo": 0.05}
    assert result["intervals"]["chair_i"]["bpo"] == [0.04, 0.06]
    sentence = claim_sentence(result)
    assert sentence.startswith("The claim holds here")
    assert "CHAIR_i BPO 0.0500 [0.0400, 0.0600] (95% interval" in sentence
    assert "SFT's mean 0.0800 and the base's 0.1000" in sentence


def test_a_lower_mean_is_not_enough_when_the_interval_reaches_sft():
    """BPO's mean 0.05 is below SFT's 0.08, but its interval reaches 0.085: the claim fails on
    that check alone."""
    result = claim(arms(arm(0.05, 0.79, [0.03, 0.085])))
    assert result["holds"] is False
    assert [k for k, v in result["checks"].items() if not v] == ["bpo_chair_i_ci<sft_chair_i"]
    assert "failed: bpo_chair_i_ci<sft_chair_i" in claim_sentence(result)


def test_the_interval_must_also_lie_below_the_base():
    """Interval top 0.075: below SFT's 0.08, not below a base at 0.07."""
    result = claim(arms(arm(0.05, 0.79, [0.03, 0.075]), base=arm(0.07, 0.85, [0.06, 0.08])))
    assert [k for k, v in result["checks"].items() if not v] == ["bpo_chair_i_ci<base_chair_i"]


def test_recall_may_drop_at_most_two_points():
    """SFT recall 0.80: BPO at 0.785 keeps the claim, at 0.775 breaks it."""
    assert claim(arms(arm(0.05, 0.785, [0.04, 0.06])))["holds"] is True
    result = claim(arms(arm(0.05, 0.775, [0.04, 0.06])))
    assert [k for k, v in result["checks"].items() if not v] == ["bpo_recall>=sft_recall-0.02"]


@pytest.mark.parametrize("in_results", [True, False])
def test_well_formed_answers_may_drop_at_most_one_point(in_results):
    """SFT 0.97 well-formed: BPO at 0.965 keeps the claim, at 0.95 breaks it; the share is read
    from results.json's metric or, failing that, the intervals' means."""
    sft = arm(0.08, 0.80, [0.07, 0.09], well_formed=0.97, in_results=in_results)
    kept = claim(arms(arm(0.05, 0.79, [0.04, 0.06], 0.965, in_results), sft=sft))
    assert kept["holds"] is True
    assert kept["checks"]["bpo_well_formed>=sft_well_formed-0.01"] is True
    assert kept["well_formed"]["sft"] == 0.97
    broken = claim(arms(arm(0.05, 0.79, [0.04, 0.06], 0.95, in_results), sft=sft))
    assert [k for k, v in broken["checks"].items() if not v] == [
        "bpo_well_formed>=sft_well_formed-0.01"
    ]
    assert "well-formed answers SFT 0.9700, BPO 0.9500" in claim_sentence(broken)


def test_without_well_formed_shares_there_is_no_such_check():
    result = claim(arms(arm(0.05, 0.79, [0.04, 0.06], well_formed=0.5)))  # SFT has none
    assert "bpo_well_formed>=sft_well_formed-0.01" not in result["checks"]
    assert "well_formed" not in result


def test_no_interval_no_verdict():
    result = claim(arms(arm(0.05, 0.79)))
    assert result["holds"] is None and "no CHAIR_i interval" in result["reason"]
    assert claim({"bpo": arm(0.05, 0.79)})["holds"] is None


# --- the base model's checks --------------------------------------------------------------------

BASE = {
    "chair_i": 0.05,
    "recall": 0.6,
    "partner_share": 0.5,
    "partner_chance": 0.2,  # ratio 2.5
    "pope_random_accuracy": 0.80,
    "pope_random_yes_ratio": 0.55,
    "pope_popular_accuracy": 0.70,
    "pope_popular_yes_ratio": 0.60,
    "pope_adversarial_accuracy": 0.60,
    "pope_adversarial_yes_ratio": 0.70,
}
YES = "pope_yes_ratio_in_[0.3,0.8]_every_split"
ACC = "pope_accuracy_in_[0.55,0.95]_every_split"
HARDEST = "pope_adversarial_accuracy<random_accuracy"


def failed(checks: dict) -> list[str]:
    return [k for k, v in checks.items() if v is False]


def test_a_base_with_a_plausible_pope_meets_every_target():
    checks = check_base(BASE)
    assert set(checks) == {
        "chair_i>=0.03",
        "recall>=0.5",
        "partner_share>=1.5*partner_chance",
        YES,
        ACC,
        HARDEST,
        "partner_ratio",
    }
    assert failed(checks) == [] and checks["partner_ratio"] == 2.5


@pytest.mark.parametrize(
    ("changed", "fails"),
    [
        ({"pope_popular_yes_ratio": 0.85}, [YES]),  # one split says yes too often
        ({"pope_adversarial_yes_ratio": 0.25}, [YES]),  # ... or too rarely
        ({"pope_random_accuracy": 0.96}, [ACC]),  # solved
        ({"pope_adversarial_accuracy": 0.5}, [ACC]),  # at chance
        ({"pope_adversarial_accuracy": 0.80}, [HARDEST]),  # as easy as random
        (
            {"chair_i": 0.02, "partner_share": 0.25},
            ["chair_i>=0.03", "partner_share>=1.5*partner_chance"],
        ),
    ],
)
def test_each_base_target_fails_on_its_own(changed, fails):
    assert failed(check_base({**BASE, **changed})) == fails


def test_without_pope_only_the_chair_targets_are_checked():
    chair = {k: v for k, v in BASE.items() if not k.startswith("pope_")}
    assert set(check_base(chair)) == {
        "chair_i>=0.03",
        "recall>=0.5",
        "partner_share>=1.5*partner_chance",
        "partner_ratio",
    }


def test_the_ablation_applies_the_claim_s_test_to_each_source():
    """SFT 0.08, BPO 0.05 [0.04, 0.06]. Weakened alone 0.055 [0.05, 0.07]: below SFT's 0.08
    (beats it), but BPO's top 0.06 is not below 0.055 (both did not beat it). Injected alone
    0.075 [0.06, 0.09]: its top 0.09 reaches SFT's 0.08 (no), and BPO's 0.06 < 0.075 (yes)."""
    found = ablation(
        {
            **arms(arm(0.05, 0.79, [0.04, 0.06])),
            "bpo_weaken": arm(0.055, 0.79, [0.05, 0.07]),
            "bpo_inject": arm(0.075, 0.79, [0.06, 0.09]),
        }
    )
    assert found == {
        "bpo_weaken": {
            "chair_i": 0.055,
            "interval": [0.05, 0.07],
            "beats_sft": True,
            "bpo_beats_it": False,
        },
        "bpo_inject": {
            "chair_i": 0.075,
            "interval": [0.06, 0.09],
            "beats_sft": False,
            "bpo_beats_it": True,
        },
    }
    sentence = ablation_sentence(found)
    assert (
        "Image-weakened negatives alone (bpo_weaken, CHAIR_i 0.0550 [0.0500, 0.0700]) beat SFT;"
        in sentence
    )
    assert "both together did not beat it." in sentence
    assert (
        "(bpo_inject, CHAIR_i 0.0750 [0.0600, 0.0900]) did not beat SFT; both sources" in sentence
    )
    assert ablation({"bpo": arm(0.05, 0.79, [0.04, 0.06])}) == {}


def test_beyond_compares_the_image_arm_and_each_round_with_bpo_and_sft():
    """SFT 0.08, BPO 0.05 [0.04, 0.06]. bpo_image 0.045 [0.035, 0.055]: its top 0.055 is not
    below BPO's 0.05 (no) but is below SFT's 0.08 (yes). Round 1 0.07 [0.06, 0.085]: below
    neither (0.085 >= 0.08). Round 2 0.03 [0.02, 0.04]: below both. Rounds sort by number (r10
    after r2), and an arm that is not a round (bpo_rounds_rx) is left out."""
    found = beyond(
        {
            **arms(arm(0.05, 0.79, [0.04, 0.06])),
            "bpo_image": arm(0.045, 0.78, [0.035, 0.055], well_formed=0.99),
            "bpo_rounds_r10": arm(0.07, 0.8, [0.06, 0.085]),
            "bpo_rounds_r2": arm(0.03, 0.77, [0.02, 0.04]),
            "bpo_rounds_rx": arm(0.01, 0.77, [0.0, 0.02]),
        }
    )
    assert list(found) == ["bpo_image", "bpo_rounds_r2", "bpo_rounds_r10"]
    assert found["bpo_image"] == {
        "chair_i": 0.045,
        "interval": [0.035, 0.055],
        "recall": 0.78,
        "well_formed": 0.99,
        "beats_bpo": False,
        "beats_sft": True,
    }
    assert (found["bpo_rounds_r10"]["beats_bpo"], found["bpo_rounds_r10"]["beats_sft"]) == (
        False,
        False,
    )
    assert (found["bpo_rounds_r2"]["beats_bpo"], found["bpo_rounds_r2"]["beats_sft"]) == (
        True,
        True,
    )
    sentence = beyond_sentence(found)
    assert (
        "BPO in rounds, round 2 (bpo_rounds_r2, CHAIR_i 0.0300 [0.0200, 0.0400]) beat "
        "single-round BPO and beat SFT." in sentence
    )
    assert "did not beat single-round BPO and beat SFT" in sentence
    assert beyond({"bpo": arm(0.05, 0.8)}) == {}
