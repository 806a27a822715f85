"""CHAIR (Rohrbach et al., 2018): how many mentioned objects are not in the image.

`chair_scores` is benchmark-agnostic: it takes the object categories each response mentions (in
order, repeats kept) and the ground-truth categories of each image. ShapeWorld extracts mentions
exactly from its own vocabulary; COCO extraction (synonyms, plurals, two-word phrases) is separate.
"""

from __future__ import annotations

from collections.abc import Sequence


def chair_scores(mentions: Sequence[Sequence[str]], ground_truth: Sequence[set[str]]) -> dict:
    """CHAIR_s, CHAIR_i, recall and the response-level rate over responses that mention objects.

    - chair_s: share of responses with at least one hallucinated mention;
    - chair_i: hallucinated mentions / all mentions (repeats count, as in the original metric);
    - recall: unique correctly mentioned categories summed / ground-truth sizes summed;
    - chair_s_mentioned: chair_s over responses with at least one mention (Object HalBench's
      response-level rate).
    """
    if len(mentions) != len(ground_truth):
        raise ValueError(f"{len(mentions)} responses but {len(ground_truth)} ground-truth sets")
    n_mentions = n_hallucinated = n_bad_responses = n_mentioning = 0
    n_recalled = n_truth = 0
    for said, truth in zip(mentions, ground_truth, strict=True):
        wrong = [m for m in said if m not in truth]
        n_mentions += len(said)
        n_hallucinated += len(wrong)
        n_bad_responses += bool(wrong)
        n_mentioning += bool(said)
        n_recalled += len(set(said) & truth)
        n_truth += len(truth)
    return {
        "chair_s": n_bad_responses / len(mentions) if mentions else 0.0,
        "chair_i": n_hallucinated / n_mentions if n_mentions else 0.0,
        "recall": n_recalled / n_truth if n_truth else 0.0,
        "chair_s_mentioned": n_bad_responses / n_mentioning if n_mentioning else 0.0,
        "responses": len(mentions),
        "mentions": n_mentions,
        "hallucinated_mentions": n_hallucinated,
    }
