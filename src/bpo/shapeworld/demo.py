"""`bpo demo`: build ShapeWorld and its base model, then measure the base model's hallucination.

The run, each step seeded:
1. the world: an unbiased alignment set, held-out evaluation scenes, and a biased text corpus
   (captions, some prompted with a grid description of their scene);
2. a tiny LLaVA (tokenizer trained on the world's text), its LM pretrained on the corpus and its
   vision tower on the world's images (cached under OUT/cache, so reruns skip both);
3. LLaVA's two alignment stages on the unbiased set: the projector alone with the LM frozen (it
   learns to emit the image as something the LM reads like a grid description), then a short pass
   over projector + LM with the corpus replayed;
4. greedy captions of the held-out scenes, scored with CHAIR, recall and the partner share.
Writes OUT/base (HF format), OUT/results.json and prints a table.

Why the base model hallucinates from the text prior: where the image is unclear (faint objects,
noise) the frozen-then-briefly-tuned LM fills the gap the way its corpus taught it, with the
partner of what it did see. With `world.prior_strength=0` (an unbiased corpus) the partner share
falls to chance: that control is the evidence.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

import bpo
from bpo.data.store import read_pairs
from bpo.evaluate.pope import (
    STRATEGIES,
    build_pope_questions,
    co_occurrence,
    object_frequency,
    parse_yes_no,
    pope_metrics,
)
from bpo.models.load import load_model_and_processor
from bpo.models.tiny import TinyLlavaConfig, build_tiny_llava, save_tiny_llava
from bpo.report.demo_report import write_report
from bpo.shapeworld import train
from bpo.shapeworld.arms import (
    ArmsConfig,
    arm_pairs,
    arm_seeds,
    check_arms,
    summarize,
    sweep_step,
    train_arm,
    with_base_references,
)
from bpo.shapeworld.metrics import hallucination_metrics
from bpo.shapeworld.negatives import NegativesConfig, bootstrap_pairs
from bpo.shapeworld.world import (
    CAPTION_PROMPTS,
    Scene,
    WorldConfig,
    caption,
    cell_labels,
    grid_description,
    grid_vocabulary,
    questions,
    render,
    sample_scene,
    sample_text_scene,
)
from bpo.utils.console import progress_bar


@dataclass
class StageConfig:
    """One training stage: optimizer steps, batch size and peak learning rate."""

    steps: int
    batch_size: int
    lr: float


@dataclass
class DemoConfig:
    """Everything `bpo demo` does, fixed before the run (seeds included)."""

    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    model: TinyLlavaConfig = field(default_factory=TinyLlavaConfig)
    corpus_size: int = 20000  # text-only captions carrying the co-occurrence prior
    tower_scenes: int = 4000  # images for the vision tower's pretraining
    align_scenes: int = 3000  # the unbiased image-text alignment set
    eval_scenes: int = 2000  # held-out scenes for the hallucination metrics
    qa_fraction: float = 0.3  # share of alignment examples that are questions, not captions
    lm: StageConfig = field(default_factory=lambda: StageConfig(800, 64, 3e-3))
    tower: StageConfig = field(default_factory=lambda: StageConfig(400, 64, 2e-3))
    projector: StageConfig = field(default_factory=lambda: StageConfig(500, 32, 3e-3))
    full: StageConfig = field(default_factory=lambda: StageConfig(20, 32, 5e-4))
    # Share of corpus texts whose prompt carries the scene as a grid description (some cells
    # unknown): they teach the LM to read a scene from context and fill gaps from its prior.
    grid_fraction: float = 0.6
    unknown_prob: float = 0.3
    replay_weight: float = 1.0  # text-corpus replay during the full stage
    max_new_tokens: int = 40
    pope_per_image: int = 2  # POPE: yes-questions per image (and as many no-questions)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    training: ArmsConfig = field(default_factory=ArmsConfig)  # the SFT and BPO arms
    eval_batch_size: int = 100
    threads: int = 1  # torch threads; see `choose_threads`
    # `bpo demo --full true`: the whole run once per world seed (each its own world and base
    # model), every arm on every seed, and a noise-step sweep (negatives and a BPO arm per step).
    full_run: bool = False
    full_world_seeds: tuple[int, ...] = (0, 1, 2)
    full_noise_steps: tuple[int, ...] = (100, 300, 500, 700, 900)


def choose_threads(requested: int) -> int:
    """Torch threads for tiny models: 1 unless asked.

    On an idle 2-core machine 2 threads were ~1.25x faster per step (benchmarks/threads.py), but
    on cores shared with other work OpenMP threads spin-wait on ops this small and ran many times
    slower than 1 in prototypes; 1 is the safe default.
    """
    return max(1, requested)


def _digest(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _code_digest() -> str:
    """A hash of the code that makes the pretrained cache, so changed code never reuses it."""
    from bpo.models import tiny
    from bpo.shapeworld import world

    sources = [Path(module.__file__).read_bytes() for module in (tiny, train, world)]
    sources.append(inspect.getsource(text_examples).encode())
    return hashlib.sha256(b"".join(sources)).hexdigest()[:12]


@dataclass
class World:
    """The sampled world: tower, alignment and held-out scenes, and the text corpus's scenes."""

    tower_scenes: list
    align_scenes: list
    eval_scenes: list
    corpus_scenes: list

    @property
    def corpus(self) -> list[str]:
        """The corpus captions."""
        return [caption(scene) for scene in self.corpus_scenes]


