"""Weakened-negative throughput: the batched backend vs a per-sample loop, side by side in one run.

Both sides call `bpo.bootstrap.weaken.weakened_answers` on the same tiny LLaVA, the same
ShapeWorld requests and the same WeakenConfig through the transformers backend of `bpo.generate`:
the batched side once with a `TransformersGenerator` of batch size `--batch-size` (default 16),
the per-sample side in a Python loop, one request at a time with batch size 1 (the official
code's way). Noise and sampling are keyed per (seed, request, sample), so both sides must
produce identical answers; the script asserts that, which makes the comparison like for like.

Run: python benchmarks/weaken_throughput.py   (prints samples/s for both sides and the ratio;
target >= 5x at batch 16 on a 2-core CPU)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from bpo.bootstrap.config import WeakenConfig
from bpo.bootstrap.weaken import weakened_answers
from bpo.generate import GenerationRequest, TransformersGenerator
from bpo.models.tiny import TinyLlavaConfig, build_tiny_llava
from bpo.shapeworld.world import WorldConfig, caption, questions, render, sample_scene

PROMPTS = ("Describe the image.", "What shapes are in the image? Describe them briefly.")
COMMAND = "python benchmarks/weaken_throughput.py"


def build_requests(count: int, world: WorldConfig, seed: int) -> list[GenerationRequest]:
    """`count` ShapeWorld requests: a rendered scene with a caption prompt or one of its questions
    (prompts of several lengths, so that batches pad as real ones do)."""
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(count):
        scene = sample_scene(rng, world)
        image = Image.fromarray(render(scene, world))
        if i % 2 == 0:
            prompt = PROMPTS[(i // 2) % len(PROMPTS)]
        else:
            qa = questions(scene, rng, world)
            prompt = qa[int(rng.integers(len(qa)))][0]
        requests.append(GenerationRequest([{"role": "user", "content": prompt}], image))
    return requests


def tokenizer_texts(count: int, world: WorldConfig, seed: int) -> list[str]:
    """Captions, questions and answers of fresh scenes, plus the prompt words, for the BPE."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        scene = sample_scene(rng, world)
        texts.append(caption(scene))
        texts.extend(q + " " + a for q, a in questions(scene, rng, world))
    texts.extend(f"USER: {p} ASSISTANT:" for p in PROMPTS)
    return texts


def best_of(repeats: int, run: Callable[[], list]) -> tuple[float, list]:
    """The best wall time of `repeats` runs, and the last run's result."""
    best, result = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    # One thread: the tiny model's ops are microseconds long, so intra-op parallelism costs more
    # (splitting work and spin-waiting worker threads between ops) than it saves, and a second
    # spinning thread would also steal the core the other side of the comparison would have had.
    torch.set_num_threads(args.threads)
    world = WorldConfig()
    model_config = TinyLlavaConfig()
    assert world.image_size == model_config.image_size
    model, processor = build_tiny_llava(tokenizer_texts(2000, world, 1), model_config, seed=0)
    requests = build_requests(args.requests, world, seed=2)
    config = WeakenConfig(
        noise_steps=[900], temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0
    )
    batch = TransformersGenerator(model, processor, batch_size=args.batch_size)
    one = TransformersGenerator(model, processor, batch_size=1)

    def batched() -> list:
        return weakened_answers(batch, requests, config)

    def per_sample() -> list:
        # indices=[i] keys request i's noise and sampling as the batched call does.
        return [weakened_answers(one, [r], config, indices=[i])[0] for i, r in enumerate(requests)]

    # Warm-up: first-call costs (allocator, lazy imports, kernel selection) out of the timings.
    weakened_answers(batch, requests[: args.batch_size], config)
    weakened_answers(one, requests[:1], config)

    samples = args.requests * len(config.noise_steps) * config.samples_per_prompt
    loop_s, loop_answers = best_of(args.repeats, per_sample)
    batch_s, batch_answers = best_of(args.repeats, batched)

    def outputs(answers: list) -> list[list[tuple[str, tuple[int, ...]]]]:
        return [[(a.text, tuple(a.token_ids)) for a in row] for row in answers]

    identical = outputs(loop_answers) == outputs(batch_answers)
    tokens = sum(len(a.token_ids) for row in batch_answers for a in row)
    print(f"command: {COMMAND}" + (" " + " ".join(_given(args)) if _given(args) else ""))
    print(
        f"requests={args.requests} samples={samples} batch_size={args.batch_size} "
        f"max_new_tokens={args.max_new_tokens} threads={torch.get_num_threads()} "
        f"noise_steps={config.noise_steps} temperature={config.temperature} "
        f"generated_tokens={tokens} best_of={args.repeats}"
    )
    print(f"answers identical (batched vs per-sample): {identical}")
    for name, seconds in (
        ("per-sample loop (batch 1)", loop_s),
        (f"batched (batch {args.batch_size})", batch_s),
    ):
        print(f"{name + ':':<27}{samples / seconds:8.1f} samples/s ({seconds:.2f} s)")
    print(f"speed-up of batched over per-sample: {loop_s / batch_s:.2f}x (target >= 5x)")
    assert identical, "batched and per-sample answers differ: the comparison is not like for like"


def _given(args: argparse.Namespace) -> list[str]:
    """The non-default flags, to print the exact command."""
    defaults = {"requests": 64, "batch_size": 16, "max_new_tokens": 32, "threads": 1, "repeats": 2}
    return [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if defaults.get(k) != v]


if __name__ == "__main__":
    main()
