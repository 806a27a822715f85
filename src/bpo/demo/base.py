"""The demo's base model: ShapeWorld's scenes, a tiny LLaVA pretrained on a biased text corpus,
aligned in LLaVA's two stages on unbiased images.

The run, each step seeded:
1. the world: an unbiased alignment set, held-out evaluation scenes, and a biased text corpus
   (captions, some prompted with a grid description of their scene);
2. a tiny LLaVA (tokenizer trained on the world's text), its LM pretrained on the corpus and its
   vision tower on the world's images (cached under OUT/cache, keyed by the settings and the
   code that makes it, so reruns skip both);
3. LLaVA's two alignment stages on the unbiased set: the projector alone with the LM frozen (it
   learns to emit the image as something the LM reads like a grid description), then a short pass
   over projector + LM with the corpus replayed.

Why the base model hallucinates from the text prior: where the image is unclear (faint objects,
noise) the frozen-then-briefly-tuned LM fills the gap the way its corpus taught it, with the
partner of what it did see. With `world.prior_strength=0` (an unbiased corpus) the partner share
falls to chance: that control is the evidence.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import bpo
from bpo.demo import pretrain
from bpo.demo.config import DemoConfig
from bpo.models import tiny
from bpo.models.load import load_model_and_processor
from bpo.models.tiny import build_tiny_llava, save_tiny_llava
from bpo.shapeworld import world as world_module
from bpo.shapeworld.world import (
    CAPTION_PROMPTS,
    Scene,
    WorldConfig,
    caption,
    cell_labels,
    existence_qa,
    grid_description,
    grid_vocabulary,
    questions,
    render,
    sample_scene,
    sample_text_scene,
)
from bpo.utils.console import progress_bar


def _digest(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _code_digest() -> str:
    """A hash of the code that makes the pretrained cache, so changed code never reuses it."""
    modules = (tiny, pretrain, world_module)
    sources = [Path(module.__file__).read_bytes() for module in modules]
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
) -> list[pretrain.Example]:
    """The corpus as chat turns: "USER: [grid description\n]Describe the image. ASSISTANT: ...".

    A share (`corpus_qa_fraction`) of the grid-prompted texts ask whether a shape is there
    instead, answered by the scene: where the grid leaves a cell unknown the answer follows the
    corpus's co-occurrence, so the LM learns to answer from context and fill gaps from its prior.
    """
    prompts = pretrain.PromptCache(processor)
    rng = np.random.default_rng(seed)
    examples = []
    for scene in scenes:
        question = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
        text = caption(scene)
        if rng.random() < cfg.grid_fraction:
            grid = grid_description(scene, rng, cfg.unknown_prob)
            if rng.random() < cfg.corpus_qa_fraction:
                question, text = existence_qa(scene, rng, cfg.world)
            question = grid + "\n" + question
        answer = pretrain.encode_answer(processor, text)
        examples.append(pretrain.Example(prompts(question, False), answer))
    return examples


def image_examples(processor, scenes, cfg: DemoConfig, seed: int) -> list[pretrain.Example]:
    """Alignment examples, one per scene: an existence question (`existence_fraction` of them),
    another question (`qa_fraction`), or a caption request."""
    prompts = pretrain.PromptCache(processor)
    rng = np.random.default_rng(seed)
    examples = []
    for index, scene in enumerate(scenes):
        draw = rng.random()
        if draw < cfg.existence_fraction:
            question, answer = existence_qa(scene, rng, cfg.world)
        elif draw < cfg.existence_fraction + cfg.qa_fraction:
            qa = questions(scene, rng, cfg.world)
            question, answer = qa[int(rng.integers(len(qa)))]
        else:
            question = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
            answer = caption(scene)
        examples.append(
            pretrain.Example(
                prompts(question, True), pretrain.encode_answer(processor, answer), index
            )
        )
    return examples


def pretrained_model(cfg: DemoConfig, world: World, cache_dir: Path, log):
    """The tiny LLaVA with its LM and tower pretrained, loaded from the cache when possible."""
    key = _digest(
        "pretrained",
        bpo.__version__,
        _code_digest(),
        cfg.seed,
        asdict(cfg.world),
        asdict(cfg.model),
        cfg.corpus_size,
        cfg.tower_scenes,
        asdict(cfg.lm),
        asdict(cfg.tower),
        cfg.grid_fraction,
        cfg.unknown_prob,
        cfg.corpus_qa_fraction,
    )
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
        losses = pretrain.pretrain_language_model(
            model, texts, cfg.lm.steps, cfg.lm.batch_size, cfg.lm.lr, cfg.seed, advance
        )
    log(f"LM pretraining: {cfg.lm.steps} steps, loss {losses[-1]:.3f} ({time.time() - t0:.0f}s)")
    t0 = time.time()
    pixels = pixel_tensor(processor, world.tower_scenes, cfg.world)
    labels = [cell_labels(s, cfg.world) for s in world.tower_scenes]
    shape_labels = torch.tensor(np.stack([lab[0] for lab in labels]))
    colour_labels = torch.tensor(np.stack([lab[1] for lab in labels]))
    with progress_bar("vision tower pretraining", cfg.tower.steps) as advance:
        accuracy = pretrain.pretrain_vision_tower(
            model,
            pixels,
            shape_labels,
            colour_labels,
            cfg.tower.steps,
            cfg.tower.batch_size,
            cfg.tower.lr,
            cfg.seed,
            advance,
        )
    seconds = time.time() - t0
    log(
        f"tower pretraining: {cfg.tower.steps} steps, cell accuracy {accuracy:.3f} ({seconds:.0f}s)"
    )
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
            losses = pretrain.align(
                model,
                examples,
                pixels,
                stage,
                sc.steps,
                sc.batch_size,
                sc.lr,
                cfg.seed,
                replay=replay if stage == "full" else (),
                replay_weight=cfg.replay_weight,
                progress=advance,
            )
        loss, seconds = np.mean(losses[-10:]), time.time() - t0
        log(f"alignment ({stage}): {sc.steps} steps, loss {loss:.3f} ({seconds:.0f}s)")
    return model