def build_world(cfg: DemoConfig) -> World:
    """Sample every scene and the corpus from one seeded generator per purpose."""
    wcfg = cfg.world
    streams = np.random.SeedSequence(cfg.seed).spawn(4)
    rngs = [np.random.default_rng(s) for s in streams]
    tower = [sample_scene(rngs[0], wcfg) for _ in range(cfg.tower_scenes)]
    align = [sample_scene(rngs[1], wcfg) for _ in range(cfg.align_scenes)]
    held_out = [sample_scene(rngs[2], wcfg) for _ in range(cfg.eval_scenes)]
    corpus = [sample_text_scene(rngs[3], wcfg) for _ in range(cfg.corpus_size)]
    return World(tower, align, held_out, corpus)


def pixel_tensor(processor, scenes, wcfg: WorldConfig) -> torch.Tensor:
    """Render scenes and run them through the model's own image processor: (N, 3, H, W)."""
    images = [render(scene, wcfg) for scene in scenes]
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def tokenizer_texts(world: World, wcfg: WorldConfig) -> list[str]:
    """Everything the tokenizer should cover: captions, questions, answers, prompt words."""
    rng = np.random.default_rng(0)
    texts = list(world.corpus[:5000])
    for scene in world.align_scenes[:2000]:
        texts.append(caption(scene))
        texts.extend(q + " " + a for q, a in questions(scene, rng, wcfg))
    texts.extend(f"USER: {p} ASSISTANT:" for p in CAPTION_PROMPTS)
    return texts


def text_examples(
    processor, scenes: list[Scene], cfg: DemoConfig, seed: int
) -> list[train.Example]:
    """The corpus as chat turns: "USER: [grid description\n]Describe the image. ASSISTANT: ..."."""
    prompts = train.PromptCache(processor)
    rng = np.random.default_rng(seed)
    examples = []
    for scene in scenes:
        question = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
        if rng.random() < cfg.grid_fraction:
            question = grid_description(scene, rng, cfg.unknown_prob) + "\n" + question
        answer = train.encode_answer(processor, caption(scene))
        examples.append(train.Example(prompts(question, False), answer))
    return examples


