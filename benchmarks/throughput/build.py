"""The benchmark's model, data and settings, built identically in every side's process."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import shapes  # benchmarks/shapes.py

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class ModelSpec:
    """A LLaVA-shaped model (CLIP vision tower + 2-layer MLP projector + Llama), or with
    `family="qwen2_5_vl"` a Qwen2.5-VL-shaped one (`shapes.py`: windowed ViT, 2x2 patch merger,
    Qwen2 with M-RoPE)."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    vision_feature_layer: int  # LLaVA-1.5 takes the penultimate layer's patches
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vocab_size: int  # at least the tokenizer's size; real LLaVA-1.5 has 32064
    family: str = "llava"
    merge: int = 1  # merge x merge patches become one image token (Qwen: 2)
    text_kv_heads: int = 0  # Qwen's; LLaVA's Llama has as many as text_heads

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_tokens(self) -> int:
        return self.patches // self.merge**2

    @property
    def vision_positions(self) -> int:
        """Positions the vision tower runs over: CLIP adds a CLS position to the patches."""
        return self.patches + (1 if self.family == "llava" else 0)


# CPU: 196 image tokens (224 / 16) and a small Llama: bpo's step (4 pairs) takes ~0.5 s on 2 cores.
# The vision tower is small next to the language model, as CLIP ViT-L is next to Llama-7B.
CPU_SPEC = ModelSpec(224, 16, 192, 2, 4, 768, -2, 384, 4, 6, 1024, 1024)
# LLaVA-1.5-7B: CLIP ViT-L/14-336 (576 image tokens) + Llama-2-7B (vicuna) sizes.
GPU_SPEC = ModelSpec(336, 14, 1024, 24, 16, 4096, -2, 4096, 32, 32, 11008, 32064)
# `--family`: the CPU shape of each (`shapes.py` builds the non-LLaVA ones).
CPU_SPECS = {"llava": CPU_SPEC, "qwen2_5_vl": ModelSpec(**shapes.QWEN2_5_VL_CPU_FIELDS)}


@dataclass
class Settings:
    """Everything a side needs to rebuild the same model and data in its own process.

    Every side trains `epochs` epochs of `steps_per_epoch` steps over the same
    `batch_size * steps_per_epoch` pairs; the first `warmup` steps are left out of the step-only
    median (not out of the end-to-end time).
    """

    spec: ModelSpec
    device: str
    dtype: str
    batch_size: int
    steps_per_epoch: int
    epochs: int
    warmup: int
    prompt_words: int
    answer_words: int
    answer_jitter: int  # answers are answer_words +- jitter words long
    lora_r: int
    lora_alpha: int
    lr: float
    beta: float
    gradient_checkpointing: bool
    attn: str
    threads: int
    seed: int
    data_dir: str = ""
    # Pairs per sample (image + prompt + chosen): BPO's recipe makes two, one weakened and one
    # error-injected negative of each gold answer (configs/bootstrap/llava-1.5-7b.yaml).
    negatives_per_sample: int = 2

    @property
    def pairs(self) -> int:
        return self.batch_size * self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def word_list(count: int, seed: int) -> list[str]:
    """Distinct pronounceable words; the tokenizer learns each as one token."""
    rng = random.Random(seed)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: set[str] = set()
    while len(words) < count:
        syllables = rng.randint(2, 3)
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)))
    return sorted(words)


