"""Model shapes for `train_throughput.py` besides its LLaVA one, built from config (random init).

    QWEN2_5_VL_CPU   the CPU shape of `--family qwen2_5_vl` (sizes as train_throughput's CPU
                     LLaVA: 196 image tokens, 4 text layers of 384, vocabulary 1,024)
    build_qwen2_5_vl_processor(spec, texts) -> Qwen2_5_VLProcessor
    build_qwen2_5_vl(spec, processor, device, dtype, attn, seed)
        -> Qwen2_5_VLForConditionalGeneration

Qwen2.5-VL-shaped: the family's own classes (`Qwen2_5_VLForConditionalGeneration`,
`Qwen2_5_VLProcessor` with Qwen2-VL's image processor and chat template, from
`bpo.models.tiny_families.qwen`). Its ViT cuts a 392x392 image into 28x28 patches of 14 px (of 2
frames: a still image is repeated), attends within 112 px windows (8x8 patches) in every layer
but the last, which attends over the whole image, and its merger turns 2x2 patches into one
`<|image_pad|>` token: 196 image tokens, as the LLaVA shape's 224 / 16 = 14 x 14. The decoder is
Qwen2 with 3-D M-RoPE positions, grouped-query attention (6 query, 2 key/value heads of 64) and
untied embeddings (as Qwen2.5-VL-7B).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Qwen2.5-VL-7B's ViT window: 112 px, 8x8 patches of 14 px.
WINDOW = 112
MERGE = 2
QWEN2_5_VL_CPU_FIELDS: dict[str, Any] = {
    "image_size": 392,
    "patch_size": 14,
    "vision_hidden": 192,
    "vision_layers": 2,
    "vision_heads": 4,
    "vision_intermediate": 768,
    "vision_feature_layer": -1,  # unused: the merger reads the last layer
    "text_hidden": 384,
    "text_layers": 4,
    "text_heads": 6,
    "text_intermediate": 1024,
    "vocab_size": 1024,
    "family": "qwen2_5_vl",
    "merge": MERGE,
    "text_kv_heads": 2,
}


def _sizes(spec: Any):
    from bpo.models.tiny_families import TinySizes

    return TinySizes(
        text_hidden=spec.text_hidden,
        text_intermediate=spec.text_intermediate,
        text_layers=spec.text_layers,
        text_heads=spec.text_heads,
        text_kv_heads=spec.text_kv_heads,
        max_positions=4096,
        vision_hidden=spec.vision_hidden,
        vision_intermediate=spec.vision_intermediate,
        vision_layers=spec.vision_layers,
        vision_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )


def build_qwen2_5_vl_processor(spec: Any, texts: Sequence[str]):
    """Qwen2.5-VL's processor: a byte-level BPE of `spec.vocab_size` trained on `texts` with the
    family's special tokens, Qwen2-VL's image processor at `spec`'s patch and image size (a
    `spec.image_size` square stays that size), Qwen2.5-VL-Instruct's chat template."""
    from transformers import Qwen2_5_VLProcessor

    from bpo.models.tiny_families.common import family_tokenizer
    from bpo.models.tiny_families.qwen import QWEN2_VL_CHAT_TEMPLATE, QWEN_TOKENS, qwen_processor

    tokenizer = family_tokenizer(texts, QWEN_TOKENS, vocab_size=spec.vocab_size)
    tokenizer.model_max_length = 4096
    return qwen_processor(
        Qwen2_5_VLProcessor,
        "Qwen2VLVideoProcessor",
        tokenizer,
        QWEN2_VL_CHAT_TEMPLATE,
        _sizes(spec),
    )


def build_qwen2_5_vl(spec: Any, processor: Any, device: str, dtype: Any, attn: str, seed: int):
    """A randomly initialised Qwen2_5_VLForConditionalGeneration of `spec`, on `device`."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from bpo.models.tiny_families.qwen import mrope, vision_token_ids

    tokenizer = processor.tokenizer
    head_dim = spec.text_hidden // spec.text_heads
    # Qwen2.5-VL-7B's M-RoPE sections [16, 24, 24] for head_dim 128, scaled to this head_dim.
    sections = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": spec.vision_layers,
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_intermediate,
            "num_heads": spec.vision_heads,
            "out_hidden_size": spec.text_hidden,
            "patch_size": spec.patch_size,
            "spatial_merge_size": spec.merge,
            "temporal_patch_size": 2,
            "window_size": WINDOW,
            "fullatt_block_indexes": [spec.vision_layers - 1],
        },
        text_config={
            "vocab_size": max(len(tokenizer), spec.vocab_size),
            "hidden_size": spec.text_hidden,
            "intermediate_size": spec.text_intermediate,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": mrope(sections),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
        },
        tie_word_embeddings=False,
        **vision_token_ids(tokenizer),
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)


def describe_qwen2_5_vl(spec: Any) -> str:
    """One line naming the shape (the benchmark's header)."""
    patches = (spec.image_size // spec.patch_size) ** 2
    return (
        f"Qwen2.5-VL-shaped, random init: ViT {spec.vision_layers}x{spec.vision_hidden} "
        f"({spec.image_size}px/{spec.patch_size} -> {patches} patches, {WINDOW}px windows, "
        f"merged {spec.merge}x{spec.merge} -> {spec.image_tokens} image tokens), Qwen2 "
        f"{spec.text_layers}x{spec.text_hidden} ({spec.text_heads} heads, {spec.text_kv_heads} "
        f"kv, mlp {spec.text_intermediate}, vocab {spec.vocab_size}, M-RoPE)"
    )
