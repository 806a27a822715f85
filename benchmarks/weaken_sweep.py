"""How wrong, and how prior-driven, image-weakened negatives are per noise step and temperature.

On a finished demo's base model (`bpo demo --out runs/demo` first), samples one caption per
alignment scene from its image noised at each step, at each temperature, and scores them against
the exact scenes: `with_hallucination` (share naming an absent shape), CHAIR_i, and the partner
share of the hallucinations against its chance level (how much they follow the text prior).

    python benchmarks/weaken_sweep.py --demo runs/demo --scenes 500

It reads the demo's config from results.json, so the scenes are the ones the demo bootstrapped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from bpo.models.load import load_model_and_processor
from bpo.shapeworld.demo import DemoConfig, build_world
from bpo.shapeworld.negatives import NegativesConfig, negative_stats, weaken_negatives


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
    print("step  T    with_halluc  chair_i  partner_share  chance  words")
    for step in args.steps:
        for temperature in args.temperatures:
            negatives = NegativesConfig(temperature=temperature)
            texts, _ = weaken_negatives(
                model, processor, scenes, cfg.world, negatives, step, cfg.seed
            )
            stats = negative_stats(texts, scenes)
            words = sum(len(t.split()) for t in texts) / len(texts)
            print(
                f"{step:4d}  {temperature:.1f}  {stats['with_hallucination']:11.3f}  "
                f"{stats['chair_i']:7.3f}  {stats['partner_share']:13.3f}  "
                f"{stats['partner_chance']:6.3f}  {words:5.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
