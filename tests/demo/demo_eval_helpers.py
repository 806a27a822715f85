"""A `bpo eval` folder of the demo built from hand-written answers with the product's scorers:
shapeworld_chair and shapeworld_pope judgments and results.json, as `run_eval` writes them."""

from __future__ import annotations

import json
from pathlib import Path

from bpo.demo.intervals import QUALITY_FIELDS
from bpo.evaluate.pope import STRATEGIES
from bpo.evaluate.scores import score_pope
from bpo.evaluate.shapeworld import (
    read_shapeworld_captions,
    read_shapeworld_pope,
    score_shapeworld_chair,
)
from bpo.shapeworld.world import mentioned_shapes


def write_jsonl(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def write_eval(
    folder: Path,
    held_out: Path,
    captions: list[str],
    quality: list[dict] | None = None,
    without_quality: bool = False,
) -> dict:
    """Score `captions` (one per held-out scene, in order) with CHAIR, and POPE questions
    answered 'yes' exactly when the scene's caption names the shape asked about; write the
    judgments, answers and results.json under `folder`; return the demo's flat metrics
    (`bpo.demo.stages.metrics_of`'s keys).

    quality: answer-quality fields (well_formed, repeated, words, gold_words) written over the
        scorer's, one dict per CHAIR record; without_quality: drop those fields from the records.
    """
    items = read_shapeworld_captions(str(held_out))
    answers = {item.question_id: text for item, text in zip(items, captions, strict=True)}
    chair, chair_records = score_shapeworld_chair(items, answers)
    for record, extra in zip(chair_records, quality or [{}] * len(items), strict=True):
        record.update(extra)
        if without_quality:
            for name in QUALITY_FIELDS:
                record.pop(name, None)
    said = {scene: set(mentioned_shapes(text)) for scene, text in answers.items()}
    questions = read_shapeworld_pope(str(held_out), STRATEGIES, per_image=2, seed=0)
    scene_of = {q.question_id: q.question_id.rsplit(":", 2)[0] for q in questions}
    replies = {
        q.question_id: "Yes." if q.fields["object"] in said[scene_of[q.question_id]] else "No."
        for q in questions
    }
    pope, pope_records = score_pope(questions, replies)
    write_jsonl(folder / "shapeworld_chair" / "judgments.jsonl", chair_records)
    write_jsonl(
        folder / "shapeworld_chair" / "answers.jsonl",
        [{"question_id": k, "answer": v} for k, v in answers.items()],
    )
    write_jsonl(folder / "shapeworld_pope" / "judgments.jsonl", pope_records)
    benchmarks = {"shapeworld_chair": chair, "shapeworld_pope": pope}
    (folder / "results.json").write_text(json.dumps({"benchmarks": benchmarks}))
    metrics = dict(chair)
    for split in STRATEGIES:
        for name in ("accuracy", "f1", "yes_ratio"):
            metrics[f"pope_{split}_{name}"] = pope[split][name]
    return metrics
