"""CHAIR (Rohrbach et al., 2018): how many mentioned objects are not in the image.

`chair_scores` is benchmark-agnostic: it takes the object categories each response mentions (in
order, repeats kept) and the ground-truth categories of each image. ShapeWorld extracts mentions
exactly from its own vocabulary; COCO mentions come from `bpo.data.vocab.extract_objects`, and
COCO's ground truth from its annotation files (`coco_ground_truth`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from bpo.data.vocab import ObjectVocabulary, coco_vocabulary, extract_objects


def response_counts(said: Sequence[str], truth: set[str]) -> tuple[int, int, int, int]:
    """One response's (mentions, hallucinated mentions, unique correct categories, ground-truth
    size): the counts `chair_scores` sums over responses."""
    wrong = sum(m not in truth for m in said)
    return len(said), wrong, len(set(said) & truth), len(truth)


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
        said_count, wrong, recalled, truth_size = response_counts(said, truth)
        n_mentions += said_count
        n_hallucinated += wrong
        n_bad_responses += wrong > 0
        n_mentioning += said_count > 0
        n_recalled += recalled
        n_truth += truth_size
    return {
        "chair_s": n_bad_responses / len(mentions) if mentions else 0.0,
        "chair_i": n_hallucinated / n_mentions if n_mentions else 0.0,
        "recall": n_recalled / n_truth if n_truth else 0.0,
        "chair_s_mentioned": n_bad_responses / n_mentioning if n_mentioning else 0.0,
        "responses": len(mentions),
        "mentions": n_mentions,
        "hallucinated_mentions": n_hallucinated,
    }


def _load_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO {what} file {path} not found; download the COCO annotations")
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path} is not a COCO {what} file (no 'annotations'); check the path")
    return data


def _paths(paths: str | Path | Iterable[str | Path] | None) -> list[str | Path]:
    if paths is None:
        return []
    if isinstance(paths, str | Path):
        return [paths]
    return list(paths)


def coco_ground_truth(
    instances: str | Path | Iterable[str | Path],
    captions: str | Path | Iterable[str | Path] | None = None,
    image_ids: Iterable[int] | None = None,
    vocabulary: ObjectVocabulary | None = None,
) -> dict[int, set[str]]:
    """{image id: categories} from COCO `instances_*.json` and `captions_*.json`, as CHAIR does.

    The categories of an image are those of its segmentation annotations plus every category its
    five human captions mention (extracted with `extract_objects`): the original metric counts an
    object the annotators described but did not segment as present.

    instances, captions: one path or several (e.g. train2014 and val2014).
    image_ids: keep only these images (every image an annotation names, by default).
    """
    vocabulary = vocabulary or coco_vocabulary()
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    truth: dict[int, set[str]] = {i: set() for i in wanted} if wanted is not None else {}
    for path in _paths(instances):
        data = _load_json(path, "instances")
        names = {c["id"]: c["name"].lower() for c in data.get("categories", [])}
        for annotation in data["annotations"]:
            image = int(annotation["image_id"])
            if wanted is not None and image not in wanted:
                continue
            name = names.get(annotation["category_id"])
            if name not in vocabulary.synonyms:
                raise ValueError(
                    f"{path}: annotation {annotation.get('id')} has category "
                    f"{annotation['category_id']} ({name!r}), which the synonym list does not "
                    "name; pass the synonym list of this annotation set"
                )
            truth.setdefault(image, set()).add(vocabulary.synonyms[name])
    for path in _paths(captions):
        for annotation in _load_json(path, "captions")["annotations"]:
            image = int(annotation["image_id"])
            if wanted is not None and image not in wanted:
                continue
            truth.setdefault(image, set()).update(
                extract_objects(annotation["caption"], vocabulary)
            )
    return truth