def image_examples(processor, scenes, cfg: DemoConfig, seed: int) -> list[train.Example]:
    """Alignment examples: a caption request, or (qa_fraction of them) a question, per scene."""
    prompts = train.PromptCache(processor)
    rng = np.random.default_rng(seed)
    examples = []
    for index, scene in enumerate(scenes):
        if rng.random() < cfg.qa_fraction:
            qa = questions(scene, rng, cfg.world)
            question, answer = qa[int(rng.integers(len(qa)))]
        else:
            question = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
            answer = caption(scene)
        examples.append(
            train.Example(prompts(question, True), train.encode_answer(processor, answer), index)
        )
    return examples


def pretrained_model(cfg: DemoConfig, world: World, cache_dir: Path, log):
    """The tiny LLaVA with its LM and tower pretrained, loaded from the cache when possible."""
    key = _digest(
        "pretrained", bpo.__version__, _code_digest(), cfg.seed, asdict(cfg.world), asdict(cfg.model),
        cfg.corpus_size, cfg.tower_scenes, asdict(cfg.lm), asdict(cfg.tower),
        cfg.grid_fraction, cfg.unknown_prob,
    )  # fmt: skip
    folder = cache_dir / f"pretrained-{key}"
    if (folder / "config.json").exists():
        log(f"pretrained LM and tower: cached in {folder}")
        # Eager attention, as the freshly built model has: a rerun then trains bit for bit alike.
        return load_model_and_processor(
            str(folder), dtype="float32", device="cpu", attn_implementation="eager"
        )
    model, processor = build_tiny_llava(
        tokenizer_texts(world, cfg.world),
        cfg.model,
        seed=cfg.seed,
        extra_tokens=grid_vocabulary(cfg.world),
    )
    texts = text_examples(processor, world.corpus_scenes, cfg, cfg.seed)
    t0 = time.time()
    with progress_bar("LM pretraining", cfg.lm.steps) as advance:
        losses = train.pretrain_language_model(
            model, texts, cfg.lm.steps, cfg.lm.batch_size, cfg.lm.lr, cfg.seed, advance
        )
    log(f"LM pretraining: {cfg.lm.steps} steps, loss {losses[-1]:.3f} ({time.time() - t0:.0f}s)")
    t0 = time.time()
    pixels = pixel_tensor(processor, world.tower_scenes, cfg.world)
    labels = [cell_labels(s, cfg.world) for s in world.tower_scenes]
    shape_labels = torch.tensor(np.stack([lab[0] for lab in labels]))
    colour_labels = torch.tensor(np.stack([lab[1] for lab in labels]))
    with progress_bar("vision tower pretraining", cfg.tower.steps) as advance:
        accuracy = train.pretrain_vision_tower(
            model, pixels, shape_labels, colour_labels,
            cfg.tower.steps, cfg.tower.batch_size, cfg.tower.lr, cfg.seed, advance,
        )  # fmt: skip
    log(f"tower pretraining: {cfg.tower.steps} steps, cell accuracy {accuracy:.3f} "
        f"({time.time() - t0:.0f}s)")  # fmt: skip
    # Written aside, then renamed: a run killed mid-save never leaves a half cache behind.
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_tiny_llava(model, processor, partial, cfg.model)
    partial.replace(folder)
    return model, processor


def align_model(model, processor, cfg: DemoConfig, world: World, log):
    """LLaVA's stage 1 (projector) then a short stage 2 (projector + LM, with text replay)."""
    pixels = pixel_tensor(processor, world.align_scenes, cfg.world)
    examples = image_examples(processor, world.align_scenes, cfg, cfg.seed + 1)
    replay = text_examples(processor, world.corpus_scenes, cfg, cfg.seed + 2)
    for stage, sc in (("projector", cfg.projector), ("full", cfg.full)):
        t0 = time.time()
        with progress_bar(f"alignment ({stage})", sc.steps) as advance:
            losses = train.align(
                model, examples, pixels, stage, sc.steps, sc.batch_size, sc.lr, cfg.seed,
                replay=replay if stage == "full" else (), replay_weight=cfg.replay_weight,
                progress=advance,
            )  # fmt: skip
        log(f"alignment ({stage}): {sc.steps} steps, loss {np.mean(losses[-10:]):.3f} "
            f"({time.time() - t0:.0f}s)")  # fmt: skip
    return model


