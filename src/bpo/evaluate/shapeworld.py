"""The ShapeWorld benchmarks: captions scored by CHAIR, and POPE, against each scene's exact shapes.

The data is a `bpo shapeworld` export (scenes.jsonl + images/). `shapeworld_chair` asks for a
description of every scene and scores the shapes it mentions against the scene's; the prior-partner
share says how much of the hallucination the text prior explains, and the answer-quality scores
(well-formed captions, repeated mentions, length against the gold caption) show a CHAIR bought
with broken answers. `shapeworld_pope` builds POPE questions over the world's shapes. POPE's
popular and adversarial negatives are ranked by how often shapes occur and co-occur: over the
benchmark's own scenes by default, or over another export's (`rank_scenes`), so that a run can
rank by a text corpus's statistics as POPE ranks by COCO's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bpo.evaluate import pope
from bpo.evaluate.chair import chair_scores
from bpo.evaluate.datasets import EvalItem, image_path, json_records
from bpo.evaluate.scores import Scored, chair_records
from bpo.shapeworld.export import read_scenes
from bpo.shapeworld.metrics import answer_quality, answer_quality_scores, partner_scores
from bpo.shapeworld.world import CAPTION_PROMPTS, SHAPES, Scene, mentioned_shapes


def _scenes_file(folder: Path) -> Path:
    path = folder / "scenes.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; write a ShapeWorld dataset with `bpo shapeworld --out {folder}`"
        )
    return path


def _export(source: str) -> tuple[Path, list[dict[str, Any]], list[Scene]]:
    """The export's folder, its scenes.jsonl records (id, image) and the scenes they describe."""
    folder = Path(source)
    path = _scenes_file(folder)
    records = [record for _, record in json_records(path)]
    return folder, records, read_scenes(path)


def _ranking_sets(path: Path) -> list[set[str]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"pope_rank_scenes {path} not found; point it at a scenes.jsonl that "
            "`bpo shapeworld` wrote"
        )
    return [scene.shapes for scene in read_scenes(path)]


def read_shapeworld_captions(source: str) -> list[EvalItem]:
    """Description prompts for every scene of a `bpo shapeworld` export; `scene` is its truth."""
    folder, records, scenes = _export(source)
    items = []
    for record, scene in zip(records, scenes, strict=True):
        image = image_path(folder, record["image"], f"{folder / 'scenes.jsonl'} id={record['id']}")
        items.append(EvalItem(record["id"], CAPTION_PROMPTS[0], image, {"scene": scene}))
    return items


def read_shapeworld_pope(
    source: str,
    strategies: Sequence[str],
    per_image: int = 3,
    seed: int = 0,
    rank_scenes: str | None = None,
) -> list[EvalItem]:
    """POPE questions built from a ShapeWorld export's exact scenes, over the world's shapes.

    rank_scenes: a scenes.jsonl whose object sets rank the popular and adversarial negatives;
        None ranks by the benchmark's own scenes.
    """
    folder, records, scenes = _export(source)
    object_sets = [scene.shapes for scene in scenes]
    ranking = object_sets if rank_scenes is None else _ranking_sets(Path(rank_scenes))
    frequency, pairs = pope.object_frequency(ranking), pope.co_occurrence(ranking)
    ids = [record["id"] for record in records]
    where = folder / "scenes.jsonl"
    # Resolved (and checked to stay under the folder) once per image, not once per question.
    images = {r["id"]: image_path(folder, r["image"], f"{where} id={r['id']}") for r in records}
    items = []
    for strategy in strategies:
        questions = pope.build_pope_questions(
            ids,
            object_sets,
            strategy,
            per_image,
            seed,
            categories=SHAPES,
            frequency=frequency,
            pairs=pairs,
        )
        for q in questions:
            fields = {"label": q.label, "strategy": strategy, "object": q.object}
            items.append(EvalItem(q.question_id, q.text, images[q.image], fields))
    return items


def hallucination_metrics(answers: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """CHAIR, partner and answer-quality metrics of free-text answers against their scenes."""
    mentions = [mentioned_shapes(a) for a in answers]
    truth = [scene.shapes for scene in scenes]
    return {
        **chair_scores(mentions, truth),
        **partner_scores(mentions, truth),
        **answer_quality_scores(answers, scenes),
    }


def score_shapeworld_chair(items: Sequence[EvalItem], answers: dict[str, str]) -> Scored:
    """CHAIR, the prior-partner share and answer quality against the scenes' exact shapes; each
    record also carries its answer's `answer_quality` fields."""
    texts = [answers[item.question_id] for item in items]
    scenes = [item.fields["scene"] for item in items]
    mentions = [mentioned_shapes(text) for text in texts]
    truth = [scene.shapes for scene in scenes]
    metrics, records = chair_records(items, answers, mentions, truth)
    for record, text, scene in zip(records, texts, scenes, strict=True):
        record.update(answer_quality(text, scene))
    quality = answer_quality_scores(texts, scenes)
    return {**metrics, **partner_scores(mentions, truth), **quality}, records
