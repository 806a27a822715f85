"""What the demo checks, as measured: that the base model shows prior-driven hallucination, and
whether the paper's claim (BPO hallucinates less than SFT) holds in this run."""

from __future__ import annotations

# What the base model must show for ShapeWorld to reproduce the problem BPO solves: enough
# hallucination, enough recall to be a captioner, and hallucinations that follow the text prior.
TARGETS = {"chair_i": 0.03, "recall": 0.5, "partner_ratio": 1.5}
RECALL_SLACK = 0.02  # BPO may lose at most this much recall to SFT


def check_base(metrics: dict) -> dict:
    """Which of the targets the base model meets: enough hallucination, prior-driven."""
    chance = metrics["partner_chance"]
    ratio = metrics["partner_share"] / chance if chance else 0
    return {
        "chair_i>=0.03": metrics["chair_i"] >= TARGETS["chair_i"],
        "recall>=0.5": metrics["recall"] >= TARGETS["recall"],
        "partner_share>=1.5*partner_chance": ratio >= TARGETS["partner_ratio"],
        "partner_ratio": round(ratio, 3),
    }


def claim(arms: dict[str, dict]) -> dict:
    """Whether the paper's claim holds here, as measured: BPO's mean CHAIR_i below SFT's, below
    the base model's in every seed, with recall at most RECALL_SLACK under SFT's."""
    if "bpo" not in arms or "sft" not in arms:
        return {"holds": None, "reason": "needs the bpo and sft arms"}
    bpo, sft, base = arms["bpo"], arms["sft"], arms["base"]
    bases = {run.get("world"): run["chair_i"] for run in base["per_seed"]}
    checks = {
        "bpo_chair_i<sft_chair_i": bpo["chair_i"] < sft["chair_i"],
        "bpo_chair_i<base_chair_i_every_seed": all(
            run["chair_i"] < bases[run.get("world")] for run in bpo["per_seed"]
        ),
        "bpo_recall>=sft_recall-0.02": bpo["recall"] >= sft["recall"] - RECALL_SLACK,
    }
    return {
        "holds": all(checks.values()),
        "checks": checks,
        "chair_i": {"base": base["chair_i"], "sft": sft["chair_i"], "bpo": bpo["chair_i"]},
        "recall": {"base": base["recall"], "sft": sft["recall"], "bpo": bpo["recall"]},
    }


def claim_sentence(claim: dict) -> str:
    """The paper's claim, as this run measured it, in one sentence."""
    if claim.get("holds") is None:
        return f"BPO vs SFT: not compared ({claim.get('reason')})."
    c, r = claim["chair_i"], claim["recall"]
    numbers = (
        f"CHAIR_i base {c['base']:.4f}, SFT {c['sft']:.4f}, BPO {c['bpo']:.4f}; "
        f"recall SFT {r['sft']:.4f}, BPO {r['bpo']:.4f}"
    )
    if claim["holds"]:
        return f"The claim holds here: BPO hallucinates less than SFT and the base ({numbers})."
    failed = ", ".join(k for k, v in claim["checks"].items() if not v)
    return f"The claim does NOT hold here (failed: {failed}) ({numbers})."
