"""The demo's intervals: per-scene counts that sum to `bpo eval`'s own numbers, and the two-level
bootstrap and t-interval on cases worked by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from demo_eval_helpers import write_eval

from bpo.demo.intervals import (
    T_975,
    SceneStats,
    arm_intervals,
    bootstrap_intervals,
    full_sample_metrics,
    read_scene_stats,
    t_quantile,
)
from bpo.shapeworld.export import write_llava_dataset
from bpo.shapeworld.world import Scene, ShapeObject, WorldConfig

SCENES = [
    Scene((ShapeObject("circle", "red", 0, 0), ShapeObject("square", "blue", 1, 1)), seed=1),
    Scene((ShapeObject("triangle", "green", 2, 2),), seed=2),
    Scene((ShapeObject("diamond", "yellow", 3, 3), ShapeObject("frame", "white", 0, 3)), seed=3),
    Scene(
        (
            ShapeObject("ring", "white", 0, 1),
            ShapeObject("bar", "red", 2, 0),
            ShapeObject("circle", "blue", 3, 2),
        ),
        seed=4,
    ),
    Scene((ShapeObject("cross", "purple", 1, 3),), seed=5),
]
# Mentions 3 + 3 + 3 + 2 + 0 = 11, hallucinated: cross (scene 0), bar and circle (1), square (3):
# CHAIR_i = 4/11, CHAIR_s = 3/5; recall (2 + 1 + 2 + 1 + 0) / 9 = 6/9.
CAPTIONS = [
    "a red circle, a purple cross and a blue square.",
    "a green triangle and a red bar and a circle.",
    "a yellow diamond, a white frame and a white frame.",
    "a white ring and a square.",
    "nothing here.",
]
# well-formed 3/5; repeating (repeated > 0) 1/5; length ratio (8+9+8+5+2) / (6+3+6+9+3) = 32/27.
QUALITY = [
    {"well_formed": w, "repeated": r, "words": n, "gold_words": g}
    for w, r, n, g in [
        (True, 0, 8, 6),
        (True, 0, 9, 3),
        (False, 1, 8, 6),
        (True, 0, 5, 9),
        (False, 0, 2, 3),
    ]
]


CHAIR_KEYS = ["chair_i", "chair_s", "recall", "partner_share", "partner_chance"]
QUALITY_KEYS = ["well_formed", "repetition", "repeated_mentions", "length_ratio"]
POPE_KEYS = [
    f"pope_{s}_{m}"
    for s in ("random", "popular", "adversarial")
    for m in ("accuracy", "f1", "yes_ratio")
]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("held-out")
    write_llava_dataset(SCENES, WorldConfig(), folder, with_questions=False)
    return folder


def test_summed_counts_give_the_scorers_numbers(held_out, tmp_path):
    """Every metric from the summed per-scene counts equals what `score_shapeworld_chair` and
    `score_pope` wrote to results.json for the whole sample (CHAIR, partner share and chance,
    answer quality, POPE accuracy, F1 and yes ratio per split), and the hand-worked CHAIR
    numbers."""
    expected = write_eval(tmp_path, held_out, CAPTIONS)
    stats = read_scene_stats(tmp_path)
    assert stats.ids == tuple(f"sw_{i:06d}" for i in range(len(SCENES)))
    got = full_sample_metrics(stats)
    keys = CHAIR_KEYS + QUALITY_KEYS + POPE_KEYS
    assert set(got) == set(keys)
    assert got == pytest.approx({k: expected[k] for k in keys}, abs=1e-12)
    assert (got["chair_i"], got["chair_s"], got["recall"]) == pytest.approx((4 / 11, 3 / 5, 6 / 9))
    # POPE: every question is counted once, in its scene's row.
    questions = sum(1 for _ in (tmp_path / "shapeworld_pope" / "judgments.jsonl").open())
    pope = [k for k, c in enumerate(stats.columns) if c.startswith("pope_")]
    assert stats.values[:, pope].sum() == questions


def test_judgments_without_answer_quality_or_pope_leave_those_metrics_out(held_out, tmp_path):
    expected = write_eval(tmp_path, held_out, CAPTIONS, without_quality=True)
    (tmp_path / "shapeworld_pope" / "judgments.jsonl").unlink()
    got = full_sample_metrics(read_scene_stats(tmp_path))
    assert got == pytest.approx({k: expected[k] for k in CHAIR_KEYS}, abs=1e-12)


def test_answer_quality_metrics_when_the_judgments_carry_them(held_out, tmp_path):
    """well_formed 3/5, repetition 1/5, repeated mentions 1/11, length ratio 32/27 (QUALITY's
    comment; 11 mentions, CAPTIONS')."""
    write_eval(tmp_path, held_out, CAPTIONS, QUALITY)
    got = full_sample_metrics(read_scene_stats(tmp_path))
    assert got["well_formed"] == pytest.approx(3 / 5)
    assert got["repetition"] == pytest.approx(1 / 5)
    assert got["repeated_mentions"] == pytest.approx(1 / 11)
    assert got["length_ratio"] == pytest.approx(32 / 27)


def test_a_pope_question_about_an_unjudged_scene_is_named(held_out, tmp_path):
    write_eval(tmp_path, held_out, CAPTIONS)
    path = tmp_path / "shapeworld_pope" / "judgments.jsonl"
    stray = {"question_id": "sw_999999:random:0", "prediction": "yes", "label": "no"}
    with path.open("a") as f:
        f.write(json.dumps({**stray, "strategy": "random"}) + "\n")
    with pytest.raises(ValueError, match=r"sw_999999:random:0 is about scene sw_999999"):
        read_scene_stats(tmp_path)


def test_arm_intervals_read_every_seed_s_folder(held_out, tmp_path):
    """Two seeds' folders: the mean is the mean of their results.json CHAIR_i, the interval
    holds it, and the t-interval over the two seeds is mean ± 12.7062 sd / sqrt(2)."""
    first = write_eval(tmp_path / "s0", held_out, CAPTIONS)
    second = write_eval(tmp_path / "s1", held_out, [CAPTIONS[0]] + ["a circle."] * 4)
    result = arm_intervals([tmp_path / "s0", tmp_path / "s1"])
    values = [first["chair_i"], second["chair_i"]]
    mean = sum(values) / 2
    assert result["mean"]["chair_i"] == pytest.approx(mean)
    low, high = result["ci"]["chair_i"]
    assert low <= mean <= high
    half = 12.7062 * abs(values[0] - values[1]) / math.sqrt(2) / math.sqrt(2)
    assert result["t_ci"]["chair_i"] == pytest.approx([mean - half, mean + half])
    assert (result["runs"], result["scenes"], result["replicates"]) == (2, 5, 1000)
    assert "two-level" in result["method"]


# --- the bootstrap on hand-made counts ----------------------------------------------------------


def chair_stats(hallucinated: list[float], mentions: list[float], prefix: str = "s") -> SceneStats:
    """Per-scene counts with only CHAIR_i's columns (so CHAIR_i is the one metric)."""
    values = np.array([hallucinated, mentions], dtype=float).T
    ids = tuple(f"{prefix}{k}" for k in range(len(mentions)))
    return SceneStats(ids, ("hallucinated", "mentions"), values)


def test_identical_constant_seeds_give_a_degenerate_interval():
    """Two seeds, each scene 1 hallucinated of 4 mentions: every replicate's CHAIR_i is 0.25,
    so the interval is [0.25, 0.25], the mean; the t-interval has zero width."""
    seed = chair_stats([1] * 6, [4] * 6)
    result = bootstrap_intervals([seed, seed])
    assert result["ci"] == {"chair_i": [0.25, 0.25]}
    assert result["mean"] == {"chair_i": 0.25}
    assert result["t_ci"] == {"chair_i": [0.25, 0.25]}


def test_two_constant_seeds_span_the_seed_draws():
    """Seed a: CHAIR_i 0.25 on every scene, seed b: 0.5. Scenes do not matter; a replicate draws
    (a, a), (a, b) or (b, b) with odds 1/4, 1/2, 1/4: means 0.25, 0.375, 0.5, so the 2.5th and
    97.5th percentiles of 1000 replicates are 0.25 and 0.5."""
    a, b = chair_stats([1] * 8, [4] * 8), chair_stats([2] * 8, [4] * 8)
    result = bootstrap_intervals([a, b])
    assert result["ci"]["chair_i"] == [0.25, 0.5]
    assert result["mean"]["chair_i"] == 0.375


def test_one_run_gets_the_scene_bootstrap():
    """One run, scenes (1 of 1) and (0 of 1): a draw of two scenes gives CHAIR_i 1 (odds 1/4),
    1/2 (1/2) or 0 (1/4): the interval is [0, 1]; no t-interval with one run."""
    result = bootstrap_intervals([chair_stats([1, 0], [1, 1])])
    assert result["ci"]["chair_i"] == [0.0, 1.0]
    assert result["t_ci"] is None
    assert "one run" in result["method"]


def test_the_t_interval_of_three_seeds():
    """Seeds at CHAIR_i 0.1, 0.2, 0.3 (constant per scene): mean 0.2, sd 0.1, half-width
    4.3027 * 0.1 / sqrt(3) = 0.248417: [-0.048417, 0.448417]."""
    runs = [chair_stats([k] * 5, [10] * 5) for k in (1, 2, 3)]
    result = bootstrap_intervals(runs)
    assert result["mean"]["chair_i"] == pytest.approx(0.2)
    assert result["t_ci"]["chair_i"] == pytest.approx([-0.048417, 0.448417], abs=1e-6)


def test_the_interval_holds_the_mean_and_widens_with_the_seed_spread():
    """Three seeds whose per-scene counts vary, moved apart by 0, 1, 2 and 4 hallucinated
    mentions per scene: the interval always holds the mean, and widens as they move apart."""
    rng = np.random.default_rng(7)
    mentions = rng.integers(5, 10, size=200).astype(float)
    base = np.floor(mentions * rng.random(200) * 0.5)
    widths = []
    for spread in (0, 1, 2, 4):
        runs = [
            chair_stats(list(base + spread * k), list(mentions + 2 * spread)) for k in (0, 1, 2)
        ]
        result = bootstrap_intervals(runs)
        low, high = result["ci"]["chair_i"]
        assert low < result["mean"]["chair_i"] < high
        widths.append(high - low)
    assert widths == sorted(widths) and widths[0] < widths[-1] / 4


def test_every_arm_and_seed_count_sees_the_same_scene_draws():
    """Arm A: one run X; arm B: runs X and X with every count doubled (the same CHAIR_i on any
    set of scenes). With the same scene draw in every replicate, whichever runs B draws, each
    replicate's value is A's: the intervals are equal."""
    rng = np.random.default_rng(3)
    mentions = rng.integers(1, 6, size=50).astype(float)
    wrong = np.floor(mentions * rng.random(50))
    x = chair_stats(list(wrong), list(mentions))
    doubled = chair_stats(list(2 * wrong), list(2 * mentions))
    a, b = bootstrap_intervals([x]), bootstrap_intervals([x, doubled])
    assert b["ci"]["chair_i"] == pytest.approx(a["ci"]["chair_i"], rel=1e-12)
    assert a["ci"]["chair_i"][0] < a["ci"]["chair_i"][1]  # the scenes do vary


def test_worlds_pool_as_the_seed_level_each_with_its_own_scenes():
    """A full run: world 0's run at CHAIR_i 0.2 on every scene, world 1's (other scenes, more of
    them) at 0.4. The runs are the seed level: [0.2, 0.4], mean 0.3. Two runs of one world must
    judge the same scenes."""
    w0, w1 = chair_stats([1] * 4, [5] * 4, "a"), chair_stats([2] * 6, [5] * 6, "b")
    result = bootstrap_intervals([w0, w1], worlds=[0, 1])
    assert result["ci"]["chair_i"] == [0.2, 0.4]
    assert result["mean"]["chair_i"] == pytest.approx(0.3)
    assert result["scenes"] == 10 and "within each world" in result["method"]
    with pytest.raises(ValueError, match="run 1 and run 0 judge different held-out scenes"):
        bootstrap_intervals([w0, w1], worlds=[0, 0])


def test_t_quantiles_match_the_t_distribution():
    """Each tabulated t_{0.975, df} (and the expansion past the table) has t-CDF 0.975, the CDF
    integrated here from the t density."""

    def t_cdf(t: float, df: int) -> float:
        x = np.linspace(0.0, t, 200_001)
        log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        density = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
        return 0.5 + float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(x)))

    for df in [*range(1, len(T_975) + 1), 31, 40, 100, 1000]:
        assert t_cdf(t_quantile(df), df) == pytest.approx(0.975, abs=5e-6), df
    assert t_quantile(2) == 4.3027
