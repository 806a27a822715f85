"""Tiny InternVL and Aya Vision models: tiled images, pixel-shuffled into few tokens.

Both take GOT-OCR2's image processor: an image is cut into tiles of `size` (here one tile: the
whole image resized to 32 px, `max_patches=1`, so no thumbnail is added) and the tiles are
stacked along dim 0, `pixel_values` (tiles, C, H, W). The tower's 4x4 patch grid is pixel-
shuffled 2x2 into 4 image tokens per tile.

InternVL (InternVL3-*-hf): the template writes `<IMG_CONTEXT>`, which the processor expands to
`<img>` + `<IMG_CONTEXT>` * 4 + `</img>`; ChatML turns end with `<|im_end|>`.
Aya Vision: the template writes `<image>`, expanded to `<|START_OF_IMG|>TILE_GLOBAL` +
`<|IMG_PATCH|>` * 4 + `<|END_OF_IMG|>` (so `processor.image_token_id` is `<|IMG_PATCH|>`'s);
Cohere turns end with `<|END_OF_TURN_TOKEN|>`.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import (
    AyaVisionConfig,
    AyaVisionForConditionalGeneration,
    AyaVisionProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from bpo.models.load import processor_from_parts
from bpo.models.tiny_families.common import (
    IMAGE_MEAN,
    IMAGE_STD,
    VISION_HEADS,
    VISION_HIDDEN,
    VISION_INTERMEDIATE,
    VISION_LAYERS,
    FamilyTokens,
    TinySizes,
    family_tokenizer,
    finish_model,
    text_sizes,
    token_id,
    video_processor,
)

# OpenGVLab/InternVL3-*-hf's chat template, verbatim: "<|im_start|>user\n<IMG_CONTEXT>\nQ<|im_end|>
# \n<|im_start|>assistant\nA<|im_end|>\n" (no default system turn); the generation prompt is
# "<|im_start|>assistant\n".
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\\n' }}{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)

# CohereLabs/aya-vision-*'s chat template as we know it (written from its documented format, not
# checked against a stored copy of the file): "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>
# <image>Q<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>A<|END_OF_TURN_TOKEN|>",
# a system turn as <|SYSTEM_TOKEN|>, text stripped; the generation prompt is
# "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>".
AYA_VISION_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% if system_message is not string %}{% set system_message = system_message[0]['text'] %}"
    "{% endif %}{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + system_message.strip() "
    "+ '<|END_OF_TURN_TOKEN|>' }}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['content'] is string %}"
    "{% set content = message['content'] %}{% else %}{% set content = namespace(text='') %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "{% set content.text = content.text + '<image>' %}{% elif item['type'] == 'text' %}"
    "{% set content.text = content.text + item['text'] %}{% endif %}{% endfor %}"
    "{% set content = content.text %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + content.strip() + '<|END_OF_TURN_TOKEN|>' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' + content.strip() + '<|END_OF_TURN_TOKEN|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)

INTERNVL_TOKENS = FamilyTokens(
    eos="<|im_end|>",
    pad="<|endoftext|>",
    named={
        "context_image_token": "<IMG_CONTEXT>",
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "video_token": "<video>",
    },
    extra=["<|im_start|>", "<|im_end|>"],
    corpus="user\nassistant\n",
)
AYA_VISION_TOKENS = FamilyTokens(
    bos="<BOS_TOKEN>",
    eos="<|END_OF_TURN_TOKEN|>",
    pad="<PAD>",
    extra=[
        "<|START_OF_TURN_TOKEN|>",
        "<|END_OF_TURN_TOKEN|>",
        "<|USER_TOKEN|>",
        "<|CHATBOT_TOKEN|>",
        "<|SYSTEM_TOKEN|>",
        "<|START_OF_IMG|>",
        "<|END_OF_IMG|>",
        "<|IMG_PATCH|>",
        "<|IMG_LINE_BREAK|>",
        "<EOS_TOKEN>",
    ],
    corpus="TILE_GLOBAL",
)
IMAGE_SIZE = 32
PATCH = 8
# Pixel shuffle by 2: the 4x4 patch grid of a tile becomes 2x2 image tokens.
TOKENS_PER_TILE = 4


def tile_processor(size: int = IMAGE_SIZE) -> GotOcr2ImageProcessorPil:
    """GOT-OCR2's image processor making exactly one tile (32 px) per image."""
    return GotOcr2ImageProcessorPil(
        size={"height": size, "width": size},
        crop_to_patches=False,
        min_patches=1,
        max_patches=1,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )


def build_internvl(
    texts: Iterable[str], seed: int = 0, sizes: TinySizes | None = None
) -> tuple[InternVLForConditionalGeneration, InternVLProcessor]:
    """A tiny InternVLForConditionalGeneration (InternViT + Qwen2), InternVL3-hf's format.
    With `sizes`: one tile of image_size, (n / 2)**2 image tokens for n = image_size /
    patch_size."""
    s = sizes or TinySizes()
    size, patch = s.image_size or IMAGE_SIZE, s.patch_size or PATCH
    tokens_per_tile = (size // patch // 2) ** 2
    tokenizer = family_tokenizer(texts, INTERNVL_TOKENS, model_max_length=s.max_positions)
    vision = {
        "hidden_size": s.vision_hidden,
        "intermediate_size": s.vision_intermediate,
        "num_hidden_layers": s.vision_layers,
        "num_attention_heads": s.vision_heads,
        "image_size": [size, size],
        "patch_size": [patch, patch],
        **s.vision_extra,
    }
    config = InternVLConfig(
        vision_config=vision,
        text_config=text_sizes(tokenizer, sizes, model_type="qwen2"),
        image_token_id=token_id(tokenizer, "<IMG_CONTEXT>"),
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
    )
    stops = ("<|im_end|>", "<|endoftext|>")
    model = finish_model(InternVLForConditionalGeneration, config, tokenizer, seed, stops)
    videos = video_processor("InternVLVideoProcessor", size={"height": size, "width": size})
    processor = processor_from_parts(
        InternVLProcessor,
        image_processor=tile_processor(size),
        tokenizer=tokenizer,
        video_processor=videos,
        image_seq_length=tokens_per_tile,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return model, processor


def build_aya_vision(
    texts: Iterable[str], seed: int = 0
) -> tuple[AyaVisionForConditionalGeneration, AyaVisionProcessor]:
    """A tiny AyaVisionForConditionalGeneration (SigLIP + Cohere2, sliding and full layers)."""
    tokenizer = family_tokenizer(texts, AYA_VISION_TOKENS)
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": VISION_INTERMEDIATE,
        "num_hidden_layers": VISION_LAYERS,
        "num_attention_heads": VISION_HEADS,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "vision_use_head": False,
    }
    text = text_sizes(
        tokenizer,
        model_type="cohere2",
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    config = AyaVisionConfig(
        vision_config=vision,
        text_config=text,
        downsample_factor=2,
        image_token_index=token_id(tokenizer, "<|IMG_PATCH|>"),
    )
    stops = ("<|END_OF_TURN_TOKEN|>",)
    model = finish_model(AyaVisionForConditionalGeneration, config, tokenizer, seed, stops)
    processor = AyaVisionProcessor(
        image_processor=tile_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH,
        img_size=IMAGE_SIZE,
        downsample_factor=2,
        chat_template=AYA_VISION_CHAT_TEMPLATE,
    )
    return model, processor
