"""The ShapeWorld benchmarks: combined hallucination metrics, and POPE ranked by other scenes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bpo.evaluate.benchmarks import read_items
from bpo.evaluate.chair import chair_scores
from bpo.evaluate.config import BenchmarkConfig
from bpo.evaluate.shapeworld import hallucination_metrics, read_shapeworld_pope
from bpo.shapeworld.export import scene_to_json
from bpo.shapeworld.metrics import partner_scores
from bpo.shapeworld.world import PARTNERS, SHAPES, Scene, ShapeObject


def scene(*shapes: str) -> Scene:
    return Scene(tuple(ShapeObject(s, "red", 0, k) for k, s in enumerate(shapes)))


def write_scenes(path: Path, scenes: list[Scene]) -> Path:
    """A scenes.jsonl as `bpo shapeworld` writes it (the images need not exist to build questions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        {"id": f"s{k}", "image": f"images/s{k}.png", **scene_to_json(s)}
        for k, s in enumerate(scenes)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_hallucination_metrics_extracts_mentions_and_combines_both_scores():
    """
    scene 1: {circle}; answer names the circle and circle's prior partner p (hallucinated).
    scene 2: {ring, cross}; answer "two rings." (plural -> ring, correct).
    scene 3: {square}; answer "nothing." (no mentions).
    CHAIR: chair_s 1/3, chair_i 1/3 (1 of 3 mentions), recall (1 + 1 + 0) / (1 + 2 + 1) = 1/2,
    chair_s_mentioned 1/2. Partner: the one hallucination is a partner -> share 1; chance: the
    truth {circle} has the one partner p among len(SHAPES) - 1 absent shapes.
    """
    partner = PARTNERS["circle"]
    scenes = [
        Scene((ShapeObject("circle", "red"),)),
        Scene((ShapeObject("cross", "green", 0, 1), ShapeObject("ring", "white", 1, 1))),
        Scene((ShapeObject("square", "blue"),)),
    ]
    answers = [f"a red circle and a blue {partner}.", "two rings.", "nothing."]
    metrics = hallucination_metrics(answers, scenes)
    mentions = [["circle", partner], ["ring"], []]
    truth = [{"circle"}, {"cross", "ring"}, {"square"}]
    assert metrics == {**chair_scores(mentions, truth), **partner_scores(mentions, truth)}
    assert metrics["chair_s"] == pytest.approx(1 / 3)
    assert metrics["chair_i"] == pytest.approx(1 / 3)
    assert metrics["recall"] == pytest.approx(1 / 2)
    assert metrics["chair_s_mentioned"] == pytest.approx(1 / 2)
    assert metrics["partner_share"] == 1.0
    assert metrics["partner_chance"] == pytest.approx(1 / (len(SHAPES) - 1))


# The benchmark's two scenes, and five corpus scenes whose statistics rank the negatives instead.
BENCH = [scene("circle"), scene("circle", "square")]
CORPUS = [
    scene("circle", "square"),
    scene("square", "ring"),
    scene("circle", "triangle"),
    scene("square"),
    scene("circle", "triangle"),
]


def negatives(items) -> dict[tuple[str, str], str]:
    """{(scene id, strategy): the absent shape asked about} (one negative per scene here)."""
    return {
        (item.question_id.split(":")[0], item.fields["strategy"]): item.fields["object"]
        for item in items
        if not item.fields["label"]
    }


def test_pope_negatives_ranked_by_the_benchmarks_own_scenes(tmp_path):
    """Own counts: circle in 2 scenes, square in 1; circle and square together once.
    s0 {circle}: popular -> square (1; every other absent shape 0); adversarial -> square (it
    co-occurs with circle once). s1 {circle, square}: every absent shape scores 0, so both
    strategies take the first by name: bar."""
    write_scenes(tmp_path / "bench" / "scenes.jsonl", BENCH)
    items = read_shapeworld_pope(str(tmp_path / "bench"), ["popular", "adversarial"], per_image=1)
    assert negatives(items) == {
        ("s0", "popular"): "square",
        ("s0", "adversarial"): "square",
        ("s1", "popular"): "bar",
        ("s1", "adversarial"): "bar",
    }


def test_pope_negatives_ranked_by_pope_rank_scenes(tmp_path):
    """Corpus counts: circle 3, square 3, triangle 2, ring 1. Co-occurrence: circle-triangle 2,
    circle-square 1, square-ring 1.
    s0 {circle}: popular -> square (3, the most frequent absent shape); adversarial -> triangle
    (2 with circle, over square's 1).
    s1 {circle, square}: popular -> triangle (2, over ring's 1); adversarial -> triangle
    (2 with circle, over ring's 1 with square).
    The random strategy ranks nothing, so its questions are the same either way."""
    write_scenes(tmp_path / "bench" / "scenes.jsonl", BENCH)
    corpus = write_scenes(tmp_path / "corpus" / "scenes.jsonl", CORPUS)
    bench = BenchmarkConfig(
        name="shapeworld_pope",
        data=str(tmp_path / "bench"),
        pope_strategies=["popular", "adversarial", "random"],
        pope_per_image=1,
        pope_rank_scenes=str(corpus),
    )
    items = read_items(bench)
    ranked = negatives(items)
    assert {k: v for k, v in ranked.items() if k[1] != "random"} == {
        ("s0", "popular"): "square",
        ("s0", "adversarial"): "triangle",
        ("s1", "popular"): "triangle",
        ("s1", "adversarial"): "triangle",
    }
    own = read_shapeworld_pope(str(tmp_path / "bench"), ["random"], per_image=1)
    assert [
        (i.question_id, i.fields["object"]) for i in items if i.fields["strategy"] == "random"
    ] == [(i.question_id, i.fields["object"]) for i in own]


def test_a_missing_pope_rank_scenes_file_is_named(tmp_path):
    write_scenes(tmp_path / "bench" / "scenes.jsonl", BENCH)
    with pytest.raises(FileNotFoundError, match=r"pope_rank_scenes .*nope\.jsonl not found"):
        read_shapeworld_pope(
            str(tmp_path / "bench"), ["popular"], rank_scenes=str(tmp_path / "nope.jsonl")
        )
