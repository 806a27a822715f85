"""Packed vs naive pair scoring, one training step, for every first-class model family.

Run: python benchmarks/family_prefix_sharing.py [--pairs 2] [--repeats 5] [--threads 1]
         [--families llava,qwen2_vl,...]      (all 11 families: ~9 min on one thread)

Each family's own transformers classes, built from config (`bpo.models.tiny_families` with a
`TinySizes`), random weights, fp32, eager attention everywhere: a 2-layer text model of hidden
256 (4 heads of 64; 2 key/value heads where the family has them, MLP 768) and a 1-layer vision
tower of hidden 64 (1 head of 64, MLP 256; Qwen2.5-VL 2 layers, one windowed, one full). The
shape is LLaVA-1.5's: one image of 576-595 image tokens per pair (14 px patches on images sized
so that the family's merging, pooling, pixel shuffle or anyres crops give that many; GEOMETRY),
the family's chat template around a short question (a prefix of ~590-660 tokens), and answers
of 100-130 random vocabulary tokens (fixed seed), `--pairs` pairs a batch.

One step = forward + backward of sum(chosen - rejected) over every parameter (full fine-tune):

  naive   `bpo.train.logprobs.naive_pair_logps`: 2B rows [prefix + chosen; prefix + rejected],
          each pair's image encoded twice, full logits.
  packed  `bpo.train.logprobs.pair_logps`: one row [prefix | chosen | rejected] per pair with a
          block attention mask (one per layer type for Gemma 3), M-RoPE positions from the
          model's rope index (Qwen); the library's path.

Both run on the same model and batch. Their log-probs are checked first: |packed - naive| of
each answer's summed log-prob, divided by its token count, must be < 1e-4 (the sums, ~-700 in
fp32, as the log-softmax always runs in fp32, have a resolution of 6.1e-5 and differ by 0-2 of
those steps). Each variant also runs with its images' features given (`cached_images`: the
family's `get_image_features` returns them precomputed, so the vision tower and projector run
neither forward nor backward). The four then run round-robin, a warm-up step and `--repeats`
timed steps each, timed in process CPU time (one thread: the compute a step takes, whatever
else the shared machine runs; wall-clock time is kept too). The table gives the median step of
naive and packed, naive / packed (and the same in wall-clock time), the steps with the features
given and their ratio (what sharing the prefix buys in the language model alone; `--no-given`
skips them and halves the run), and the activation memory autograd saves (warm-up step). The
last line is a JSON object with every family's numbers. Target: naive / packed >= 1.4 for every
family (2-core CPU, 1 thread).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from bpo.data.records import PreferencePair
from bpo.models.tiny_families import FIRST_CLASS, TinySizes, build_tiny_family
from bpo.train.batch import EncodedPair, PairBatch, collate_pairs, encode_pair, pad_token_id
from bpo.train.logprobs import _duplicated_vision, naive_pair_logps, pair_logps

COMMAND = "python benchmarks/family_prefix_sharing.py"
VARIANTS = {"naive": naive_pair_logps, "packed": pair_logps}
ANSWER_TOKENS = (100, 130)
PREFIX_TARGET = 590  # questions get filler words until the prefix has about this many tokens
TOLERANCE = 1e-4
TEXTS = [
    "a red circle and a blue square .",
    "a green triangle next to a yellow circle .",
    "Describe the image. What is in it? How many shapes are there?",
] * 8


@dataclass(frozen=True)
class Geometry:
    """A family's image: its side in pixels, the tower's patch, and config extras."""

    image_size: int
    patch_size: int = 14
    vision_layers: int = 1
    vision_extra: dict[str, Any] = field(default_factory=dict)
    text_extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""


# 14 px patches everywhere (CLIP ViT-L/14's, SigLIP's, Qwen-VL's): n = image_size / 14 per side.
GEOMETRY = {
    "llava": Geometry(336, note="24^2 patches"),
    "llava_next": Geometry(238, note="whole image 17^2 + one crop 17^2 + 17 newlines"),
    "llava_onevision": Geometry(238, note="whole image 17^2 + one crop 17^2 + 17 newlines"),
    "qwen2_vl": Geometry(672, note="48^2 patches merged 2x2"),
    # Qwen2.5-VL's own window: 112 px, 8x8 patches (full attention in the last layer).
    "qwen2_5_vl": Geometry(
        672, vision_layers=2, vision_extra={"window_size": 112}, note="48^2 merged 2x2"
    ),
    # Qwen3-VL's own 48x48 grid of learned position embeddings.
    "qwen3_vl": Geometry(
        672, vision_extra={"num_position_embeddings": 48 * 48}, note="48^2 merged 2x2"
    ),
    # Gemma 3 slides over 1024 tokens, longer than these rows; 256 keeps the window in play.
    "gemma3": Geometry(672, text_extra={"sliding_window": 256}, note="48^2 pooled 2x2"),
    "internvl": Geometry(672, note="48^2 pixel-shuffled 2x2"),
    "idefics3": Geometry(672, note="48^2 pixel-shuffled 2x2"),
    "smolvlm": Geometry(672, note="48^2 pixel-shuffled 2x2"),
    "mistral3": Geometry(672, note="48^2 merged 2x2 + 24 [IMG_BREAK]/[IMG_END]"),
}


def sizes_for(name: str) -> TinySizes:
    g = GEOMETRY[name]
    return TinySizes(
        text_hidden=256,
        text_intermediate=768,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
        max_positions=2048,
        vision_hidden=64,
        vision_intermediate=256,
        vision_layers=g.vision_layers,
        vision_heads=1,
        image_size=g.image_size,
        patch_size=g.patch_size,
        vision_extra=g.vision_extra,
        text_extra=g.text_extra,
    )


def answer_vocabulary(tokenizer) -> list[int]:
    """Ids an answer may hold: the trained vocabulary without any special or added token."""
    added = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in added]


def encode_prefix(processor, image: Image.Image, words: int, rng: random.Random) -> EncodedPair:
    """The family's chat prompt with the image and a question of `words` filler words."""
    fill = " ".join(rng.choice(["red", "blue", "circle", "square", "shapes"]) for _ in range(words))
    question = "Describe the image." + (f" {fill}" if fill else "")
    pair = PreferencePair(
        id="p",
        image="x.png",
        prompt=[{"role": "user", "content": "<image>\n" + question}],
        chosen="a red circle .",
        rejected="a blue square .",
        source="benchmark",
    )
    return encode_pair(pair, processor, image)


