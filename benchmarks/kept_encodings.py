"""`bpo train` with and without `keep_encoded_pairs`, side by side in one run.

A tiny LLaVA built from the demo's model config (random weights) trains as the demo's `bpo` arm
does (`bpo.demo.arms.arm_train_config`), on ShapeWorld caption pairs (the gold caption against
another scene's), in memory, several epochs. With the encodings kept, every epoch after the first skips
image processing, tokenization and the dense preference's token matching. The two settings run
in turns (off, on, off, on); the metrics logged at every step must be equal between them, and the
ratio is of the faster of each setting's runs.

Run: python benchmarks/kept_encodings.py            (512 pairs, batch 16, 3 epochs, 1 thread)
     python benchmarks/kept_encodings.py --epochs 2 --pairs 256   (quicker)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from bpo.data.records import PreferencePair
from bpo.demo.arms import ARMS, arm_train_config
from bpo.demo.base import World, build_world, tokenizer_texts
from bpo.demo.config import DemoConfig
from bpo.models.tiny import build_tiny_llava, save_tiny_llava
from bpo.shapeworld.world import CAPTION_PROMPTS, caption, render
from bpo.train.config import TrainConfig
from bpo.train.run import train


def caption_pairs(cfg: DemoConfig, count: int) -> tuple[list[PreferencePair], dict, World]:
    """`count` pairs (a scene's gold caption against the next scene's), their images, the world."""
    world = build_world(cfg)
    scenes = world.align_scenes[: count + 1]
    ask = [{"role": "user", "content": f"<image>\n{CAPTION_PROMPTS[0]}"}]
    pairs, images = [], {}
    for k, scene in enumerate(scenes[:-1]):
        path = f"scene{k}.png"
        images[path] = Image.fromarray(render(scene, cfg.world))
        pairs.append(
            PreferencePair(f"p{k}", path, ask, caption(scene), caption(scenes[k + 1]), "weaken")
        )
    return pairs, images, world


def quiet(_line: str) -> None:
    pass


def run_config(base: str, keep: bool, epochs: int) -> TrainConfig:
    """The demo's `bpo` arm as it trains (seed 0), in memory, `epochs` epochs."""
    here = Path(".")
    config = arm_train_config(ARMS["bpo"], 0, DemoConfig().training, Path(base), here, here, here)
    return replace(
        config,
        pairs=None,
        image_root=None,
        out=None,
        epochs=epochs,
        max_steps=None,
        keep_encoded_pairs=keep,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="/tmp/bpo-kept-encodings-base")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = DemoConfig(corpus_size=2000, tower_scenes=10, align_scenes=args.pairs + 1, eval_scenes=10)
    pairs, images, world = caption_pairs(cfg, args.pairs)
    model, processor = build_tiny_llava(tokenizer_texts(world, cfg.world), cfg.model)
    base = str(save_tiny_llava(model, processor, args.out, cfg.model))
    seconds: dict[bool, list[float]] = {False: [], True: []}
    history: dict[bool, list[dict]] = {}
    for keep in (False, True, False, True):
        start = time.perf_counter()
        result = train(run_config(base, keep, args.epochs), pairs=pairs, images=images, log=quiet)
        seconds[keep].append(time.perf_counter() - start)
        history.setdefault(keep, result.history)
        print(f"keep_encoded_pairs={keep}: {seconds[keep][-1]:.1f} s", flush=True)
    assert history[False] == history[True], "kept encodings changed the training metrics"
    best = {keep: min(values) for keep, values in seconds.items()}
    steps = len(history[True])
    print(f"{args.pairs} pairs, {args.epochs} epochs, {steps} steps: metrics equal at every step")
    print(f"speed-up of kept encodings: {best[False] / best[True]:.2f}x")


if __name__ == "__main__":
    main()
