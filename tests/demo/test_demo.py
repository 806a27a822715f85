"""`bpo demo` end to end on a miniature configuration (slow tier): the numbers it reports are
those of the product's own stages, run again from the configs it wrote."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import yaml

from bpo.cli import main
from bpo.data import read_manifest, read_pairs
from bpo.demo.base import build_world
from bpo.demo.claim import check_base
from bpo.demo.config import ArmsConfig, DemoConfig, NegativesConfig, StageConfig
from bpo.demo.run import run_demo
from bpo.evaluate.pope import (
    build_pope_questions,
    co_occurrence,
    object_frequency,
    parse_yes_no,
    pope_metrics,
)
from bpo.evaluate.shapeworld import hallucination_metrics
from bpo.generate import Decoding, GenerationRequest, TransformersGenerator
from bpo.models.load import load_model_and_processor
from bpo.shapeworld.world import CAPTION_PROMPTS, caption, render


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
            scenes=12, noise_steps=(500, 900), max_new_tokens=8, batch_size=4
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


def read_answers(path) -> dict[str, str]:
    return {
        (record := json.loads(line))["question_id"]: record["answer"]
        for line in path.read_text().splitlines()
    }


def base_model(out):
    return load_model_and_processor(
        str(out / "base"), dtype="float32", device="cpu", attn_implementation="eager"
    )


@pytest.mark.slow
def test_results_json_matches_the_answers_bpo_eval_wrote(demo_run):
    """The base's metrics are those of `bpo eval`'s answers, recomputed here from the exact
    scenes the demo sampled."""
    out, results, _ = demo_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["arms"] == results["arms"]
    scenes = build_world(mini_config()).eval_scenes
    answers = read_answers(out / "eval" / "base" / "shapeworld_chair" / "answers.jsonl")
    assert list(answers) == [f"sw_{i:06d}" for i in range(len(scenes))]
    recomputed = hallucination_metrics(list(answers.values()), scenes)
    written = on_disk["arms"]["base"]
    assert {k: written[k] for k in recomputed} == pytest.approx(recomputed)
    assert on_disk["checks"]["base"] == check_base({**written, **recomputed})  # POPE: written
    assert on_disk["config"]["eval_scenes"] == 40
    assert set(on_disk["versions"]) >= {"bpo", "torch", "transformers", "python"}


@pytest.mark.slow
def test_bpo_eval_from_the_written_config_gives_the_base_numbers(demo_run, tmp_path, capsys):
    """`bpo eval --config OUT/configs/eval-base.yaml` in a fresh folder answers every question
    again from OUT/base and gives exactly the base's CHAIR and POPE of results.json."""
    out, results, _ = demo_run
    main(["eval", "--config", str(out / "configs" / "eval-base.yaml"), "--out", str(tmp_path)])
    capsys.readouterr()
    again = json.loads((tmp_path / "results.json").read_text())["benchmarks"]
    base = results["arms"]["base"]
    chair = again["shapeworld_chair"]
    assert {k: base[k] for k in chair} == pytest.approx(chair)
    for strategy in ("random", "popular", "adversarial"):
        for name in ("accuracy", "f1", "yes_ratio"):
            expected = again["shapeworld_pope"][strategy][name]
            assert base[f"pope_{strategy}_{name}"] == pytest.approx(expected)


@pytest.mark.slow
def test_saved_base_model_reproduces_the_answers_one_at_a_time(demo_run):
    """OUT/base loads through from_pretrained and gives, one unbatched request at a time, the
    greedy captions the batched evaluation wrote."""
    out, _, _ = demo_run
    model, processor = base_model(out)
    from PIL import Image

    scenes = build_world(mini_config()).eval_scenes[:8]
    generator = TransformersGenerator(model, processor, batch_size=1)
    request = [{"role": "user", "content": CAPTION_PROMPTS[0]}]
    alone = [
        generator.generate(
            [GenerationRequest(request, Image.fromarray(render(s, mini_config().world)))],
            Decoding(mini_config().max_new_tokens),
        )[0].text
        for s in scenes
    ]
    written = read_answers(out / "eval" / "base" / "shapeworld_chair" / "answers.jsonl")
    assert alone == list(written.values())[:8]