def make_batch(processor, image_size: int, pairs: int, seed: int = 0) -> PairBatch:
    """`pairs` pairs: a noise image each, the family's prompt (~PREFIX_TARGET tokens), two
    answers of random vocabulary ids."""
    rng = random.Random(seed)
    pixels = np.random.default_rng(seed)
    vocabulary = answer_vocabulary(processor.tokenizer)
    items = []
    for i in range(pairs):
        image = Image.fromarray(pixels.integers(0, 256, (image_size, image_size, 3), np.uint8))
        item = encode_prefix(processor, image, 0, rng)
        deficit = PREFIX_TARGET - len(item.prompt_ids)
        if deficit > 10:  # ~1 token per filler word
            item = encode_prefix(processor, image, deficit, rng)
        item.key = f"p{i}"
        item.chosen_ids = rng.choices(vocabulary, k=rng.randint(*ANSWER_TOKENS))
        item.rejected_ids = rng.choices(vocabulary, k=rng.randint(*ANSWER_TOKENS))
        items.append(item)
    return collate_pairs(items, pad_token_id(processor))


def image_tokens(model, batch: PairBatch) -> int:
    """Image tokens in the first pair's prefix (the model's image token id)."""
    config = model.config
    image_id = getattr(config, "image_token_id", None)
    if image_id is None:
        image_id = config.image_token_index
    prefix = batch.tensors["input_ids"][0, : int(batch.tensors["prefix_lengths"][0])]
    return int((prefix == image_id).sum())