def make_pairs(settings: Settings) -> list[dict[str, Any]]:
    """Preference pairs as plain dicts: id, image (its sample's index), question, chosen,
    rejected; `negatives_per_sample` consecutive pairs share image, question and chosen answer,
    each with its own rejected answer (a hallucinated quarter of the words, another length)."""
    rng = random.Random(settings.seed)
    words = word_list(200, settings.seed)
    pairs = []
    per_sample = settings.negatives_per_sample
    for sample in range(-(-settings.pairs // per_sample)):
        question = " ".join(rng.choice(words) for _ in range(settings.prompt_words)) + "?"
        n = settings.answer_words + rng.randint(-settings.answer_jitter, settings.answer_jitter)
        chosen = [rng.choice(words) for _ in range(n)]
        for _ in range(per_sample):
            rejected = list(chosen)
            for j in rng.sample(range(n), k=max(1, n // 4)):
                rejected[j] = rng.choice(words)
            extra = rng.randint(-settings.answer_jitter, settings.answer_jitter)
            rejected = rejected[: n + extra] if extra < 0 else rejected + rng.sample(words, extra)
            pairs.append(
                {
                    "id": f"pair_{len(pairs)}",
                    "image": sample,
                    "question": question,
                    "chosen": " ".join(chosen) + ".",
                    "rejected": " ".join(rejected) + ".",
                }
            )
    return pairs[: settings.pairs]


def bpo_pairs(settings: Settings) -> list:
    """`make_pairs` as bpo `PreferencePair`s, each image `{sample}.png` under the image root."""
    from bpo.data.records import PreferencePair

    return [
        PreferencePair(
            id=p["id"],
            image=f"{p['image']}.png",
            prompt=[{"role": "user", "content": "<image>\n" + p["question"]}],
            chosen=p["chosen"],
            rejected=p["rejected"],
            source="benchmark",
        )
        for p in make_pairs(settings)
    ]


def build_processor(spec: ModelSpec, seed: int):
    """A LlavaProcessor (LLaVA-1.5 chat template) with a BPE tokenizer trained on the words, or
    the family's processor (`shapes.py`) with one trained on the same text."""
    from bpo.models.tiny import TinyLlavaConfig, train_bpe_tokenizer
    from bpo.models.tiny import build_processor as tiny_processor

    words = word_list(200, seed)
    rng = random.Random(seed)
    texts = [" ".join(rng.sample(words, 40)) for _ in range(400)]
    texts += ["USER: ASSISTANT:", "?", "."] * 50
    if spec.family == "qwen2_5_vl":
        return shapes.build_qwen2_5_vl_processor(spec, texts)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=1024)
    config = TinyLlavaConfig(image_size=spec.image_size, patch_size=spec.patch_size)
    # CLIP's normalization; the images are noise, so the values only need to be sane.
    config.image_mean = (0.48145466, 0.4578275, 0.40821073)
    config.image_std = (0.26862954, 0.26130258, 0.27577711)
    return tiny_processor(config, tokenizer)


def build_model(settings: Settings, processor):
    """A randomly initialised model of `settings.spec`, on its device: LLaVA here, others from
    `shapes.py`."""
    import torch

    spec = settings.spec
    if spec.family == "qwen2_5_vl":
        dtype = getattr(torch, settings.dtype)
        return shapes.build_qwen2_5_vl(
            spec, processor, settings.device, dtype, settings.attn, settings.seed
        )
    return build_llava(settings, processor)


def build_llava(settings: Settings, processor):
    """A randomly initialised LlavaForConditionalGeneration of `settings.spec`, on its device."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    spec, tokenizer = settings.spec, processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=max(len(tokenizer), spec.vocab_size),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token),
        image_seq_length=spec.image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=spec.vision_feature_layer,
    )
    config._attn_implementation = settings.attn
    torch.manual_seed(settings.seed)
    dtype = getattr(torch, settings.dtype)
    # Initialise on the target device: a 7B model's random init takes minutes on a CPU.
    with torch.device(settings.device):
        model = Llava._from_config(config, dtype=dtype)
    return model


def load_images(settings: Settings) -> list:
    from PIL import Image

    return [
        Image.open(Path(settings.data_dir) / f"{i}.png").convert("RGB")
        for i in range(settings.pairs)
    ]


def write_images(settings: Settings) -> None:
    """Noise images at the model's resolution (the processor then only normalizes them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(settings.seed)
    size = settings.spec.image_size
    for i in range(settings.pairs):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(Path(settings.data_dir) / f"{i}.png")


def lora_config(settings: Settings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