def describe(
    model, processor, pixels: torch.Tensor, cfg: DemoConfig, prompt: str, max_new_tokens=None
) -> list[str]:
    """Greedy answers to one prompt for every image (batched; same prompt, so no padding)."""
    ids = train.PromptCache(processor)(prompt, True)
    answers = []
    starts = range(0, len(pixels), cfg.eval_batch_size)
    for start in starts:
        batch = pixels[start : start + cfg.eval_batch_size]
        answers.extend(
            _generate(model, processor, batch, ids, max_new_tokens or cfg.max_new_tokens)
        )
    return [a.strip() for a in answers]


@torch.no_grad()
def _generate(model, processor, pixels, ids: list[int], max_new_tokens: int) -> list[str]:
    """Greedy answers for a batch of images that share the prompt `ids`."""
    input_ids = torch.tensor([ids] * len(pixels))
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=pixels,
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return processor.tokenizer.batch_decode(out[:, len(ids) :], skip_special_tokens=True)


def pope_scores(model, processor, cfg: DemoConfig, world: World, pixels: torch.Tensor) -> dict:
    """POPE accuracy, F1 and yes ratio per strategy on the held-out scenes.

    Popular and adversarial negatives are ranked by the text corpus (its shape frequencies and
    co-occurrences): the statistics the LM learned, as COCO's annotations are for LLaVA.
    """
    corpus_sets = [scene.shapes for scene in world.corpus_scenes]
    ids = [str(i) for i in range(len(world.eval_scenes))]
    truths = [scene.shapes for scene in world.eval_scenes]
    scores = {}
    for strategy in STRATEGIES:
        questions = build_pope_questions(
            ids, truths, strategy, cfg.pope_per_image, cfg.seed,
            categories=cfg.world.shapes, frequency=object_frequency(corpus_sets),
            pairs=co_occurrence(corpus_sets),
        )  # fmt: skip
        predictions = {}
        for text in sorted({q.text for q in questions}):  # one batch run per question wording
            asked = [q for q in questions if q.text == text]
            rows = torch.tensor([int(q.image) for q in asked])
            answers = describe(model, processor, pixels[rows], cfg, text, max_new_tokens=6)
            predictions.update(
                (q.question_id, parse_yes_no(a)) for q, a in zip(asked, answers, strict=True)
            )
        metrics = pope_metrics([predictions[q.question_id] for q in questions],
                               [q.label for q in questions])  # fmt: skip
        for name in ("accuracy", "f1", "yes_ratio"):
            scores[f"pope_{strategy}_{name}"] = metrics[name]
    return scores


def evaluate_base(model, processor, cfg: DemoConfig, world: World) -> tuple[dict, list[str]]:
    """Captions of the held-out scenes with their hallucination metrics, and POPE."""
    pixels = pixel_tensor(processor, world.eval_scenes, cfg.world)
    with progress_bar("evaluation (captions, POPE)", 2) as advance:
        answers = describe(model, processor, pixels, cfg, CAPTION_PROMPTS[0])
        advance(0)
        metrics = hallucination_metrics(answers, world.eval_scenes)
        metrics.update(pope_scores(model, processor, cfg, world, pixels))
        advance(1)
    return metrics, answers


