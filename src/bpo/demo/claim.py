"""What the demo checks, as measured: that the base model shows prior-driven hallucination, and
whether the paper's claim (BPO hallucinates less than SFT) holds in this run.

The claim is stated with the 95% intervals of `bpo.demo.intervals` (a bootstrap over training
seeds and held-out scenes): a single run's numbers vary between CPUs, an interval says how far.
"""

from __future__ import annotations

from bpo.demo.intervals import POPE_SPLITS, interval_of, mean_of

# What the base model must show for ShapeWorld to reproduce the problem BPO solves: enough
# hallucination, enough recall to be a captioner, and hallucinations that follow the text prior.
TARGETS = {"chair_i": 0.03, "recall": 0.5, "partner_ratio": 1.5}
# POPE on the base: a yes-bias that is not total and accuracy away from chance and from perfect
# on every split, and the adversarial split (the prior's partners asked) the hardest.
POPE_TARGETS = {"yes_ratio": (0.3, 0.8), "accuracy": (0.55, 0.95)}
RECALL_SLACK = 0.02  # BPO may lose at most this much recall to SFT
WELL_FORMED_SLACK = 0.01  # ... and this much of the share of well-formed answers


def check_base(metrics: dict) -> dict:
    """Which of the targets the base model meets: enough hallucination, prior-driven, and (when
    POPE was run) a POPE that is neither at chance nor solved, hardest on adversarial questions."""
    chance = metrics["partner_chance"]
    ratio = metrics["partner_share"] / chance if chance else 0
    checks = {
        "chair_i>=0.03": metrics["chair_i"] >= TARGETS["chair_i"],
        "recall>=0.5": metrics["recall"] >= TARGETS["recall"],
        "partner_share>=1.5*partner_chance": ratio >= TARGETS["partner_ratio"],
    }
    splits = [s for s in POPE_SPLITS if f"pope_{s}_accuracy" in metrics]
    for name, (low, high) in POPE_TARGETS.items():
        if splits:
            values = [metrics[f"pope_{s}_{name}"] for s in splits]
            checks[f"pope_{name}_in_[{low},{high}]_every_split"] = all(
                low <= v <= high for v in values
            )
    if {"random", "adversarial"} <= set(splits):
        checks["pope_adversarial_accuracy<random_accuracy"] = (
            metrics["pope_adversarial_accuracy"] < metrics["pope_random_accuracy"]
        )
    return {**checks, "partner_ratio": round(ratio, 3)}


def _by_arm(arms: dict[str, dict], key: str, read) -> dict:
    return {name: read(arms[name], key) for name in ("base", "sft", "bpo")}


def claim(arms: dict[str, dict]) -> dict:
    """Whether the paper's claim holds here, as measured: BPO's 95% interval of CHAIR_i lies
    wholly below SFT's mean CHAIR_i and below the base model's, BPO's mean recall is at most
    RECALL_SLACK under SFT's, and (when the judgments say which answers are well formed) its
    share of well-formed answers at most WELL_FORMED_SLACK under SFT's."""
    missing = [name for name in ("base", "sft", "bpo") if name not in arms]
    if missing:
        return {"holds": None, "reason": f"needs the base, bpo and sft arms ({missing} missing)"}
    bpo, sft, base = arms["bpo"], arms["sft"], arms["base"]
    bpo_ci = interval_of(bpo, "chair_i")
    if bpo_ci is None:
        return {"holds": None, "reason": "the bpo arm has no CHAIR_i interval (no judgments read)"}
    checks = {
        "bpo_chair_i_ci<sft_chair_i": bpo_ci[1] < sft["chair_i"],
        "bpo_chair_i_ci<base_chair_i": bpo_ci[1] < base["chair_i"],
        "bpo_recall>=sft_recall-0.02": bpo["recall"] >= sft["recall"] - RECALL_SLACK,
    }
    keys = ["chair_i", "recall"]
    bpo_wf, sft_wf = mean_of(bpo, "well_formed"), mean_of(sft, "well_formed")
    if bpo_wf is not None and sft_wf is not None:
        checks["bpo_well_formed>=sft_well_formed-0.01"] = bpo_wf >= sft_wf - WELL_FORMED_SLACK
        keys.append("well_formed")
    return {
        "holds": all(checks.values()),
        "checks": checks,
        "method": bpo["intervals"]["method"],
        **{key: _by_arm(arms, key, mean_of) for key in keys},
        "intervals": {key: _by_arm(arms, key, interval_of) for key in keys},
    }


def _with_interval(value: float, interval: list[float] | None) -> str:
    return f"{value:.4f}" + ("" if interval is None else f" [{interval[0]:.4f}, {interval[1]:.4f}]")


