"""The model shapes the verification run measures, and the pieces every part builds from them.

    SHAPES["llava"]  LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 x 1024, 576 image tokens) + Llama-7B
                     (32 x 4096, 32 heads, MLP 11008, vocabulary 32064)
    SHAPES["qwen"]   Qwen2.5-VL-7B: its ViT (32 x 1280, 16 heads, MLP 3420, 14 px patches, 112 px
                     windows, full attention in layers 7, 15, 23, 31, 2x2 merger) on 672 px images
                     (576 image tokens, as LLaVA's) + Qwen2 (28 x 3584, 28 heads, 4 key/value
                     heads, MLP 18944, vocabulary 152064, M-RoPE)
    TINY[...]        the same two architectures at toy sizes, for `--dry-run` on a CPU

Every model is a random init built from its config directly on the device it runs on
(`throughput.build.build_llava`, `shapes.build_qwen2_5_vl`: a `torch.device` context), with a BPE
tokenizer trained on the benchmark's made-up words (`throughput.build.build_processor`). The pairs
are `throughput.build.make_pairs`': answers of `answer_words` words (one token each) around a
shared chosen answer, two rejected answers per image + prompt (BPO's recipe).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import shapes  # benchmarks/shapes.py
from throughput.build import GPU_SPEC, ModelSpec, Settings, build_llava, build_processor

QWEN_7B = ModelSpec(
    image_size=672,
    patch_size=14,
    vision_hidden=1280,
    vision_layers=32,
    vision_heads=16,
    vision_intermediate=3420,
    vision_feature_layer=-1,  # unused: the merger reads the last layer
    text_hidden=3584,
    text_layers=28,
    text_heads=28,
    text_intermediate=18944,
    vocab_size=152064,
    family="qwen2_5_vl",
    merge=2,
    text_kv_heads=4,
)
SHAPES = {"llava": GPU_SPEC, "qwen": QWEN_7B}
# Toy sizes: 56 px / 14 px -> 16 image tokens (LLaVA); 112 px -> 64 patches merged to 16 (Qwen).
TINY = {
    "llava": ModelSpec(56, 14, 32, 1, 2, 64, -2, 64, 2, 2, 128, 1024),
    "qwen": replace(
        QWEN_7B,
        image_size=112,
        vision_hidden=32,
        vision_layers=2,
        vision_heads=2,
        vision_intermediate=64,
        text_hidden=64,
        text_layers=2,
        text_heads=4,
        text_intermediate=128,
        vocab_size=1024,
        text_kv_heads=2,
    ),
}
# The paper's LoRA recipe: r=128, alpha=256 on every linear layer of the language model.
LORA_R, LORA_ALPHA = 128, 256


@dataclass(frozen=True)
class Run:
    """Where and how big: the GPU's 7B shapes in bf16, or the dry run's toy ones in fp32 on CPU."""

    dry: bool

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda:0"

    @property
    def dtype(self) -> str:
        return "float32" if self.dry else "bfloat16"

    def spec(self, shape: str) -> ModelSpec:
        return (TINY if self.dry else SHAPES)[shape]


def settings(run: Run, shape: str, data_dir: str | Path, **changes: Any) -> Settings:
    """The throughput benchmark's settings for `shape`: ~60-token prompts and ~100-token answers
    on the GPU (576 image tokens ahead of them), a few words each in the dry run."""
    import torch

    dry = run.dry
    base = Settings(
        spec=run.spec(shape),
        device=run.device,
        dtype=run.dtype,
        batch_size=2 if dry else 4,
        steps_per_epoch=2 if dry else 6,
        epochs=1,
        warmup=1 if dry else 2,
        prompt_words=4 if dry else 53,  # + the template's ~7 tokens
        answer_words=10 if dry else 98,  # + "." and the end-of-turn token
        answer_jitter=2 if dry else 6,
        lora_r=8 if dry else LORA_R,
        lora_alpha=16 if dry else LORA_ALPHA,
        lr=1e-5,
        beta=0.1,
        gradient_checkpointing=False,
        attn="sdpa",
        threads=1 if dry else torch.get_num_threads(),
        seed=0,
        data_dir=str(data_dir),
    )
    return replace(base, **changes)


def full_attention_layers(vision_layers: int) -> list[int]:
    """Qwen2.5-VL-7B's ViT attends over the whole image in every eighth layer (7, 15, 23, 31) and
    within windows elsewhere; a tower of fewer than eight layers: its last one."""
    return list(range(7, vision_layers, 8)) or [vision_layers - 1]


def build_model(settings: Settings, processor: Any) -> Any:
    """A randomly initialised model of `settings.spec` on its device, in its dtype.

    Qwen: `shapes.build_qwen2_5_vl` with the 7B tower's full-attention layers
    (`full_attention_layers`; that builder makes only the last layer full)."""
    import torch

    spec = settings.spec
    if spec.family != "qwen2_5_vl":
        return build_llava(settings, processor)
    dtype = getattr(torch, settings.dtype)
    model = shapes.build_qwen2_5_vl(
        spec, processor, settings.device, dtype, settings.attn, settings.seed
    )
    full = full_attention_layers(spec.vision_layers)
    visual = model.get_submodule("model.visual")
    if not hasattr(visual, "fullatt_block_indexes"):
        raise AttributeError(
            "Qwen2.5-VL's vision tower has no fullatt_block_indexes in this transformers version; "
            "benchmarks/gpu/specs.py sets them to measure the 7B tower"
        )
    visual.fullatt_block_indexes = full
    model.config.vision_config.fullatt_block_indexes = full
    return model


def build(settings: Settings) -> tuple[Any, Any]:
    """(model, processor) of `settings`."""
    processor = build_processor(settings.spec, settings.seed)
    return build_model(settings, processor), processor


def describe(spec: ModelSpec) -> dict[str, Any]:
    """The shape as the results record it."""
    fields = (
        "family",
        "image_size",
        "patch_size",
        "vision_layers",
        "vision_hidden",
        "text_layers",
        "text_hidden",
        "text_heads",
        "text_intermediate",
        "vocab_size",
    )
    out = {name: getattr(spec, name) for name in fields}
    out["text_kv_heads"] = spec.text_kv_heads or spec.text_heads
    out["image_tokens"] = spec.image_tokens
    return out


def preference_pairs(settings: Settings) -> tuple[list[Any], dict[str, Any]]:
    """The benchmark's pairs as bpo `PreferencePair`s, and their images by path (written to
    `settings.data_dir` first)."""
    from throughput.build import bpo_pairs, load_images, write_images

    write_images(settings)
    pairs = bpo_pairs(settings)
    images = {f"{i}.png": image for i, image in enumerate(load_images(settings))}
    return pairs, images


def pair_batches(settings: Settings, processor: Any, size: int) -> list[Any]:
    """The pairs as bpo's training batches (`PairDataset` + `Collator`: packed rows) of `size`."""
    from bpo.train.batch import pad_token_id
    from bpo.train.data import Collator, PairDataset

    pairs, images = preference_pairs(settings)
    dataset = PairDataset(pairs, processor, None, images)
    collate = Collator(pad_token_id(processor))
    batches = []
    for start in range(0, len(dataset), size):
        collated = collate([dataset[i] for i in range(start, min(start + size, len(dataset)))])
        if collated.bad:
            raise ValueError(f"benchmark pairs that bpo cannot encode: {collated.bad[0].message}")
        batches.append(collated.batch)
    return batches
