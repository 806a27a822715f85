"""The shipped rounds recipes parse into IterateConfig and keep the single-round recipe's method."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from bpo.cli import _recipe_args
from bpo.rounds.config import IterateConfig
from bpo.rounds.stages import check_stages

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ROUNDS_RECIPES = sorted(CONFIGS.glob("*-bpo-rounds.yaml"))
SINGLE = CONFIGS / "llava-1.5-7b-bpo.yaml"
PLANNED_PAIRS = 200_000  # docs/reproduce-paper.md's planning figure, named in the recipes


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def parse(path: Path) -> IterateConfig:
    """The recipe as `bpo iterate --recipe PATH` reads it: every key known, every type right."""
    args = _recipe_args(["iterate", "--recipe", str(path)])
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--run", type=IterateConfig)
    parser.add_argument("--out", type=str)
    return parser.instantiate(parser.parse_object(json.loads(args[2]))).run


def test_both_rounds_recipes_are_shipped():
    assert [p.name for p in ROUNDS_RECIPES] == [
        "llava-1.5-7b-bpo-rounds.yaml",
        "qwen2.5-vl-7b-bpo-rounds.yaml",
    ]


@pytest.mark.parametrize("path", ROUNDS_RECIPES, ids=lambda p: p.stem)
def test_rounds_recipe_parses_and_passes_every_stage_check(path):
    run = parse(path)
    check_stages(run)  # the checks `bpo iterate` makes before round 1
    assert set(load(path)) == {"rounds", "bootstrap", "train", "eval"}
    assert (run.rounds.rounds, run.rounds.select_metric) == (3, "object_halbench.chair_i")
    assert (run.rounds.select_mode, run.rounds.inject_model) == ("min", "base")
    assert run.out == load(path)["rounds"]["out"] == f"runs/{path.stem}"
    assert run.bootstrap.model.name_or_path == run.train.model.name_or_path
    assert run.train.lora.merge and run.eval.judge is None  # no judge cost per round


def test_llava_rounds_recipe_is_the_single_round_recipe_in_three_rounds():
    """The same negatives and DPO settings, plus the image-contrast term; per round 1/3 of the single recipe's steps (2 epochs
    of 200,000 pairs at 32 a step: 12,500 steps; 4167 a round, rounded up), and 32 pairs a step
    in one process (4 x 8 accumulated) as the single recipe's 4 a GPU on 8 GPUs."""
    rounds, single = load(CONFIGS / "llava-1.5-7b-bpo-rounds.yaml"), load(SINGLE)
    boot = {k: v for k, v in single["bootstrap"]["run"].items() if k != "out"}
    assert rounds["bootstrap"]["run"] == boot
    per_round, whole = rounds["train"]["run"], dict(single["train"]["run"])
    for key in ("pairs", "out"):  # each round's own folders
        del whole[key]
    changed = {"max_steps", "grad_accum", "lora", "loss"}
    assert {k: v for k, v in per_round.items() if k not in changed} == {
        k: v for k, v in whole.items() if k not in changed
    }
    assert per_round["lora"] == {**whole["lora"], "merge": True}
    image_term = {
        "image_weight": 1.0,
        "image_beta": None,
        "image_noise_step": 500,
        "image_schedule": "sigmoid",
    }
    assert per_round["loss"] == {**whole["loss"], **image_term}
    total = whole["epochs"] * PLANNED_PAIRS / (whole["batch_size"] * whole["grad_accum"] * 8)
    assert total == 12_500 and per_round["max_steps"] == math.ceil(total / 3) == 4167
    assert per_round["batch_size"] * per_round["grad_accum"] == 32
    benchmarks = single["eval"]["run"]["benchmarks"]
    assert rounds["eval"]["run"]["benchmarks"] == benchmarks[:2]  # object_halbench, pope


def test_qwen_rounds_recipe_differs_from_llavas_only_in_the_model_and_batch():
    llava = load(CONFIGS / "llava-1.5-7b-bpo-rounds.yaml")
    qwen = load(CONFIGS / "qwen2.5-vl-7b-bpo-rounds.yaml")
    qwen_model = load(CONFIGS / "models" / "qwen2.5-vl-7b.yaml")
    for section in ("bootstrap", "train", "eval"):
        model = qwen[section]["run"]["model"]
        assert model["name_or_path"] == qwen_model["name_or_path"]
        assert model["attn_implementation"] == qwen_model["attn_implementation"]
    assert qwen["train"]["run"] == {**llava["train"]["run"], "model": qwen["train"]["run"]["model"]}
    same = {k for k in llava["bootstrap"]["run"] if k not in ("model", "batch_size")}
    assert {k: qwen["bootstrap"]["run"][k] for k in same} == {
        k: llava["bootstrap"]["run"][k] for k in same
    }
    assert qwen["eval"]["run"]["benchmarks"] == llava["eval"]["run"]["benchmarks"]