def versions() -> dict:
    return {
        "bpo": bpo.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


# What the base model must show for ShapeWorld to reproduce the problem BPO solves (issue #2).
TARGETS = {"chair_i": 0.03, "recall": 0.5, "partner_ratio": 1.5}


def check_base(metrics: dict) -> dict:
    """Which of the targets the base model meets: enough hallucination, prior-driven."""
    ratio = metrics["partner_share"] / metrics["partner_chance"] if metrics["partner_chance"] else 0
    return {
        "chair_i>=0.03": metrics["chair_i"] >= TARGETS["chair_i"],
        "recall>=0.5": metrics["recall"] >= TARGETS["recall"],
        "partner_share>=1.5*partner_chance": ratio >= TARGETS["partner_ratio"],
        "partner_ratio": round(ratio, 3),
    }


def run_demo(cfg: DemoConfig, out: Path, log=print) -> dict:
    """Run the demo end to end and write OUT/results.json; returns the results.

    With `cfg.full_run`, one run per world seed under OUT/world{seed}, gathered in OUT/results.json.
    """
    check_arms(cfg.training, cfg.negatives.noise_steps)
    if cfg.full_run:
        return run_full(cfg, out, log)
    return run_world(cfg, out, log)


def run_world(cfg: DemoConfig, out: Path, log=print) -> dict:
    """One world: base model, negatives, the trained arms, their evaluation; OUT/results.json."""
    started = time.time()
    torch.set_num_threads(choose_threads(cfg.threads))
    transformers.utils.logging.disable_progress_bar()  # our own bars; no per-save shard bars
    out.mkdir(parents=True, exist_ok=True)
    world = build_world(cfg)
    log(f"world: {len(world.corpus_scenes)} corpus captions, {len(world.align_scenes)} alignment scenes, "
        f"{len(world.eval_scenes)} held-out scenes")  # fmt: skip
    model, processor = pretrained_model(cfg, world, out / "cache", log)
    model = align_model(model, processor, cfg, world, log)
    save_tiny_llava(model, processor, out / "base", cfg.model)
    metrics, answers = evaluate_base(model, processor, cfg, world)
    write_answers(out / "answers-base.jsonl", answers, world.eval_scenes)
    with progress_bar("bootstrapping negatives", 1) as advance:
        negatives = bootstrap_pairs(
            model, processor, world.align_scenes, cfg.world, cfg.negatives, cfg.seed,
            out / "pairs", image_root=out,
        )  # fmt: skip
        advance(0)
    log(f"pairs: {out / 'pairs'} (view: bpo view {out / 'pairs'} --image_root {out})")
    arms = {"base": {**metrics, "per_seed": [metrics]}}
    arms.update(train_arms(model, processor, cfg, world, out, log))
    results = {
        "arms": arms,
        "seeds": list(cfg.training.seeds),
        "claim": claim(arms),
        "checks": {"base": check_base(metrics)},
        "negatives": negatives,
        "config": asdict(cfg),
        "versions": versions(),
        "wall_s": round(time.time() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    html, markdown = write_report(out, results, world.eval_scenes, cfg.world)
    log(f"report: {html} (markdown: {markdown})")
    return results


def write_answers(path: Path, answers: list[str], scenes: list[Scene]) -> None:
    """One JSON line per held-out scene: its index, the model's caption and the gold caption."""
    path.write_text(
        "".join(
            json.dumps({"id": i, "answer": a, "truth": caption(s)}) + "\n"
            for i, (a, s) in enumerate(zip(answers, scenes, strict=True))
        )
    )


def train_arms(base, processor, cfg: DemoConfig, world: World, out: Path, log) -> dict:
    """Train and evaluate every arm for every seed; {arm: mean metrics + std + per_seed}.

    Writes OUT/answers-{arm}-s{seed}.jsonl and the training metrics OUT/train/{arm}-s{seed}.jsonl.
    """
    training = cfg.training
    pairs = list(read_pairs(out / "pairs"))
    images = {p.image: Image.open(out / p.image).convert("RGB") for p in pairs}
    pairs = with_base_references(base, processor, pairs, images)  # once for every arm and seed
    (out / "train").mkdir(exist_ok=True)
    results = {}
    for arm in training.arms:
        if not arm_pairs(arm, pairs):
            # e.g. a sweep step whose every negative the length filter dropped: say so, go on.
            log(f"{arm}: no pairs to train on (see the pair store's manifest); arm skipped")
            continue
        per_seed = []
        for seed in arm_seeds(arm, training):
            t0 = time.time()
            with progress_bar(f"training {arm} (seed {seed})", training.steps) as advance:
                model, history = train_arm(
                    base, processor, pairs, images, arm, seed, training, str(out / "base"),
                    on_step=lambda step, m: advance(step, m["loss"]),
                )  # fmt: skip
            metrics, answers = evaluate_base(model, processor, cfg, world)
            write_answers(out / f"answers-{arm}-s{seed}.jsonl", answers, world.eval_scenes)
            (out / "train" / f"{arm}-s{seed}.jsonl").write_text(
                "".join(json.dumps(line) + "\n" for line in history)
            )
            log(f"{arm} seed {seed}: {training.steps} steps ({time.time() - t0:.0f}s), CHAIR_i "
                f"{metrics['chair_i']:.4f}, recall {metrics['recall']:.4f}")  # fmt: skip
            per_seed.append({"seed": seed, **metrics})
        results[arm] = summarize(per_seed)
    return results


def full_config(cfg: DemoConfig, world_seed: int) -> DemoConfig:
    """One world of the full run: every arm on every seed, and a BPO arm per noise step."""
    steps = tuple(cfg.full_noise_steps)
    sweep = tuple(f"bpo_weaken_t{t}" for t in steps)
    arms = tuple(a for a in cfg.training.arms if sweep_step(a) is None) + sweep
    training = replace(cfg.training, arms=arms, ablation_seeds=cfg.training.seeds)
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
    arms: dict[str, dict] = {}
    names = dict.fromkeys(arm for result in worlds.values() for arm in result["arms"])
    for arm in names:  # an arm a world skipped (no pairs) pools the worlds that ran it
        runs = [
            {"world": w, **run}
            for w, result in worlds.items()
            if arm in result["arms"]
            for run in result["arms"][arm]["per_seed"]
        ]
        arms[arm] = summarize(runs)
    results = {
        "arms": arms,
        "seeds": list(cfg.training.seeds),
        "world_seeds": list(cfg.full_world_seeds),
        "claim": claim(arms),
        "checks": {f"base_world{w}": r["checks"]["base"] for w, r in worlds.items()},
        "negatives": {f"world{w}": r["negatives"] for w, r in worlds.items()},
        "config": asdict(cfg),
        "versions": versions(),
        "wall_s": round(time.time() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    html, markdown = write_report(out, results)
    log(f"report: {html} (markdown: {markdown})")
    return results


RECALL_SLACK = 0.02  # bpo may lose at most this much recall to sft (issue #6)


def claim(arms: dict[str, dict]) -> dict:
    """Whether the paper's claim holds here, as measured: BPO's mean CHAIR_i below SFT's, below
    the base model's in every seed, with recall at most RECALL_SLACK under SFT's."""
    if "bpo" not in arms or "sft" not in arms:
        return {"holds": None, "reason": "needs the bpo and sft arms"}
    bpo, sft, base = arms["bpo"], arms["sft"], arms["base"]
    bases = {run.get("world"): run["chair_i"] for run in base["per_seed"]}
    checks = {
        "bpo_chair_i<sft_chair_i": bpo["chair_i"] < sft["chair_i"],
        "bpo_chair_i<base_chair_i_every_seed": all(
            run["chair_i"] < bases[run.get("world")] for run in bpo["per_seed"]
        ),
        "bpo_recall>=sft_recall-0.02": bpo["recall"] >= sft["recall"] - RECALL_SLACK,
    }
    return {
        "holds": all(checks.values()),
        "checks": checks,
        "chair_i": {"base": base["chair_i"], "sft": sft["chair_i"], "bpo": bpo["chair_i"]},
        "recall": {"base": base["recall"], "sft": sft["recall"], "bpo": bpo["recall"]},
    }
