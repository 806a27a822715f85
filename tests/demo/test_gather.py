"""The demo's arm summaries: every arm's seeds gathered with their intervals read from the eval
folders `bpo eval` wrote (OUT/eval/{arm}-s{seed}), and a full run's worlds pooled."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
from demo_eval_helpers import write_eval

from bpo.demo.arms import summarize
from bpo.demo.intervals import arm_intervals
from bpo.demo.run import gather_arms, pool_worlds
from bpo.shapeworld.export import write_llava_dataset
from bpo.shapeworld.world import Scene, ShapeObject, WorldConfig, caption

SCENES = [
    Scene((ShapeObject("circle", "red", 0, 0), ShapeObject("square", "blue", 1, 1)), seed=1),
    Scene((ShapeObject("triangle", "green", 2, 2),), seed=2),
    Scene((ShapeObject("diamond", "yellow", 3, 3),), seed=3),
]
# Per arm and seed, one answer per scene. sft seed 0: a cross in scene 0, 1 of its 5 mentions;
# seed 1: a bar in scene 1, 1 of 6 (a diamond twice): mean CHAIR_i (1/5 + 1/6) / 2 = 11/60.
# The base: a cross and a bar, 2 of 5 mentions.
ANSWERS = {
    "base": ["a red circle and a cross.", "a green triangle and a bar.", "a yellow diamond."],
    "sft-s0": ["a red circle, a cross and a blue square.", "a green triangle.", "a diamond."],
    "sft-s1": [
        caption(SCENES[0]),
        "a green triangle and a bar.",
        "a yellow diamond and a yellow diamond.",
    ],
    "bpo-s0": [caption(s) for s in SCENES],
    "bpo-s1": [caption(s) for s in SCENES],
}


def finished(metrics: dict) -> Future:
    done: Future = Future()
    done.set_result(metrics)
    return done


def write_world(out) -> dict[str, dict]:
    """OUT/data/held-out and OUT/eval/{name} for every model of ANSWERS; {name: metrics}."""
    held_out = out / "data" / "held-out"
    write_llava_dataset(SCENES, WorldConfig(), held_out, with_questions=False)
    return {name: write_eval(out / "eval" / name, held_out, a) for name, a in ANSWERS.items()}


def test_gather_arms_attaches_each_arm_s_intervals(tmp_path):
    metrics = write_world(tmp_path)
    trained = {
        arm: [
            (seed, finished(metrics[f"{arm}-s{seed}"]), tmp_path / "eval" / f"{arm}-s{seed}")
            for seed in (0, 1)
        ]
        for arm in ("sft", "bpo")
    }
    arms = gather_arms(trained, lambda _: None, lambda _: None, tmp_path)
    sft = arms["sft"]
    assert [run["seed"] for run in sft["per_seed"]] == [0, 1]
    assert [run["eval"] for run in sft["per_seed"]] == ["eval/sft-s0", "eval/sft-s1"]
    assert sft["chair_i"] == pytest.approx(11 / 60)
    assert sft["intervals"]["mean"]["chair_i"] == pytest.approx(11 / 60)
    folders = [tmp_path / "eval" / f"sft-s{seed}" for seed in (0, 1)]
    assert sft["intervals"] == arm_intervals(folders)
    assert arms["bpo"]["intervals"]["ci"]["chair_i"] == [0.0, 0.0]
    # The base's entry, as run_world makes it: its one run, the scene-only bootstrap.
    base = summarize([metrics["base"]], [tmp_path / "eval" / "base"])
    assert base["intervals"]["runs"] == 1 and base["intervals"]["t_ci"] is None
    assert base["intervals"]["mean"]["chair_i"] == pytest.approx(2 / 5)


def test_pool_worlds_reads_every_world_s_folders(tmp_path):
    """Two worlds: each arm pools 2 x 2 runs (the base 2 x 1), with intervals over both worlds'
    folders; an arm one world skipped pools the other's runs only."""
    worlds = {}
    for w in (3, 4):
        out = tmp_path / f"world{w}"
        metrics = write_world(out)
        arms = {"base": summarize([metrics["base"]], [out / "eval" / "base"])}
        trained = {
            arm: [
                (seed, finished(metrics[f"{arm}-s{seed}"]), out / "eval" / f"{arm}-s{seed}")
                for seed in (0, 1)
            ]
            for arm in (("sft", "bpo") if w == 3 else ("sft",))
        }
        arms.update(gather_arms(trained, lambda _: None, lambda _: None, out))
        worlds[w] = {"arms": arms}
    pooled = pool_worlds(worlds, tmp_path)
    sft = pooled["sft"]
    assert [(r["world"], r["seed"]) for r in sft["per_seed"]] == [(3, 0), (3, 1), (4, 0), (4, 1)]
    folders = [tmp_path / f"world{w}" / "eval" / f"sft-s{s}" for w in (3, 4) for s in (0, 1)]
    assert sft["intervals"] == arm_intervals(folders, [3, 3, 4, 4])
    assert sft["intervals"]["scenes"] == 2 * len(SCENES)
    assert pooled["base"]["intervals"]["runs"] == 2
    assert pooled["bpo"]["intervals"]["runs"] == 2  # world 4 skipped it
