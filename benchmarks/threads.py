"""Tiny-model alignment step time with 1 vs 2 torch threads, side by side in one run.

Run: python benchmarks/threads.py   (prints ms/step for each setting, twice, and the ratio)
"""

from __future__ import annotations

import time

import torch

from bpo.demo import pretrain
from bpo.demo.base import build_world, image_examples, pixel_tensor, tokenizer_texts
from bpo.demo.config import DemoConfig
from bpo.models.tiny import build_tiny_llava

STEPS = 30


def main() -> None:
    cfg = DemoConfig(corpus_size=2000, tower_scenes=10, align_scenes=256, eval_scenes=10)
    world = build_world(cfg)
    model, processor = build_tiny_llava(tokenizer_texts(world, cfg.world), cfg.model)
    pixels = pixel_tensor(processor, world.align_scenes, cfg.world)
    examples = image_examples(processor, world.align_scenes, cfg, 0)
    timings: dict[int, list[float]] = {1: [], 2: []}
    for threads in (1, 2, 1, 2):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        pretrain.align(model, examples, pixels, "full", STEPS, 32, 1e-3, 0)
        timings[threads].append((time.perf_counter() - start) / STEPS * 1000)
        print(f"threads={threads}: {timings[threads][-1]:.1f} ms/step", flush=True)
    best = {t: min(v) for t, v in timings.items()}
    print(f"speed-up of 2 threads over 1: {best[1] / best[2]:.2f}x")


if __name__ == "__main__":
    main()
