"""The ShapeWorld benchmarks: combined hallucination metrics, and POPE ranked by other scenes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bpo.evaluate.benchmarks import read_items
from bpo.evaluate.chair import chair_scores
from bpo.evaluate.config import BenchmarkConfig
from bpo.evaluate.datasets import EvalItem
from bpo.evaluate.shapeworld import (
    hallucination_metrics,
    read_shapeworld_pope,
    score_shapeworld_chair,
)
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
    Quality: answers 1 and 3 are well-formed captions, "two rings." is not -> 2/3; no repeats;
    words (7 + 2 + 1) / gold words (3 + 7 + 3: "a red circle.", "a green cross and a white
    ring.", "a blue square.") = 10/13.
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
    quality = {
        "well_formed": pytest.approx(2 / 3),
        "repetition": 0.0,
        "repeated_mentions": 0.0,
        "length_ratio": pytest.approx(10 / 13),
    }
    assert metrics == {
        **chair_scores(mentions, truth),
        **partner_scores(mentions, truth),
        **quality,
    }
    assert metrics["chair_s"] == pytest.approx(1 / 3)
    assert metrics["chair_i"] == pytest.approx(1 / 3)
    assert metrics["recall"] == pytest.approx(1 / 2)
    assert metrics["chair_s_mentioned"] == pytest.approx(1 / 2)
    assert metrics["partner_share"] == 1.0
    assert metrics["partner_chance"] == pytest.approx(1 / (len(SHAPES) - 1))


def test_score_shapeworld_chair_adds_answer_quality_to_metrics_and_records():
    """
    q0 {red circle, blue square}, "a red circle and a red" (cut short): mentions circle; ill-formed;
       6 words; gold "a red circle and a blue square." 7.
    q1 {purple square, purple diamond}, "a purple square, a purple square and a purple diamond.":
       mentions square, square, diamond; 1 repeated; 10 words; gold 7.
    q2 {green triangle}, "a green triangle and a green bar.": mentions triangle, bar (absent, the
       triangle's partner); 7 words; gold "a green triangle." 3.
    CHAIR: chair_i 1/6 (bar of 6 mentions), chair_s 1/3, recall (1 + 2 + 1) / (2 + 2 + 1) = 4/5.
    Partner: share 1/1; chance |{bar}| / 7 absent shapes = 1/7.
    Quality: well_formed 2/3, repetition 1/3, repeated_mentions 1/6, length_ratio
    (6 + 10 + 7) / (7 + 7 + 3) = 23/17.
    """
    scenes = [
        Scene((ShapeObject("circle", "red", 0, 0), ShapeObject("square", "blue", 0, 1))),
        Scene((ShapeObject("square", "purple", 0, 0), ShapeObject("diamond", "purple", 1, 1))),
        Scene((ShapeObject("triangle", "green", 2, 2),)),
    ]
    items = [
        EvalItem(f"q{k}", "Describe the image.", None, {"scene": s}) for k, s in enumerate(scenes)
    ]
    texts = [
        "a red circle and a red",
        "a purple square, a purple square and a purple diamond.",
        "a green triangle and a green bar.",
    ]
    answers = {f"q{k}": text for k, text in enumerate(texts)}
    metrics, records = score_shapeworld_chair(items, answers)
    assert metrics == {
        "chair_s": pytest.approx(1 / 3),
        "chair_i": pytest.approx(1 / 6),
        "recall": pytest.approx(4 / 5),
        "chair_s_mentioned": pytest.approx(1 / 3),
        "responses": 3,
        "mentions": 6,
        "hallucinated_mentions": 1,
        "partner_share": 1.0,
        "partner_chance": pytest.approx(1 / 7),
        "well_formed": pytest.approx(2 / 3),
        "repetition": pytest.approx(1 / 3),
        "repeated_mentions": pytest.approx(1 / 6),
        "length_ratio": pytest.approx(23 / 17),
    }
    assert hallucination_metrics(texts, scenes) == metrics
    assert records[0] == {
        "question_id": "q0",
        "answer": "a red circle and a red",
        "mentions": ["circle"],
        "hallucinated": [],
        "ground_truth": ["circle", "square"],
        "well_formed": False,
        "repeated": 0,
        "words": 6,
        "gold_words": 7,
    }
    quality = [
        {k: r[k] for k in ("well_formed", "repeated", "words", "gold_words")} for r in records
    ]
    assert quality[1:] == [
        {"well_formed": True, "repeated": 1, "words": 10, "gold_words": 7},
        {"well_formed": True, "repeated": 0, "words": 7, "gold_words": 3},
    ]
    assert records[2]["hallucinated"] == ["bar"]


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