@pytest.mark.slow
def test_rerun_uses_the_cached_pretraining_and_is_deterministic(demo_run):
    """A second run in the same folder skips pretraining and writes identical metrics."""
    out, first, logs = demo_run
    assert not any("cached" in line for line in logs)
    again_logs: list[str] = []
    torch.manual_seed(123)  # global RNG state must not matter: every stage seeds itself
    second = run_demo(mini_config(), out, log=again_logs.append)
    assert any("cached" in line for line in again_logs)
    assert second["arms"] == first["arms"]
    assert second["negatives"] == first["negatives"]


@pytest.mark.slow
def test_pope_scores_are_those_of_the_answers_given(demo_run):
    """POPE in results.json equals POPE recomputed by asking the saved model each question alone,
    the negatives ranked by the text corpus's statistics."""
    from PIL import Image

    out, results, _ = demo_run
    cfg = mini_config()
    world = build_world(cfg)
    model, processor = base_model(out)
    corpus = [s.shapes for s in world.corpus_scenes]
    questions = build_pope_questions(
        [f"sw_{i:06d}" for i in range(len(world.eval_scenes))],
        [s.shapes for s in world.eval_scenes],
        "adversarial",
        cfg.pope_per_image,
        cfg.seed,
        categories=cfg.world.shapes,
        frequency=object_frequency(corpus),
        pairs=co_occurrence(corpus),
    )
    generator = TransformersGenerator(model, processor, batch_size=1)
    # One question at a time: the naive computation the batched one must equal.
    predictions = []
    for q in questions:
        scene = world.eval_scenes[int(q.image.removeprefix("sw_"))]
        image = Image.fromarray(render(scene, cfg.world))
        request = GenerationRequest([{"role": "user", "content": q.text}], image)
        predictions.append(parse_yes_no(generator.generate([request], Decoding(6))[0].text))
    expected = pope_metrics(predictions, [q.label for q in questions])
    base = results["arms"]["base"]
    assert base["pope_adversarial_accuracy"] == pytest.approx(expected["accuracy"])
    assert base["pope_adversarial_f1"] == pytest.approx(expected["f1"])
    assert base["pope_adversarial_yes_ratio"] == pytest.approx(expected["yes_ratio"])


@pytest.mark.slow
def test_the_pair_store_is_what_bpo_bootstrap_writes(demo_run, tmp_path, capsys):
    """`bpo bootstrap --config OUT/configs/bootstrap.yaml` into a fresh folder, from OUT/base on
    disk, writes the demo's store record for record, rejects included."""
    out, _, _ = demo_run
    again = tmp_path / "pairs"
    main(["bootstrap", "--config", str(out / "configs" / "bootstrap.yaml"), "--out", str(again)])
    capsys.readouterr()
    assert [p.to_json() for p in read_pairs(again)] == [
        p.to_json() for p in read_pairs(out / "pairs")
    ]
    assert (again / "bad_records.jsonl").read_text() == (
        out / "pairs" / "bad_records.jsonl"
    ).read_text()
    ours, theirs = read_manifest(out / "pairs"), read_manifest(again)
    assert ours["counts"] == theirs["counts"] and ours["config"] == theirs["config"]


