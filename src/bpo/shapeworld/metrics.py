"""ShapeWorld answer scores: how much hallucination the text prior explains, and answer quality.

`partner_scores` measures the prior-partner share of hallucinated shapes; `answer_quality` and
`answer_quality_scores` check answers against the world's caption grammar, count repeated
mentions and compare lengths with the gold captions. CHAIR itself, and the combined
`hallucination_metrics`, are in `bpo.evaluate.shapeworld`: the evaluation layer sits above the
world it measures.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from bpo.shapeworld.world import COLOURS, PARTNERS, SHAPES, Scene, caption, mentioned_shapes


def partner_counts(
    said: Sequence[str],
    truth: set[str],
    partners: dict[str, str] = PARTNERS,
    shapes: Sequence[str] = SHAPES,
) -> tuple[int, int, float]:
    """One answer's (hallucinated mentions, partner hits among them, their summed chance of a
    hit): the counts `partner_scores` sums over answers."""
    absent = [s for s in shapes if s not in truth]
    expected = {partners[s] for s in truth if s in partners} - set(truth)
    wrong = [shape for shape in said if shape not in truth]
    chance = len(expected) / len(absent) if absent else 0.0
    return len(wrong), sum(shape in expected for shape in wrong), chance * len(wrong)


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
        wrong, partner_hits, partner_chance = partner_counts(said, truth, partners, shapes)
        count += wrong
        hits += partner_hits
        chance += partner_chance
    return {
        "partner_share": hits / count if count else 0.0,
        "partner_chance": chance / count if count else 0.0,
    }


# --- answer quality -----------------------------------------------------------------------------
# A low CHAIR can be bought with broken answers: a caption cut mid-phrase names fewer shapes, and
# one that repeats a present shape adds correct mentions. These scores sit next to CHAIR so such a
# model is seen for what it is.

EMPTY_CAPTION = "nothing."  # the gold caption of a scene without objects


@lru_cache(maxsize=8)
def _caption_pattern(shapes: tuple[str, ...], colours: tuple[str, ...]) -> re.Pattern[str]:
    """The world's caption grammar: `P.`, `P and P.`, `P, P and P.`, ... with P = 'a COLOUR SHAPE'."""

    def one_of(names: tuple[str, ...]) -> str:
        # Longest first, so that a name that begins another never cuts it short.
        return "(?:" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + ")"

    phrase = f"a {one_of(colours)} {one_of(shapes)}"
    return re.compile(rf"{phrase}(?:(?:, {phrase})* and {phrase})?\.")


def is_well_formed(
    answer: str, shapes: Sequence[str] = SHAPES, colours: Sequence[str] = COLOURS
) -> bool:
    """Whether `answer` is a caption in the world's grammar, whitespace at its ends aside.

    Well-formed: 'nothing.', or phrases 'a {colour} {shape}' over the given colours and shapes,
    joined as 'p1.', 'p1 and p2.', 'p1, p2 and p3.' (', ' between all but the last two, ' and '
    before the last) and ending in one '.'. Words are lower-case and one space apart, as
    `world.caption` writes them. Grammar only: the order of the phrases and repeated shapes do
    not matter here (repeats are counted apart, by `answer_quality`).
    """
    text = answer.strip()
    pattern = _caption_pattern(tuple(shapes), tuple(colours))
    return text == EMPTY_CAPTION or pattern.fullmatch(text) is not None


def _quality(
    answer: str,
    mentions: Sequence[str],
    scene: Scene,
    shapes: Sequence[str],
    colours: Sequence[str],
) -> dict[str, Any]:
    return {
        "well_formed": is_well_formed(answer, shapes, colours),
        "repeated": len(mentions) - len(set(mentions)),
        "words": len(answer.split()),
        "gold_words": len(caption(scene).split()),
    }


def answer_quality(
    answer: str, scene: Scene, shapes: Sequence[str] = SHAPES, colours: Sequence[str] = COLOURS
) -> dict[str, Any]:
    """One answer's quality against its scene.

    - well_formed: `is_well_formed(answer)`;
    - repeated: shape mentions beyond the first of each shape (`mentioned_shapes`, plurals
      included), e.g. 1 in 'a purple square, a purple square and a purple diamond.';
    - words: the answer's whitespace-separated words;
    - gold_words: the same count for the scene's gold caption, `caption(scene)`.
    """
    return _quality(answer, mentioned_shapes(answer, tuple(shapes)), scene, shapes, colours)


def answer_quality_scores(
    answers: Sequence[str],
    scenes: Sequence[Scene],
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = COLOURS,
) -> dict[str, float]:
    """Answer quality over answers and their scenes (each share 0 when there is nothing to count).

    - well_formed: share of answers that are well-formed captions (`is_well_formed`);
    - repetition: share of answers with at least one repeated shape mention;
    - repeated_mentions: repeated mentions (beyond each shape's first, per answer) / all shape
      mentions, repeats counted;
    - length_ratio: the answers' words summed / their gold captions' words summed (below 1: the
      answers say less than the gold captions, as cut-short ones do).
    """
    n_well_formed = n_repeating = n_repeated = n_mentions = n_words = n_gold_words = 0
    for answer, scene in zip(answers, scenes, strict=True):
        mentions = mentioned_shapes(answer, tuple(shapes))
        quality = _quality(answer, mentions, scene, shapes, colours)
        n_well_formed += quality["well_formed"]
        n_repeating += quality["repeated"] > 0
        n_repeated += quality["repeated"]
        n_mentions += len(mentions)
        n_words += quality["words"]
        n_gold_words += quality["gold_words"]
    return {
        "well_formed": n_well_formed / len(answers) if answers else 0.0,
        "repetition": n_repeating / len(answers) if answers else 0.0,
        "repeated_mentions": n_repeated / n_mentions if n_mentions else 0.0,
        "length_ratio": n_words / n_gold_words if n_gold_words else 0.0,
    }
