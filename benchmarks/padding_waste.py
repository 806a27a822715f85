"""Padding in training batches: a plain seeded shuffle vs length-grouped batches (the default).

Run: python benchmarks/padding_waste.py [--scenes 500] [--synthetic 20000] [--epochs 3]

The padded share is padding tokens / all tokens of the right-padded (B, longest row) tensors
of every micro-batch of an epoch (`bpo.train.data.padded_share`), each row a packed pair
`[prefix | chosen | rejected]` as `bpo.train.batch.collate_pairs` builds it; averaged over
`--epochs` epochs of `bpo.train.data.epoch_batches` (seed 0), without and with `lengths`.

  shapeworld  the demo's pairs, derived from ShapeWorld's generator (no model runs): the demo's
              world and alignment scenes (`--scenes`, its default 500), the demo's prompt, the
              gold caption as chosen; rejected = the lexical injector's rewrite (one pair per
              scene, as the demo's bootstrap makes) and three stand-ins for the weakened
              negatives (one per demo noise step): another random scene's caption, as a model
              blind to the image would write, kept under the demo's 1.5x length cap. Rows are
              encoded exactly (`encode_pair`, image tokens included) with a tiny LLaVA of the
              demo's shape whose tokenizer is trained on the world's captions; the sampler sees
              only `row_lengths` (the text estimate), the waste is measured on the encoded rows.
  synthetic   long-tailed: LLaVA-1.5's 576 image tokens + 12 template tokens + a log-normal
              question (median 12 tokens); chosen log-normal (median 60, sigma 0.9, at most
              2048); rejected half a rewrite (chosen x log-normal(0, 0.2)), half an independent
              sample of the chosen law. The sampler sees the text part with up to a token of
              error per answer, as `row_lengths` would.

Batch sizes: 4 (the LLaVA recipes' per-GPU batch; also as 4 x 8 processes, the recipes' DDP
layout), 16 (configs/train/shapeworld.yaml, the demo's arms) and 64. The reference pass
(`reference_batch_size` 8, store order) is shown for comparison: it does not shuffle at all.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

import bpo.train.data as data_module
from bpo.bootstrap.inject.lexical import InjectionVocabulary, inject_errors
from bpo.data.records import PreferencePair
from bpo.demo.config import DemoConfig
from bpo.models.tiny import build_tiny_llava
from bpo.shapeworld.world import CAPTION_PROMPTS, caption, render, sample_scene
from bpo.train.batch import encode_pair
from bpo.train.data import epoch_batches, padded_share, row_lengths

BATCHES = [(4, 1), (4, 8), (16, 1), (64, 1)]  # (per-process batch, processes)


def shapeworld_pairs(scenes: int, seed: int) -> tuple[list[PreferencePair], dict[str, Image.Image]]:
    """The demo-like pairs of `scenes` scenes (see the module doc) and their images by path."""
    cfg = DemoConfig()
    rng = np.random.default_rng(seed)
    vocabulary = InjectionVocabulary.shapeworld()
    prompt = [{"role": "user", "content": f"<image>\n{CAPTION_PROMPTS[0]}"}]
    cap = cfg.negatives.max_length_ratio
    pairs, images = [], {}
    for k in range(scenes):
        scene = sample_scene(rng, cfg.world)
        gold, path = caption(scene), f"images/{k}.png"
        images[path] = Image.fromarray(render(scene, cfg.world))
        injected = inject_errors(gold, vocabulary, seed=k).text
        if injected is not None:
            pairs.append(PreferencePair(f"s{k}", path, prompt, gold, injected, "inject"))
        for step in cfg.negatives.noise_steps:
            blind = caption(sample_scene(rng, cfg.world))
            if cap is None or len(blind.split()) <= cap * len(gold.split()):
                meta = {"noise_step": step, "sample_index": step}
                pairs.append(PreferencePair(f"s{k}", path, prompt, gold, blind, "weaken", meta))
    return pairs, images


def shapeworld_lengths(scenes: int, seed: int) -> tuple[list[int], list[int], float]:
    """(encoded row lengths, `row_lengths` estimates, estimate cost in s per 1,000 pairs)."""
    pairs, images = shapeworld_pairs(scenes, seed)
    texts = [p.chosen for p in pairs] + [p.rejected for p in pairs] + [CAPTION_PROMPTS[0]]
    _, processor = build_tiny_llava(texts, DemoConfig().model, seed=0)
    real = []
    for pair in pairs:
        item = encode_pair(pair, processor, images[pair.image])
        real.append(len(item.prompt_ids) + len(item.chosen_ids) + len(item.rejected_ids))
    start = time.perf_counter()
    estimate = row_lengths(pairs, processor)
    cost = (time.perf_counter() - start) / len(pairs) * 1000
    return real, estimate, cost


def synthetic_lengths(n: int, seed: int) -> tuple[list[int], list[int]]:
    """(row lengths, the sampler's view of them) of `n` long-tailed pairs (see the module doc)."""
    rng = np.random.default_rng(seed)

    def answer(size: int) -> np.ndarray:
        return np.clip(rng.lognormal(np.log(60), 0.9, size), 1, 2048).astype(int)

    question = np.maximum(1, rng.lognormal(np.log(12), 0.6, n).astype(int))
    chosen = answer(n)
    rewrite = np.maximum(1, (chosen * rng.lognormal(0.0, 0.2, n)).astype(int))
    rejected = np.where(rng.random(n) < 0.5, rewrite, answer(n))
    real = 576 + 12 + question + chosen + rejected
    seen = question + chosen + rejected + rng.integers(-1, 2, n) + rng.integers(-1, 2, n)
    return real.tolist(), seen.tolist()


def epoch_share(
    real: Sequence[int], seen: Sequence[int] | None, batch: int, world: int, epochs: int
) -> float:
    """Padded share of every process's micro-batches, over `epochs` epochs."""
    batches = [
        b
        for epoch in range(epochs)
        for rank in range(world)
        for b in epoch_batches(len(real), batch, 0, epoch, rank, world, seen)
    ]
    return padded_share(real, batches)


def table(name: str, real: Sequence[int], seen: Sequence[int], epochs: int, say: Callable) -> None:
    lengths = np.array(real)
    say(
        f"\n{name}: {len(real)} pairs, row length min {lengths.min()} / median "
        f"{int(np.median(lengths))} / p99 {int(np.percentile(lengths, 99))} / max {lengths.max()}"
    )
    say("| batch | plain shuffle | length-grouped | padding tokens cut |")
    say("|---|---|---|---|")
    for batch, world in BATCHES:
        plain = epoch_share(real, None, batch, world, epochs)
        grouped = epoch_share(real, seen, batch, world, epochs)
        label = f"{batch} x {world} processes" if world > 1 else str(batch)
        cut = 1 - (grouped / (1 - grouped)) / (plain / (1 - plain)) if plain else 0.0
        say(f"| {label} | {plain:.1%} | {grouped:.1%} | {cut:.0%} |")
    stored = [list(range(at, min(at + 8, len(real)))) for at in range(0, len(real), 8)]
    say(f"reference pass, batch 8 in store order: {padded_share(real, stored):.1%} padding")


def group_size_sweep(real: Sequence[int], seen: Sequence[int], epochs: int, say: Callable) -> None:
    """The grouped share at batch 16 for other mega-batch sizes (the default is 50 batches)."""
    default = data_module.LENGTH_GROUP_BATCHES
    shares = []
    try:
        for k in (5, 20, 50, 200):
            data_module.LENGTH_GROUP_BATCHES = k
            shares.append(f"{k}: {epoch_share(real, seen, 16, 1, epochs):.1%}")
    finally:
        data_module.LENGTH_GROUP_BATCHES = default
    say("batches per mega-batch (batch 16): " + ", ".join(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=500, help="ShapeWorld scenes (demo: 500)")
    parser.add_argument("--synthetic", type=int, default=20000, help="long-tailed pairs")
    parser.add_argument("--epochs", type=int, default=3, help="epochs averaged")
    args = parser.parse_args()
    say = print
    real, estimate, cost = shapeworld_lengths(args.scenes, seed=0)
    offsets = np.array(real) - np.array(estimate)
    table("ShapeWorld (demo pairs)", real, estimate, args.epochs, say)
    say(
        f"row_lengths: {cost * 1000:.0f} ms per 1,000 pairs; encoded row - estimate spans "
        f"{offsets.min()}..{offsets.max()} tokens (image tokens and template)"
    )
    real, seen = synthetic_lengths(args.synthetic, seed=0)
    table("Synthetic long-tailed (LLaVA-1.5 image)", real, seen, args.epochs, say)
    group_size_sweep(real, seen, args.epochs, say)


if __name__ == "__main__":
    main()