def step(model, variant: str, batch: PairBatch, measure: bool = False) -> int:
    """One forward + backward; with `measure`, the bytes autograd saved for the backward."""
    storages: dict[int, int] = {}

    def pack(tensor):
        if tensor.numel():
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    if measure:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            logps = VARIANTS[variant](model, batch)
    else:
        logps = VARIANTS[variant](model, batch)
    (logps.rejected - logps.chosen).sum().backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for ptr, size in storages.items() if ptr not in params)


def _leaves(out: Any) -> Any:
    """`out` (a model output, list or tensor) with every float tensor a detached leaf that takes
    gradients, as image features coming from outside the graph."""
    if isinstance(out, torch.Tensor):
        return out.detach().requires_grad_(out.is_floating_point())
    if isinstance(out, (list, tuple)):
        return type(out)(_leaves(item) for item in out)
    for key in list(getattr(out, "keys", dict)()):
        out[key] = _leaves(out[key])
    return out


@contextmanager
def cached_images(model, vision: dict[str, torch.Tensor]) -> Iterator[None]:
    """Steps inside take these images' features as given: the inner model's
    `get_image_features` (what every family's forward calls) returns them, computed once, so
    the vision tower and projector run neither forward nor backward."""
    inner = model.model
    with torch.no_grad():
        features = _leaves(inner.get_image_features(**vision, return_dict=True))
    inner.get_image_features = lambda *args, **kwargs: features
    try:
        yield
    finally:
        del inner.get_image_features


def max_diff(model, batch: PairBatch) -> tuple[float, float]:
    """(max |packed - naive| over both answers' summed log-probs, the same per answer token)."""
    with torch.no_grad():
        naive = naive_pair_logps(model, batch)
        packed = pair_logps(model, batch)
    diffs, per_token = [], []
    for answer in ("chosen", "rejected"):
        tokens = getattr(naive, f"{answer}_tokens")
        assert torch.equal(tokens, getattr(packed, f"{answer}_tokens")), answer
        diff = (getattr(packed, answer) - getattr(naive, answer)).abs()
        diffs.append(diff.max().item())
        per_token.append((diff / tokens).max().item())
    return max(diffs), max(per_token)


