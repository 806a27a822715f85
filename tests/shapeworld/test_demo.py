"""`bpo demo` end to end on a miniature configuration (slow tier)."""

from __future__ import annotations

import json

import pytest
import torch

from bpo.models.load import load_model_and_processor
from bpo.shapeworld.arms import ArmsConfig
from bpo.shapeworld.demo import (
    DemoConfig,
    StageConfig,
    build_world,
    check_base,
    describe,
    pixel_tensor,
    run_demo,
)
from bpo.shapeworld.metrics import hallucination_metrics
from bpo.shapeworld.negatives import NegativesConfig
from bpo.shapeworld.world import CAPTION_PROMPTS, caption


def mini_config() -> DemoConfig:
    """Every stage runs, each for a handful of steps."""
    return DemoConfig(
        corpus_size=600,
        tower_scenes=64,
        align_scenes=64,
        eval_scenes=40,
        lm=StageConfig(6, 16, 3e-3),
        tower=StageConfig(4, 16, 2e-3),
        projector=StageConfig(4, 16, 3e-3),
        full=StageConfig(4, 16, 2e-3),
        max_new_tokens=12,
        eval_batch_size=16,
        negatives=NegativesConfig(
            scenes=10, noise_steps=(500, 900), max_new_tokens=8, batch_size=4
        ),
        training=ArmsConfig(
            arms=("sft", "bpo", "bpo_inject"),
            seeds=(0, 1),
            ablation_seeds=(1,),
            steps=3,
            batch_size=4,
        ),
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    logs: list[str] = []
    results = run_demo(mini_config(), out, log=logs.append)
    return out, results, logs


@pytest.mark.slow
def test_results_json_matches_answers_file(demo_run):
    """The metrics written are those of the answers written, recomputed from the exact scenes."""
    out, results, _ = demo_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["arms"] == results["arms"]
    rows = [json.loads(line) for line in (out / "answers-base.jsonl").read_text().splitlines()]
    scenes = build_world(mini_config()).eval_scenes
    assert [r["truth"] for r in rows] == [caption(s) for s in scenes]
    recomputed = hallucination_metrics([r["answer"] for r in rows], scenes)
    written = on_disk["arms"]["base"]
    assert {k: written[k] for k in recomputed} == pytest.approx(recomputed)
    assert on_disk["checks"]["base"] == check_base(recomputed)
    assert on_disk["config"]["eval_scenes"] == 40
    assert set(on_disk["versions"]) >= {"bpo", "torch", "transformers", "python"}


@pytest.mark.slow
def test_saved_base_model_reproduces_the_answers(demo_run):
    """OUT/base loads through from_pretrained and gives the same greedy answers."""
    out, _, _ = demo_run
    model, processor = load_model_and_processor(str(out / "base"), dtype="float32", device="cpu")
    cfg = mini_config()
    scenes = build_world(cfg).eval_scenes[:8]
    pixels = pixel_tensor(processor, scenes, cfg.world)
    answers = describe(model, processor, pixels, cfg, CAPTION_PROMPTS[0])
    rows = [json.loads(line) for line in (out / "answers-base.jsonl").read_text().splitlines()]
    assert answers == [r["answer"] for r in rows[:8]]


@pytest.mark.slow
def test_rerun_uses_the_cached_pretraining_and_is_deterministic(demo_run, tmp_path):
    """A second run in the same folder skips pretraining and writes identical metrics."""
    out, first, logs = demo_run
    assert not any("cached" in line for line in logs)
    again_logs: list[str] = []
    torch.manual_seed(123)  # global RNG state must not matter: every stage seeds itself
    second = run_demo(mini_config(), out, log=again_logs.append)
    assert any("cached" in line for line in again_logs)
    assert second["arms"] == first["arms"]


@pytest.mark.slow
def test_pope_scores_are_those_of_the_answers_given(demo_run):
    """POPE in results.json equals POPE recomputed by asking the saved model each question."""
    from bpo.evaluate.pope import (
        build_pope_questions,
        co_occurrence,
        object_frequency,
        parse_yes_no,
        pope_metrics,
    )

    out, results, _ = demo_run
    cfg = mini_config()
    world = build_world(cfg)
    model, processor = load_model_and_processor(
        str(out / "base"), dtype="float32", device="cpu", attn_implementation="eager"
    )
    pixels = pixel_tensor(processor, world.eval_scenes, cfg.world)
    corpus = [s.shapes for s in world.corpus_scenes]
    questions = build_pope_questions(
        [str(i) for i in range(len(world.eval_scenes))],
        [s.shapes for s in world.eval_scenes],
        "adversarial",
        cfg.pope_per_image,
        cfg.seed,
        categories=cfg.world.shapes,
        frequency=object_frequency(corpus),
        pairs=co_occurrence(corpus),
    )
    # One question at a time: the naive computation the batched one must equal.
    predictions = [
        parse_yes_no(
            describe(model, processor, pixels[int(q.image)][None], cfg, q.text, max_new_tokens=6)[0]
        )
        for q in questions
    ]
    expected = pope_metrics(predictions, [q.label for q in questions])
    base = results["arms"]["base"]
    assert base["pope_adversarial_accuracy"] == pytest.approx(expected["accuracy"])
    assert base["pope_adversarial_f1"] == pytest.approx(expected["f1"])
    assert base["pope_adversarial_yes_ratio"] == pytest.approx(expected["yes_ratio"])


@pytest.mark.slow
def test_bootstrapped_pairs_and_their_statistics(demo_run):
    """OUT/pairs holds gold-chosen pairs per method, and the statistics are those of its negatives."""
    from bpo.data import read_pairs
    from bpo.shapeworld.negatives import negative_stats

    out, results, _ = demo_run
    scenes = build_world(mini_config()).align_scenes[:10]
    pairs = list(read_pairs(out / "pairs"))
    by_id = {f"sw{i:06d}": s for i, s in enumerate(scenes)}
    ratio = mini_config().negatives.max_length_ratio
    for t in (500, 900):
        weak = [p for p in pairs if p.source == "weaken" and p.meta["noise_step"] == t]
        kept = [by_id[p.id] for p in weak]  # the length filter may drop some scenes' negatives
        assert [p.chosen for p in weak] == [caption(s) for s in kept]
        assert ratio is None or all(p.rejected_tokens <= ratio * p.chosen_tokens for p in weak)
        stats = negative_stats([p.rejected for p in weak], kept)
        assert results["negatives"][f"weaken_t{t}"] == pytest.approx(stats)
    injected = [p for p in pairs if p.source == "inject"]
    inject_stats = results["negatives"]["inject"]
    assert inject_stats["accepted"] == len(injected)
    assert inject_stats["accepted"] + sum(inject_stats["rejected"].values()) == 10
    assert all(p.chosen == caption(by_id[p.id]) != p.rejected for p in injected)
    assert (out / "images" / "sw000000.png").exists()


@pytest.mark.slow
def test_trained_arms_are_written_per_seed_with_their_means(demo_run):
    """Every arm x seed has its answers file; its metrics are those answers' metrics, and the
    arm's top-level numbers are the means over the seeds."""
    out, _, _ = demo_run
    scenes = build_world(mini_config()).eval_scenes
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["seeds"] == [0, 1]
    assert list(on_disk["arms"]) == ["base", "sft", "bpo", "bpo_inject"]
    for arm, seeds in (("sft", [0, 1]), ("bpo", [0, 1]), ("bpo_inject", [1])):
        runs = on_disk["arms"][arm]["per_seed"]
        assert [r["seed"] for r in runs] == seeds
        for run in runs:
            path = out / f"answers-{arm}-s{run['seed']}.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            recomputed = hallucination_metrics([r["answer"] for r in rows], scenes)
            assert {k: run[k] for k in recomputed} == pytest.approx(recomputed)
            history = (out / "train" / f"{arm}-s{run['seed']}.jsonl").read_text().splitlines()
            assert [json.loads(line)["step"] for line in history] == [1, 2, 3]
        mean = sum(r["chair_i"] for r in runs) / len(runs)
        assert on_disk["arms"][arm]["chair_i"] == pytest.approx(mean)
    claim = on_disk["claim"]
    bpo, sft = on_disk["arms"]["bpo"], on_disk["arms"]["sft"]
    assert claim["checks"]["bpo_chair_i<sft_chair_i"] == (bpo["chair_i"] < sft["chair_i"])
    assert claim["holds"] == all(claim["checks"].values())


@pytest.mark.slow
def test_dpo_arms_start_at_log_two_and_sft_has_no_rewards(demo_run):
    """At step 1 the policy is the reference: DPO's loss is log 2 (+ the RPO term, whose NLL is
    logged), SFT logs no reward metrics at all."""
    import math

    out, _, _ = demo_run
    first = json.loads((out / "train" / "bpo-s0.jsonl").read_text().splitlines()[0])
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    alpha = mini_config().training.rpo_alpha
    assert first["loss"] == pytest.approx(math.log(2) + alpha * first["nll"], rel=1e-5)
    sft = json.loads((out / "train" / "sft-s0.jsonl").read_text().splitlines()[0])
    assert "rewards/margins" not in sft


@pytest.mark.slow
def test_the_demo_writes_its_report(demo_run):
    """report.html and report.md exist, name every arm, and the page links the pair viewer."""
    out, results, _ = demo_run
    html = (out / "report.html").read_text()
    markdown = (out / "report.md").read_text()
    for arm in results["arms"]:
        assert arm in html and arm in markdown
    assert 'href="pairs.html"' in html and (out / "pairs.html").exists()


@pytest.mark.slow
def test_full_run_pools_worlds_and_sweeps_the_noise_step(tmp_path):
    """--full: one folder per world seed, each with a BPO arm per noise step and every arm on
    every seed; results.json pools each arm's runs over worlds x seeds (means of those runs)."""
    from dataclasses import replace

    cfg = replace(
        mini_config(),
        full_run=True,
        full_world_seeds=(0, 1),
        full_noise_steps=(300, 900),
        training=ArmsConfig(arms=("sft", "bpo", "bpo_inject"), seeds=(0, 1), steps=2, batch_size=4),
    )
    results = run_demo(cfg, tmp_path, log=lambda _: None)
    assert results["world_seeds"] == [0, 1]
    arms = ["base", "sft", "bpo", "bpo_inject", "bpo_weaken_t300", "bpo_weaken_t900"]
    assert list(results["arms"]) == arms
    for world in (0, 1):
        per_world = json.loads((tmp_path / f"world{world}" / "results.json").read_text())
        assert set(per_world["negatives"]) == {"weaken_t300", "weaken_t900", "inject"}
        assert [r["seed"] for r in per_world["arms"]["bpo_inject"]["per_seed"]] == [0, 1]
    runs = results["arms"]["bpo_weaken_t300"]["per_seed"]
    assert [(r["world"], r["seed"]) for r in runs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    mean = sum(r["chair_i"] for r in runs) / 4
    assert results["arms"]["bpo_weaken_t300"]["chair_i"] == pytest.approx(mean)
    assert (tmp_path / "report.html").exists() and (tmp_path / "report.md").exists()


@pytest.mark.slow
def test_an_arm_without_pairs_is_skipped_and_said(tmp_path):
    """A length filter that drops every weakened negative leaves bpo_weaken nothing to train on:
    the run logs it, skips that arm and finishes the others (it does not crash hours in)."""
    from dataclasses import replace

    cfg = mini_config()
    cfg = replace(
        cfg,
        negatives=replace(cfg.negatives, max_length_ratio=0.01),
        training=ArmsConfig(arms=("sft", "bpo_weaken"), seeds=(0,), steps=1, batch_size=4),
    )
    logs: list[str] = []
    results = run_demo(cfg, tmp_path, log=logs.append)
    assert list(results["arms"]) == ["base", "sft"]
    assert any("bpo_weaken: no pairs to train on" in line for line in logs)
