"""The demo's arms beyond the paper (slow tier): BPO with the image-contrast term and BPO in
on-policy rounds, each run through the product's own stages (`bpo train`, `bpo iterate`)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml
from test_demo import mini_config

from bpo.data import read_pairs
from bpo.demo.claim import beyond, interval_of
from bpo.demo.config import ArmsConfig
from bpo.demo.run import run_demo
from bpo.demo.stages import metrics_of


@pytest.fixture(scope="module")
def beyond_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("beyond")
    cfg = replace(
        mini_config(),
        training=ArmsConfig(
            arms=("sft", "bpo", "bpo_image", "bpo_rounds"),
            seeds=(0,),
            ablation_seeds=(0,),
            steps=2,
            batch_size=4,
            rounds=2,
        ),
    )
    return out, run_demo(cfg, out, log=lambda _: None)


def weakened(store) -> dict[str, str]:
    return {p.id + str(p.meta.get("noise_step")): p.rejected for p in read_pairs(store)}


@pytest.mark.slow
def test_each_round_is_a_bpo_iterate_round_and_reported(beyond_run):
    """Two rounds of one step each (the arm's 2 steps split evenly); round 2 starts from round
    1's checkpoint; each round's row holds the metrics its own `bpo eval` wrote; round 1's
    weakened negatives are the demo's own (the same base model, the same keyed seeds)."""
    out, results = beyond_run
    assert [a for a in results["arms"] if a.startswith("bpo_rounds")] == [
        "bpo_rounds_r1",
        "bpo_rounds_r2",
    ]
    folder = out / "rounds" / "bpo_rounds-s0"
    summary = json.loads((folder / "rounds.json").read_text())
    first, second = summary["rounds"]
    assert second["policy"] == first["checkpoint"]
    for k in (1, 2):
        trained = json.loads((folder / f"round-{k}" / "train" / "summary.json").read_text())
        assert trained["steps"] == 1
        evaluated = json.loads((folder / f"round-{k}" / "eval" / "results.json").read_text())
        row = results["arms"][f"bpo_rounds_r{k}"]
        assert row["per_seed"][0]["chair_i"] == metrics_of(evaluated)["chair_i"]
        assert row["per_seed"][0]["eval"] == f"rounds/bpo_rounds-s0/round-{k}/eval"
    demo_negatives = {k: v for k, v in weakened(out / "pairs").items() if not k.endswith("None")}
    round_one = weakened(folder / "round-1" / "pairs")
    assert demo_negatives and {k: round_one[k] for k in demo_negatives} == demo_negatives
    written = yaml.safe_load((out / "configs" / "iterate-bpo_rounds-s0.yaml").read_text())
    assert written["run"]["train"]["max_steps"] == 1


@pytest.mark.slow
def test_the_image_arm_trains_with_the_term_and_the_beyond_entry_compares(beyond_run):
    """bpo_image is `bpo train` with loss.image_weight set and its image metrics logged; each
    beyond entry says whether its interval lies below single-round BPO's and SFT's means."""
    out, results = beyond_run
    config = yaml.safe_load((out / "configs" / "train-bpo_image-s0.yaml").read_text())
    assert config["run"]["loss"]["image_weight"] == 1.0
    plain = yaml.safe_load((out / "configs" / "train-bpo-s0.yaml").read_text())
    assert plain["run"]["loss"]["image_weight"] == 0.0
    lines = (out / "train" / "bpo_image-s0" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert any("rewards/image_margin" in line for line in logged)
    found = results["beyond"]
    assert found == beyond(results["arms"])
    assert set(found) == {"bpo_image", "bpo_rounds_r1", "bpo_rounds_r2"}
    for name, entry in found.items():
        interval = interval_of(results["arms"][name], "chair_i")
        assert entry["beats_bpo"] == (interval[1] < results["arms"]["bpo"]["chair_i"])
        assert entry["beats_sft"] == (interval[1] < results["arms"]["sft"]["chair_i"])
