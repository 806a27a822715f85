"""How wrong, and how prior-driven, image-weakened negatives are per noise step and temperature.

On a finished demo's base model (`bpo demo --out runs/demo` first), samples one caption per
alignment scene from its image noised at each step, at each temperature, and scores them against
the exact scenes: `with_hallucination` (share naming an absent shape), CHAIR_i, and the partner
share of the hallucinations against its chance level (how much they follow the text prior).

    python benchmarks/weaken_sweep.py --demo runs/demo --scenes 500

It reads the demo's config from results.json, so the scenes are the ones the demo bootstrapped.
Each temperature is one `weakened_answers` call with every step in `noise_steps` (sample index k
of a scene is step k), keyed as `bpo bootstrap` keys them, so a step's captions are the ones a
bootstrap run at those steps would make.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from PIL import Image

from bpo.bootstrap.config import WeakenConfig
from bpo.bootstrap.weaken import weakened_answers
from bpo.demo.base import build_world
from bpo.demo.config import DemoConfig
from bpo.evaluate.shapeworld import hallucination_metrics
from bpo.generate import GenerationRequest, TransformersGenerator
from bpo.models.load import load_model_and_processor
from bpo.shapeworld.world import CAPTION_PROMPTS, render


def demo_config(demo: Path) -> DemoConfig:
    """The DemoConfig the demo at `demo` ran with (results.json's `config`)."""
    parser = ArgumentParser()
    parser.add_argument("--run", type=DemoConfig)
    config = json.loads((demo / "results.json").read_text())["config"]
    return parser.instantiate(parser.parse_object({"run": config})).run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"))
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300, 500, 900])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 0.7, 1.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = demo_config(args.demo)
    scenes = build_world(cfg).align_scenes[: args.scenes]
    model, processor = load_model_and_processor(
        str(args.demo / "base"), dtype="float32", device="cpu", attn_implementation="eager"
    )
    generator = TransformersGenerator(model, processor, batch_size=cfg.negatives.batch_size)
    prompt = [{"role": "user", "content": f"<image>\n{CAPTION_PROMPTS[0]}"}]
    requests = [
        GenerationRequest(prompt, Image.fromarray(render(scene, cfg.world))) for scene in scenes
    ]
    print("step  T    with_halluc  chair_i  partner_share  chance  words")
    for temperature in args.temperatures:
        config = WeakenConfig(
            noise_steps=list(args.steps),
            temperature=temperature,
            max_new_tokens=cfg.negatives.max_new_tokens,
            seed=cfg.seed,
        )
        answers = weakened_answers(generator, requests, config)  # per scene, one per step
        for k, step in enumerate(args.steps):
            texts = [row[k].text for row in answers]
            stats = hallucination_metrics(texts, scenes)
            words = sum(len(t.split()) for t in texts) / len(texts)
            print(
                f"{step:4d}  {temperature:.1f}  {stats['chair_s']:11.3f}  "
                f"{stats['chair_i']:7.3f}  {stats['partner_share']:13.3f}  "
                f"{stats['partner_chance']:6.3f}  {words:5.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