def run_family(name: str, pairs: int, repeats: int, given: bool = True) -> dict[str, Any]:
    g = GEOMETRY[name]
    torch.manual_seed(0)
    model, processor = build_tiny_family(name, TEXTS, seed=0, sizes=sizes_for(name))
    model.set_attn_implementation("eager")
    model.train()
    batch = make_batch(processor, g.image_size, pairs)
    t = batch.tensors
    diff, per_token = max_diff(model, batch)
    if per_token >= TOLERANCE:
        raise SystemExit(f"{name}: packed log-probs differ from naive by {per_token:.1e} a token")
    saved = {variant: step(model, variant, batch, measure=True) for variant in VARIANTS}
    # The same steps with each variant's image features given (naive: 2B images, packed: B).
    images = {"naive": _duplicated_vision(batch), "packed": batch.vision}
    keys: tuple[str, ...] = tuple(VARIANTS)
    if given:
        keys += tuple(f"{v}_cached" for v in VARIANTS)
        for variant in VARIANTS:  # warm-up
            with cached_images(model, images[variant]):
                step(model, variant, batch)
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    wall: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(repeats):
        for key in keys:
            variant = key.removesuffix("_cached")
            with cached_images(model, images[variant]) if key != variant else nullcontext():
                start_cpu, start_wall = time.process_time(), time.perf_counter()
                step(model, variant, batch)
                cpu[key].append(time.process_time() - start_cpu)
                wall[key].append(time.perf_counter() - start_wall)
    median = {k: statistics.median(v) for k, v in cpu.items()}
    wall_median = {k: statistics.median(v) for k, v in wall.items()}
    return {
        "family": name,
        "model": type(model).__name__,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "prefix_tokens": round(t["prefix_lengths"].float().mean().item(), 1),
        "image_tokens": image_tokens(model, batch),
        "chosen_tokens": t["chosen_lengths"].tolist(),
        "rejected_tokens": t["rejected_lengths"].tolist(),
        "packed_row": t["input_ids"].shape[1],
        "max_abs_diff": diff,
        "max_abs_diff_per_token": per_token,
        "naive_ms": round(median["naive"] * 1e3, 1),
        "packed_ms": round(median["packed"] * 1e3, 1),
        "speedup": round(median["naive"] / median["packed"], 3),
        "naive_wall_ms": round(wall_median["naive"] * 1e3, 1),
        "packed_wall_ms": round(wall_median["packed"] * 1e3, 1),
        "speedup_wall": round(wall_median["naive"] / wall_median["packed"], 3),
        # The step with the image features given: decoder, LM head, masks, positions; what
        # sharing the prefix buys in the language model alone.
        # (The vision tower's part of a step, the step minus the cached one, is within the
        # medians' noise for the LLaVA families: ~50-100 ms.)
        **(
            {
                "naive_cached_ms": round(median["naive_cached"] * 1e3, 1),
                "packed_cached_ms": round(median["packed_cached"] * 1e3, 1),
                "speedup_vision_given": round(median["naive_cached"] / median["packed_cached"], 3),
            }
            if given
            else {}
        ),
        "saved_mib_naive": round(saved["naive"] / 2**20, 1),
        "saved_mib_packed": round(saved["packed"] / 2**20, 1),
        "note": g.note,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "| family | prefix (image) | answers c / r | naive ms | packed ms | naive/packed "
        "| wall-clock | features given: naive / packed ms | ratio | saved MiB naive / packed "
        "| max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, rej = statistics.fmean(r["chosen_tokens"]), statistics.fmean(r["rejected_tokens"])
        print(
            f"| {r['family']} | {r['prefix_tokens']:.0f} ({r['image_tokens']}) | {c:.0f} / "
            f"{rej:.0f} | {r['naive_ms']:.0f} | {r['packed_ms']:.0f} | **{r['speedup']:.2f}x** "
            f"| {r['speedup_wall']:.2f}x "
            + (
                f"| {r['naive_cached_ms']:.0f} / {r['packed_cached_ms']:.0f} "
                f"| {r['speedup_vision_given']:.2f}x "
                if "naive_cached_ms" in r
                else "| - | - "
            )
            + f"| {r['saved_mib_naive']:.0f} / {r['saved_mib_packed']:.0f} "
            f"| {r['max_abs_diff']:.1e} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="pairs per batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--families", default=",".join(FIRST_CLASS), help="comma-separated")
    parser.add_argument("--target", type=float, default=1.4, help="naive/packed to reach")
    parser.add_argument(
        "--no-given",
        action="store_true",
        help="skip the steps with image features given (halves the run)",
    )
    args = parser.parse_args()
    families = [f for f in args.families.split(",") if f]
    unknown = set(families) - set(GEOMETRY)
    if unknown:
        raise SystemExit(f"unknown families {sorted(unknown)}; from {', '.join(GEOMETRY)}")
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"command: {COMMAND} {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"{args.pairs} pairs a batch, {args.repeats} timed steps per variant (median), "
        f"{args.threads} thread(s), fp32, eager attention, full fine-tune"
    )
    rows = []
    for name in families:
        start = time.perf_counter()
        row = run_family(name, args.pairs, args.repeats, not args.no_given)
        rows.append(row)
        print(
            f"{name}: {row['model']} {row['params_m']}M params, prefix {row['prefix_tokens']:.0f} "
            f"({row['image_tokens']} image: {row['note']}), answers {row['chosen_tokens']} / "
            f"{row['rejected_tokens']}, naive {row['naive_ms']:.0f} ms, packed "
            f"{row['packed_ms']:.0f} ms, {row['speedup']:.2f}x (wall-clock "
            f"{row['speedup_wall']:.2f}x), |diff| {row['max_abs_diff']:.1e} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    print()
    print_table(rows)
    short = [r["family"] for r in rows if r["speedup"] < args.target]
    print(
        f"\ntarget naive/packed >= {args.target} for every family: "
        + ("met" if not short else f"NOT met by {', '.join(short)}")
    )
    summary = {
        "speedup": {r["family"]: r["speedup"] for r in rows},
        "min_speedup": min(r["speedup"] for r in rows),
        "pairs": args.pairs,
        "repeats": args.repeats,
        "threads": args.threads,
        "families": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
