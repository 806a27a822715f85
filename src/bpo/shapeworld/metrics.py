"""Hallucination metrics on ShapeWorld, where the ground truth of every image is exact."""

from __future__ import annotations

from collections.abc import Sequence

from bpo.evaluate.chair import chair_scores
from bpo.shapeworld.world import PARTNERS, SHAPES, mentioned_shapes


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


def hallucination_metrics(answers: Sequence[str], scenes) -> dict:
    """CHAIR and partner metrics of free-text answers against their scenes."""
    mentions = [mentioned_shapes(a) for a in answers]
    truth = [scene.shapes for scene in scenes]
    return {**chair_scores(mentions, truth), **partner_scores(mentions, truth)}
