"""Tiny LLaVA-architecture models built from a config, for tests and ShapeWorld.

A tiny model is a real `LlavaForConditionalGeneration` (CLIP vision tower + Llama language model)
with a BPE tokenizer trained on local text and a `LlavaProcessor` wired consistently with the
model. It is saved with `save_pretrained` (safetensors) so that every later stage loads it through
the same `from_pretrained` path a user's `llava-hf/llava-1.5-7b-hf` takes, offline.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from bpo.models.config import TinyLlavaConfig

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT: ..."), written as a chat
# template so tiny models exercise the same processor.apply_chat_template path as real ones.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}{{ ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, extra_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`; `<image>` and the chat specials are atomic.

    extra_tokens: words that must stay single tokens (added after training, not special).
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if extra_tokens:
        tokenizer.add_tokens([AddedToken(t, normalized=False) for t in extra_tokens])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        # Generation pads on the left so every row's next token sits at the last position.
        padding_side="left",
        model_max_length=1024,
    )


def build_processor(config: TinyLlavaConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """A LlavaProcessor whose image-token count equals the features the tiny tower yields."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        # CLIP prepends a CLS position; 'default' drops it again, so the count is patches only.
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_15_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_model(
    config: TinyLlavaConfig, tokenizer: PreTrainedTokenizerFast, seed: int = 0
) -> LlavaForConditionalGeneration:
    """A randomly initialised LlavaForConditionalGeneration of the given sizes."""
    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden_size,
        intermediate_size=config.vision_intermediate_size,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.vision_hidden_size,
    )
    text = tiny_text_config(config, tokenizer)
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=config.num_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=config.vision_feature_layer,
    )
    return init_tiny_model(LlavaForConditionalGeneration, llava, tokenizer, seed)


def tiny_text_config(config: Any, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The Llama text model of a tiny image-text model, sized by the config's `text_*` fields."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_heads,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def init_tiny_model(
    model_class: type[PreTrainedModel],
    model_config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
) -> PreTrainedModel:
    """A seeded random model of `model_class`, in eval mode, generating with the tokenizer's ids."""
    # Eager attention: exact and fastest for sequences this short on CPU.
    model_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(model_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def build_tiny_llava(
    texts: Iterable[str],
    config: TinyLlavaConfig | None = None,
    seed: int = 0,
    extra_tokens: Sequence[str] = (),
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Train a tokenizer on `texts`, then build the processor and a fresh model around it."""
    config = config or TinyLlavaConfig()
    tokenizer = train_bpe_tokenizer(texts, vocab_size=config.vocab_size, extra_tokens=extra_tokens)
    processor = build_processor(config, tokenizer)
    model = build_model(config, tokenizer, seed=seed)
    return model, processor


def save_tiny_llava(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    out_dir: str | Path,
    config: TinyLlavaConfig | None = None,
) -> Path:
    """Save model (safetensors) and processor so `from_pretrained(out_dir)` loads them offline."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    if config is not None:
        import json

        (out / "tiny_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    return out


def build_tiny_causal_lm(
    texts: Iterable[str],
    chat_template: str,
    extra_tokens: Sequence[str] = (),
    seed: int = 0,
    max_position_embeddings: int = 2048,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A tiny text-only Llama with a tokenizer trained on `texts` and the given chat template.

    For tests of text stages (rewriters, judges served locally): random weights, eval mode.
    """
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens))
    tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), tokenizer


@torch.no_grad()
def force_greedy_token(model: LlamaForCausalLM, token_id: int) -> None:
    """Set a tiny Llama's weights so that greedy decoding emits `token_id` at every step.

    The residual stream becomes one constant direction (embeddings constant, attention and MLP
    outputs zero) and the head maps that direction to a logit of 50 for `token_id`, 0 elsewhere.
    """
    model.model.embed_tokens.weight.zero_()
    model.model.embed_tokens.weight[:, 0] = 1.0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    model.model.norm.weight.zero_()
    model.model.norm.weight[0] = 1.0
    model.lm_head.weight.zero_()
    model.lm_head.weight[token_id, 0] = 50.0
