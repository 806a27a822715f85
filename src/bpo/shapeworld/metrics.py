"""How much of a ShapeWorld model's hallucination its text prior explains (the partner shapes).

CHAIR itself, and the combined `hallucination_metrics`, are in `bpo.evaluate.shapeworld`: the
evaluation layer sits above the world it measures.
"""

from __future__ import annotations

from collections.abc import Sequence

from bpo.shapeworld.world import PARTNERS, SHAPES


def partner_scores(
    mentions: Sequence[Sequence[str]],
    ground_truth: Sequence[set[str]],
    partners: dict[str, str] = PARTNERS,
    shapes: Sequence[str] = SHAPES,
) -> dict:
    """How much of the hallucination the text prior explains.

    - partner_share: share of hallucinated mentions that are the prior partner of a shape that is
      in the image;
    - partner_chance: the same share expected if each hallucinated shape were drawn uniformly from
      the shapes absent from its image (averaged over the same hallucinated mentions).
    """
    hits = chance = 0.0
    count = 0
    for said, truth in zip(mentions, ground_truth, strict=True):
        absent = [s for s in shapes if s not in truth]
        expected = {partners[s] for s in truth if s in partners} - set(truth)
        for shape in said:
            if shape in truth:
                continue
            count += 1
            hits += shape in expected
            chance += len(expected) / len(absent)
    return {
        "partner_share": hits / count if count else 0.0,
        "partner_chance": chance / count if count else 0.0,
    }
