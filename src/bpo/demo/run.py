"""`bpo demo`: ShapeWorld end to end on a CPU, through the product's own stages.

One world: build the base model (`bpo.demo.base`), export the alignment and held-out scenes as
datasets, `bpo bootstrap` the pairs from the base, `bpo train` every arm and seed from the base on
them (the base's reference log-probs are cached in the pair store, keyed by content, so the first
DPO arm computes them and every later one reuses them), and `bpo eval` the base and every trained
model on the held-out scenes. Writes OUT/results.json, the report, and every stage's output and
config. `--full true` runs one world per world seed and pools them.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future
from dataclasses import asdict, replace
from pathlib import Path

import torch
import transformers

from bpo.data import read_pairs
from bpo.data.files import write_atomic
from bpo.demo.arms import BEYOND_ARMS, arm_seeds, arms_of, check_arms, summarize
from bpo.demo.base import align_model, build_world, pretrained_model
from bpo.demo.claim import ablation, beyond, check_base, claim
from bpo.demo.config import DemoConfig
from bpo.demo.report import write_report
from bpo.demo.rounds import round_arm_name, train_rounds_arm
from bpo.demo.stages import (
    Evaluations,
    bootstrap_pairs,
    check_stages,
    export_datasets,
    train_arm,
)
from bpo.models.tiny import save_tiny_llava
from bpo.train.data import select_pairs
from bpo.utils.console import progress_bar
from bpo.utils.versions import versions


def run_demo(cfg: DemoConfig, out: Path, log=print) -> dict:
    """Run the demo end to end and write OUT/results.json; returns the results.

    With `cfg.full_run`, one run per world seed under OUT/world{seed}, gathered in OUT/results.json.
    """
    check_demo(cfg)
    if cfg.full_run:
        return run_full(cfg, out, log)
    return run_world(cfg, out, log)


def check_demo(cfg: DemoConfig) -> None:
    """Refuse, before any work, what a stage would refuse minutes or hours in: the arms, and
    the stage configs of every world the run derives (`--full true`: its noise steps too)."""
    check_arms(cfg.training, cfg.negatives.noise_steps)
    if not cfg.full_run:
        check_stages(cfg)
        return
    if not cfg.full_world_seeds:
        raise ValueError("full_world_seeds is empty; give at least one world seed")
    for world_seed in cfg.full_world_seeds:
        world = full_config(cfg, world_seed)
        check_arms(world.training, world.negatives.noise_steps)
        check_stages(world)


def run_world(cfg: DemoConfig, out: Path, log=print) -> dict:
    """One world: base model, pairs, the trained arms, their evaluation; OUT/results.json."""
    started = time.time()
    torch.set_num_threads(max(1, cfg.threads))
    transformers.utils.logging.disable_progress_bar()  # our own bars; no per-save shard bars
    out.mkdir(parents=True, exist_ok=True)
    world = build_world(cfg)
    log(
        f"world: {len(world.corpus_scenes)} corpus captions, {len(world.align_scenes)} alignment "
        f"scenes, {len(world.eval_scenes)} held-out scenes"
    )
    model, processor = pretrained_model(cfg, world, out / "cache", log)
    model = align_model(model, processor, cfg, world, log)
    base = save_tiny_llava(model, processor, out / "base", cfg.model)
    data = export_datasets(cfg, world, out)
    with Evaluations(cfg, data, out) as evaluations:
        base_eval = evaluations.submit(base, "base")
        pairs, negatives = bootstrap_pairs(cfg, (model, processor), base, data, out)
        log(f"pairs: {pairs} (view: bpo view {pairs} --image_root {data.align})")
        trained = train_arms(cfg, base, pairs, data, out, evaluations, log)
        with progress_bar("evaluation", 1 + sum(len(runs) for runs in trained.values())) as done:
            metrics = base_eval.result()
            done(0)
            log(f"base: CHAIR_i {metrics['chair_i']:.4f}, recall {metrics['recall']:.4f}")
            arms = {"base": summarize([metrics], [out / "eval" / "base"])}
            arms.update(gather_arms(trained, log, done, out))
    results = {
        "arms": arms,
        "seeds": list(cfg.training.seeds),
        "claim": claim(arms),
        "ablation": ablation(arms),
        "beyond": beyond(arms),
        "checks": {"base": check_base(metrics)},
        "negatives": negatives,
        "existence_negatives": negatives.pop("existence", {}),
        "config": asdict(cfg),
        "versions": versions(),
        "wall_s": round(time.time() - started, 1),
    }
    return write_results(out, results, log)


def write_results(out: Path, results: dict, log) -> dict:
    """OUT/results.json and the report; the results."""
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    html, markdown = write_report(out, results)
    log(f"report: {html} (markdown: {markdown})")
    return results


def train_arms(cfg: DemoConfig, base: Path, pairs: Path, data, out: Path, evaluations, log):
    """Train every arm for every seed, each handed to `evaluations` once trained;
    {arm: [(seed, its evaluation's future)]}."""
    training = cfg.training
    trained: dict[str, list] = {}
    for arm in arms_of(training):
        if not select_pairs(read_pairs(pairs), arm.sources, arm.noise_steps):
            # e.g. a sweep step whose every negative the length filter dropped: say so, go on.
            log(f"{arm.name}: no pairs to train on (see {pairs / 'manifest.json'}); arm skipped")
            continue
        for seed in arm_seeds(arm, training):
            t0 = time.time()
            if arm.rounds:
                for k, metrics, folder in train_rounds_arm(cfg, arm, seed, base, data, out):
                    trained.setdefault(round_arm_name(arm, k), []).append(
                        (seed, finished(metrics), folder)
                    )
                log(
                    f"{arm.name} seed {seed}: {training.rounds} rounds of "
                    f"{training.steps // training.rounds} steps ({time.time() - t0:.0f}s)"
                )
                continue
            with progress_bar(f"training {arm.name} (seed {seed})", training.steps) as advance:
                model, _ = train_arm(
                    cfg,
                    arm,
                    seed,
                    base,
                    pairs,
                    data,
                    out,
                    on_step=lambda step, m: advance(step, m["loss"], m.get("rewards/accuracies")),
                )
            log(f"{arm.name} seed {seed}: trained {training.steps} steps ({time.time() - t0:.0f}s)")
            name = f"{arm.name}-s{seed}"
            trained.setdefault(arm.name, []).append(
                (seed, evaluations.submit(model, name), out / "eval" / name)
            )
    return trained


def finished(metrics: dict) -> Future:
    """A future already holding `metrics` (an evaluation that ran in this process)."""
    done: Future = Future()
    done.set_result(metrics)
    return done


def gather_arms(trained: dict[str, list], log, done, out: Path) -> dict:
    """{arm: mean metrics + std + per_seed + intervals} once every arm's evaluations are in;
    the intervals resample the scenes judged in each run's eval folder, which each run of
    per_seed names under `eval` (relative to `out`, the world's folder)."""
    results = {}
    for arm, runs in trained.items():
        per_seed = []
        for seed, evaluation, folder in runs:
            metrics = evaluation.result()
            done(0)
            log(
                f"{arm} seed {seed}: CHAIR_i {metrics['chair_i']:.4f}, "
                f"recall {metrics['recall']:.4f}"
            )
            per_seed.append({"seed": seed, **metrics, "eval": str(folder.relative_to(out))})
        results[arm] = summarize(per_seed, [folder for _seed, _evaluation, folder in runs])
    return results


def pool_worlds(worlds: dict[int, dict], out: Path) -> dict[str, dict]:
    """{arm: its runs of every world pooled}: means, std and intervals over worlds x seeds.

    The intervals take the runs of all worlds as the seed level and resample each world's
    held-out scenes within it (the worlds' scene sets differ). An arm a world skipped (no
    pairs) pools the worlds that ran it.
    """
    arms: dict[str, dict] = {}
    names = dict.fromkeys(arm for result in worlds.values() for arm in result["arms"])
    for arm in names:
        runs, folders = [], []
        for w, result in worlds.items():
            for run in result["arms"].get(arm, {}).get("per_seed", []):
                runs.append({"world": w, **run})
                folders.append(out / f"world{w}" / run.get("eval", f"eval/{arm}"))
        arms[arm] = summarize(runs, folders, [run["world"] for run in runs])
    return arms


def full_config(cfg: DemoConfig, world_seed: int) -> DemoConfig:
    """One world of the full run: every arm (those beyond the paper too) on every seed, and a BPO
    arm per noise step."""
    steps = tuple(cfg.full_noise_steps)
    arms = (*cfg.training.arms, *(a for a in BEYOND_ARMS if a not in cfg.training.arms))
    training = replace(
        cfg.training, arms=arms, sweep_steps=steps, ablation_seeds=cfg.training.seeds
    )
    negatives = replace(cfg.negatives, noise_steps=steps)
    return replace(cfg, seed=world_seed, full_run=False, training=training, negatives=negatives)


def run_full(cfg: DemoConfig, out: Path, log=print) -> dict:
    """Every world seed in its own folder; OUT/results.json pools the arms over worlds x seeds."""
    started = time.time()
    worlds = {}
    for world_seed in cfg.full_world_seeds:
        log(f"world seed {world_seed}")
        worlds[world_seed] = run_world(
            full_config(cfg, world_seed), out / f"world{world_seed}", log
        )
    arms = pool_worlds(worlds, out)
    results = {
        "arms": arms,
        "seeds": list(cfg.training.seeds),
        "world_seeds": list(cfg.full_world_seeds),
        "claim": claim(arms),
        "ablation": ablation(arms),
        "beyond": beyond(arms),
        "checks": {f"base_world{w}": r["checks"]["base"] for w, r in worlds.items()},
        "negatives": {f"world{w}": r["negatives"] for w, r in worlds.items()},
        "existence_negatives": {
            f"world{w}": r.get("existence_negatives", {}) for w, r in worlds.items()
        },
        "config": asdict(cfg),
        "versions": versions(),
        "wall_s": round(time.time() - started, 1),
    }
    return write_results(out, results, log)