@pytest.mark.slow
def test_bootstrapped_pairs_and_their_statistics(demo_run):
    """OUT/pairs holds gold-chosen pairs per source and noise step; the statistics are those of
    its negatives against the exact scenes, and every candidate is a pair or a counted reject."""
    out, results, _ = demo_run
    cfg = mini_config()
    scenes = build_world(cfg).align_scenes[: cfg.negatives.scenes]
    by_id = {f"sw_{i:06d}": s for i, s in enumerate(scenes)}
    records = json.loads((out / "data" / "align" / "data.json").read_text())
    asked = {r["id"] for r in records if r["conversations"][-1]["value"] != caption(by_id[r["id"]])}
    assert 0 < len(asked) < len(scenes)  # existence_share 0.3 of 12 scenes: some of each
    pairs = list(read_pairs(out / "pairs"))
    ratio = cfg.negatives.max_length_ratio
    existence = results["existence_negatives"]
    for t in cfg.negatives.noise_steps:
        weak = [p for p in pairs if p.source == "weaken" and p.meta["noise_step"] == t]
        assert all(p.rejected_tokens <= ratio * p.chosen_tokens for p in weak)
        described = [p for p in weak if p.id not in asked]
        kept = [by_id[p.id] for p in described]  # the length filter may drop some negatives
        assert [p.chosen for p in described] == [caption(s) for s in kept]
        stats = results["negatives"][f"weaken_t{t}"]
        metrics = hallucination_metrics([p.rejected for p in described], kept)
        assert stats["negatives"] == len(described)
        assert stats["with_hallucination"] == pytest.approx(metrics["chair_s"])
        assert stats["chair_i"] == pytest.approx(metrics["chair_i"])
        assert stats["negatives"] + sum(stats["rejected"].values()) == len(scenes) - len(asked)
        questions = [p for p in weak if p.id in asked]
        flipped = [parse_yes_no(p.rejected) != parse_yes_no(p.chosen) for p in questions]
        entry = existence[f"weaken_t{t}"]
        assert entry["negatives"] == len(questions)
        assert entry["wrong_answer"] == pytest.approx(sum(flipped) / max(1, len(flipped)))
        assert entry["negatives"] + sum(entry["rejected"].values()) == len(asked)
    injected = [p for p in pairs if p.source == "inject"]
    inject_stats = results["negatives"]["inject"]
    assert inject_stats["accepted"] == len(injected)
    assert inject_stats["negatives"] + existence["inject"]["negatives"] == len(injected)
    rejects = sum(inject_stats["rejected"].values()) + sum(existence["inject"]["rejected"].values())
    assert inject_stats["accepted"] + rejects == len(scenes)
    for p in injected:
        if p.id in asked:  # the flipped answer: "ring yes." -> "ring no."
            assert p.rejected.split()[0] == p.chosen.split()[0]
            assert parse_yes_no(p.rejected) != parse_yes_no(p.chosen)
        else:
            assert p.chosen == caption(by_id[p.id]) != p.rejected
    assert (out / "data" / "align" / "images" / "sw_000000.png").exists()


@pytest.mark.slow
def test_trained_arms_are_bpo_train_runs_with_their_means(demo_run):
    """Every arm x seed is a `bpo train` run (its config, log and model on disk) and a `bpo eval`
    run; its metrics are its answers' metrics, and the arm's numbers the means over its seeds."""
    out, _, _ = demo_run
    scenes = build_world(mini_config()).eval_scenes
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["seeds"] == [0, 1]
    assert list(on_disk["arms"]) == ["base", "sft", "bpo", "bpo_inject"]
    for arm, seeds in (("sft", [0, 1]), ("bpo", [0, 1]), ("bpo_inject", [1])):
        runs = on_disk["arms"][arm]["per_seed"]
        assert [r["seed"] for r in runs] == seeds
        for run in runs:
            name = f"{arm}-s{run['seed']}"
            answers = read_answers(out / "eval" / name / "shapeworld_chair" / "answers.jsonl")
            recomputed = hallucination_metrics(list(answers.values()), scenes)
            assert {k: run[k] for k in recomputed} == pytest.approx(recomputed)
            history = (out / "train" / name / "metrics.jsonl").read_text().splitlines()
            assert [json.loads(line)["step"] for line in history] == [1, 2, 3]
            assert (out / "train" / name / "model" / "config.json").is_file()
            assert (out / "configs" / f"train-{name}.yaml").is_file()
        mean = sum(r["chair_i"] for r in runs) / len(runs)
        assert on_disk["arms"][arm]["chair_i"] == pytest.approx(mean)
        assert on_disk["arms"][arm]["intervals"]["mean"]["chair_i"] == pytest.approx(mean)
    claim = on_disk["claim"]
    bpo, sft = on_disk["arms"]["bpo"], on_disk["arms"]["sft"]
    bpo_high = bpo["intervals"]["ci"]["chair_i"][1]
    assert claim["checks"]["bpo_chair_i_ci<sft_chair_i"] == (bpo_high < sft["chair_i"])
    assert claim["holds"] == all(claim["checks"].values())