def claim_sentence(claim: dict) -> str:
    """The paper's claim, as this run measured it, in one sentence."""
    if claim.get("holds") is None:
        return f"BPO vs SFT: not compared ({claim.get('reason')})."
    c, r, ci = claim["chair_i"], claim["recall"], claim["intervals"]
    numbers = (
        f"CHAIR_i BPO {_with_interval(c['bpo'], ci['chair_i']['bpo'])} (95% interval over seeds "
        f"and held-out scenes) against SFT's mean {c['sft']:.4f} and the base's {c['base']:.4f}; "
        f"recall SFT {r['sft']:.4f}, BPO {r['bpo']:.4f}"
    )
    if "well_formed" in claim:
        w = claim["well_formed"]
        numbers += f"; well-formed answers SFT {w['sft']:.4f}, BPO {w['bpo']:.4f}"
    if claim["holds"]:
        return (
            "The claim holds here: BPO hallucinates less than SFT and the base, its whole "
            f"CHAIR_i interval below their means ({numbers})."
        )
    failed = ", ".join(k for k, v in claim["checks"].items() if not v)
    return f"The claim does NOT hold here (failed: {failed}) ({numbers})."


ABLATIONS = {"bpo_weaken": "image-weakened negatives", "bpo_inject": "error-injected negatives"}


def _below(arm: dict, other: dict, key: str = "chair_i") -> bool | None:
    """Whether `arm`'s 95% interval of `key` lies wholly below `other`'s mean (None: no
    interval): the claim's own test, applied to any two arms."""
    interval = interval_of(arm, key)
    return None if interval is None else interval[1] < other[key]


def ablation(arms: dict[str, dict]) -> dict:
    """The paper's ablation, as measured: does each negative source alone beat SFT on CHAIR_i,
    and do both together (bpo) beat each alone? Each "beats" is the claim's test: the first
    arm's 95% interval lies wholly below the second's mean."""
    if "sft" not in arms or "bpo" not in arms:
        return {}
    found = {}
    for name in ABLATIONS:
        if name in arms:
            found[name] = {
                "chair_i": arms[name]["chair_i"],
                "interval": interval_of(arms[name], "chair_i"),
                "beats_sft": _below(arms[name], arms["sft"]),
                "bpo_beats_it": _below(arms["bpo"], arms[name]),
            }
    return found


def ablation_sentence(found: dict) -> str:
    """The ablation's answer in plain words (empty without ablation arms)."""
    parts = []
    for name, entry in found.items():
        alone = {True: "beat SFT", False: "did not beat SFT", None: "was not compared"}
        both = {True: "both sources together beat it", False: "both together did not beat it"}
        parts.append(
            f"{ABLATIONS[name].capitalize()} alone ({name}, CHAIR_i "
            f"{_with_interval(entry['chair_i'], entry['interval'])}) "
            f"{alone[entry['beats_sft']]}; {both.get(entry['bpo_beats_it'], 'not compared')}."
        )
    return " ".join(parts)


BEYOND = {"bpo_image": "BPO with the image-contrast term", "bpo_rounds": "BPO in rounds"}


def _beyond_rows(arms: dict[str, dict]) -> list[tuple[str, str]]:
    """(row, its description) of every beyond-the-paper row present: `bpo_image` and each
    round of `bpo_rounds` (`bpo_rounds_r1`, ...)."""
    rows = [("bpo_image", BEYOND["bpo_image"])] if "bpo_image" in arms else []
    rounds = sorted(
        (int(name.rsplit("_r", 1)[1]), name)
        for name in arms
        if name.startswith("bpo_rounds_r") and name.rsplit("_r", 1)[1].isdigit()
    )
    rows += [(name, f"{BEYOND['bpo_rounds']}, round {k}") for k, name in rounds]
    return rows


def beyond(arms: dict[str, dict]) -> dict:
    """Beyond the paper, as measured: does BPO with the image-contrast term, or each round of
    on-policy BPO, beat single-round BPO and SFT on CHAIR_i (the claim's test: its 95% interval
    wholly below the other's mean), and what happens to recall and well-formed answers?"""
    if "sft" not in arms or "bpo" not in arms:
        return {}
    return {
        name: {
            "chair_i": arms[name]["chair_i"],
            "interval": interval_of(arms[name], "chair_i"),
            "recall": arms[name].get("recall"),
            "well_formed": arms[name].get("well_formed"),
            "beats_bpo": _below(arms[name], arms["bpo"]),
            "beats_sft": _below(arms[name], arms["sft"]),
        }
        for name, _ in _beyond_rows(arms)
    }


def beyond_sentence(found: dict) -> str:
    """The beyond-the-paper rows' answer in plain words (empty without them)."""
    said = {True: "beat", False: "did not beat", None: "was not compared with"}
    parts = []
    described = dict(_beyond_rows(found))
    for name, entry in found.items():
        parts.append(
            f"{described[name]} ({name}, CHAIR_i "
            f"{_with_interval(entry['chair_i'], entry['interval'])}) "
            f"{said[entry['beats_bpo']]} single-round BPO and {said[entry['beats_sft']]} SFT."
        )
    return " ".join(parts)
