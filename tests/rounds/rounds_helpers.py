"""A tiny ShapeWorld setup for the rounds tests: datasets, and an IterateConfig over them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bpo.bootstrap.config import BootstrapConfig, InjectConfig, WeakenConfig
from bpo.evaluate.config import BenchmarkConfig, EvalConfig
from bpo.generate import GenerateConfig
from bpo.models.config import ModelConfig
from bpo.rounds.config import IterateConfig, RoundsSettings
from bpo.shapeworld.export import write_llava_dataset
from bpo.shapeworld.world import WorldConfig, sample_scene
from bpo.train.config import LoraSettings, TrainConfig

SAMPLES = 4  # bootstrap.limit: 4 weakened + 4 injected negatives a round, less the rejects
STEPS = 3  # train.max_steps a round


def write_shapeworld(root: Path) -> tuple[Path, Path]:
    """(alignment set, held-out set): ShapeWorld scenes in LLaVA format, captions only."""
    world = WorldConfig()
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, world) for _ in range(SAMPLES + 2)]
    align = write_llava_dataset(
        scenes[:SAMPLES], world, root / "align", seed=0, with_questions=False
    )
    held = write_llava_dataset(scenes[SAMPLES:], world, root / "held", seed=1, with_questions=False)
    return align.parent, held.parent


def tiny_model(folder: Path) -> ModelConfig:
    return ModelConfig(str(folder), dtype="float32", device="cpu", attn_implementation="eager")


def tiny_iterate_config(
    model: Path, align: Path, held: Path, out: str | Path, **settings
) -> IterateConfig:
    """Three rounds of 3 DPO steps (a checkpoint every step) on 4 scenes; CHAIR on 2."""
    bootstrap = BootstrapConfig(
        model=tiny_model(model),
        data=str(align / "data.json"),
        image_root=str(align),
        weaken=WeakenConfig(noise_steps=[900], temperature=1.0, max_new_tokens=8),
        inject=InjectConfig(kind="lexical", vocabulary="shapeworld"),
        batch_size=4,
        chunk_size=4,
        limit=SAMPLES,
    )
    train = TrainConfig(
        model=tiny_model(model),
        image_root=str(align),
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        lr=1e-2,
        max_steps=STEPS,
        batch_size=2,
        warmup_ratio=0.0,
        save_steps=1,
        trackers=[],
        reference_batch_size=4,
    )
    evaluate = EvalConfig(
        model=tiny_model(model),
        generation=GenerateConfig(batch_size=4, max_new_tokens=8),
        benchmarks=[BenchmarkConfig(name="shapeworld_chair", data=str(held))],
    )
    rounds = RoundsSettings(**{"select_metric": "shapeworld_chair.chair_i", **settings})
    return IterateConfig(bootstrap, train, evaluate, rounds, out=str(out))