@pytest.mark.slow
def test_the_base_references_are_scored_once_for_every_arm(demo_run):
    """One refs file in the store, with one entry per pair: the first DPO arm computed it and
    every later arm and seed found its entries by content (same model, same pairs)."""
    out, _, _ = demo_run
    files = sorted((out / "pairs" / "refs").glob("*.jsonl"))
    assert len(files) == 1
    entries = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert sorted(e["key"] for e in entries) == sorted(p.key for p in read_pairs(out / "pairs"))


@pytest.mark.slow
def test_dpo_arms_start_at_log_two_and_sft_has_no_rewards(demo_run):
    """At step 1 the policy is the reference: DPO's loss is log 2 (+ the RPO term, whose NLL is
    logged), SFT logs no reward metrics at all."""
    out, _, _ = demo_run
    first = json.loads((out / "train" / "bpo-s0" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    alpha = mini_config().training.rpo_alpha
    assert first["loss"] == pytest.approx(math.log(2) + alpha * first["nll"], rel=1e-5)
    sft = json.loads((out / "train" / "sft-s0" / "metrics.jsonl").read_text().splitlines()[0])
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
    cfg = replace(
        mini_config(),
        full_run=True,
        full_world_seeds=(0, 1),
        full_noise_steps=(300, 900),
        training=ArmsConfig(
            arms=("sft", "bpo", "bpo_inject"), seeds=(0, 1), steps=2, batch_size=4, rounds=2
        ),
    )
    results = run_demo(cfg, tmp_path, log=lambda _: None)
    assert results["world_seeds"] == [0, 1]
    beyond = ["bpo_image", "bpo_rounds_r1", "bpo_rounds_r2"]  # added by --full
    arms = ["base", "sft", "bpo", "bpo_inject", *beyond, "bpo_weaken_t300", "bpo_weaken_t900"]
    assert list(results["arms"]) == arms
    for world in (0, 1):
        per_world = json.loads((tmp_path / f"world{world}" / "results.json").read_text())
        assert set(per_world["negatives"]) == {"weaken_t300", "weaken_t900", "inject"}
        assert [r["seed"] for r in per_world["arms"]["bpo_inject"]["per_seed"]] == [0, 1]
        # The sweep arm's noise step is data of its `bpo train` config, not part of a name.
        world_folder = tmp_path / f"world{world}"
        written = yaml.safe_load(
            (world_folder / "configs" / "train-bpo_weaken_t300-s0.yaml").read_text()
        )
        assert (written["run"]["sources"], written["run"]["noise_steps"]) == (["weaken"], [300])
    assert set(results["beyond"]) == set(beyond)
    rounds = results["arms"]["bpo_rounds_r2"]["per_seed"]
    assert [r["eval"] for r in rounds] == [
        f"rounds/bpo_rounds-s{s}/round-2/eval" for s in (0, 1)
    ] * 2
    runs = results["arms"]["bpo_weaken_t300"]["per_seed"]
    assert [(r["world"], r["seed"]) for r in runs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    mean = sum(r["chair_i"] for r in runs) / 4
    assert results["arms"]["bpo_weaken_t300"]["chair_i"] == pytest.approx(mean)
    assert (tmp_path / "report.html").exists() and (tmp_path / "report.md").exists()


@pytest.mark.slow
def test_an_arm_without_pairs_is_skipped_and_said(tmp_path):
    """A length filter that drops every weakened negative leaves bpo_weaken nothing to train on:
    the run logs it, skips that arm and finishes the others (it does not crash hours in)."""
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
