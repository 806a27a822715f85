"""Tiny LLaVA, LLaVA-NeXT, LLaVA-OneVision and Mistral 3 models: a vision tower, a projector
and a decoder, with the image's features standing in for its `<image>` (or `[IMG]`) tokens.

LLaVA is `bpo.models.tiny`'s model. LLaVA-NeXT and LLaVA-OneVision ("anyres") always add the
whole image, resized, to the crops of its best-fitting grid: with the one 32x32 grid point here
an image gives one crop plus the whole image, `pixel_values` (B, 2, C, 32, 32) and
`image_sizes`; their image tokens are the whole image's patches plus the crop's, unpadded to the
image's aspect, plus one newline feature per row. Mistral 3 (Mistral-Small-3.1's architecture)
resizes an image to patch multiples within `longest_edge` and writes a grid of `[IMG]` tokens
with `[IMG_BREAK]` after each row and `[IMG_END]` last; 2x2 patches merge into one token.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    ProcessorMixin,
)
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from bpo.models.load import processor_from_parts, torchvision_free_processor_class
from bpo.models.tiny import TinyLlavaConfig, build_tiny_llava
from bpo.models.tiny_families.common import (
    IMAGE_MEAN,
    IMAGE_STD,
    TEXT_SIZES,
    FamilyTokens,
    TinySizes,
    family_tokenizer,
    finish_model,
    text_sizes,
    token_id,
    video_processor,
)

# llava-hf/llava-1.5-7b-hf's chat template, verbatim: "USER: <image>\nQ ASSISTANT: A USER: Q2
# ASSISTANT:"; a system turn is its bare text, and an answer gets no end marker (bpo appends the
# eos token when scoring one, as LLaVA trained with).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-v1.6-mistral-7b-hf's chat template, verbatim: "[INST] <image>\nQ [/INST] A<\s> ".
# It closes an answer with the literal characters "<\s>" (a typo of "</s>" in the real file),
# writes no generation prompt (a prompt simply ends with " [/INST]"), and a system turn becomes
# "<<SYS>>\nS\n<</SYS>>\n\n".
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

# llava-hf/llava-onevision-qwen2-*-ov-hf's chat template, verbatim: "<|im_start|>user <image>\nQ
# <|im_end|><|im_start|>assistant\nA<|im_end|>" (no newline between turns, none before the
# images); the generation prompt is "<|im_start|>assistant\n".
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Mistral-Small-3.1-24B-Instruct-2503's chat template, shortened in one place: "<s>[SYSTEM_PROMPT]
# S[/SYSTEM_PROMPT][INST][IMG]Q[/INST]A</s>", no generation prompt. Where the conversation has no
# system turn the real template writes a ~700-character default system prompt with today's date;
# here that default is its first sentence, undated, so prompts stay short and reproducible.
MISTRAL3_CHAT_TEMPLATE = (
    "{%- set default_system_message = 'You are Mistral Small 3, a Large Language Model (LLM) "
    "created by Mistral AI, a French startup headquartered in Paris.' %}"
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = default_system_message %}"
    "{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message "
    "content!') }}{%- endif %}{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'system' %}"
    "{{- '[SYSTEM_PROMPT]' + (message['content'] if message['content'] is string else "
    "message['content'][0]['text']) + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- (message['content'] if message['content'] is string else "
    "message['content'][0]['text']) + eos_token }}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}"
    "{%- endif %}{%- endfor %}"
)

LLAVA_NEXT_TOKENS = FamilyTokens(
    bos="<s>",
    eos="</s>",
    pad="<pad>",
    named={"image_token": "<image>"},
    extra=["[INST]", "[/INST]"],
)
LLAVA_ONEVISION_TOKENS = FamilyTokens(
    eos="<|im_end|>",
    pad="<|endoftext|>",
    named={"image_token": "<image>", "video_token": "<video>"},
    extra=["<|im_start|>", "<|im_end|>"],
    corpus="user\nassistant\n",
)
MISTRAL3_TOKENS = FamilyTokens(
    bos="<s>",
    eos="</s>",
    pad="<pad>",
    extra=[
        "[INST]",
        "[/INST]",
        "[SYSTEM_PROMPT]",
        "[/SYSTEM_PROMPT]",
        "[IMG]",
        "[IMG_BREAK]",
        "[IMG_END]",
    ],
    corpus="You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI.",
)
# Crops and towers: 32 px images in 16 px patches (2x2 patches per crop).
IMAGE_SIZE = 32
PATCH = 16
# The anyres grids: one 32x32 crop, so an image is that crop plus the whole image.
GRID = [[IMAGE_SIZE, IMAGE_SIZE]]


def tower(
    model_type: str,
    patch_size: int = PATCH,
    sizes: TinySizes | None = None,
    image_size: int = IMAGE_SIZE,
    **extra: object,
) -> dict[str, object]:
    """A tiny vision tower config of the given transformers type (`sizes`'s vision_extra last)."""
    s = sizes or TinySizes()
    return {
        "model_type": model_type,
        "hidden_size": s.vision_hidden,
        "intermediate_size": s.vision_intermediate,
        "num_hidden_layers": s.vision_layers,
        "num_attention_heads": s.vision_heads,
        "image_size": image_size,
        "patch_size": patch_size,
        **extra,
        **s.vision_extra,
    }


def _geometry(sizes: TinySizes | None, patch: int = PATCH) -> tuple[int, int]:
    """(image size, patch size): `sizes`'s where given, else the tiny defaults."""
    s = sizes or TinySizes()
    return s.image_size or IMAGE_SIZE, s.patch_size or patch


def build_llava(
    texts: Iterable[str], seed: int = 0, sizes: TinySizes | None = None
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """`bpo.models.tiny`'s LLaVA-1.5 (CLIP + Llama, 16 image tokens; with `sizes`,
    (image_size / patch_size)**2) with llava-hf's chat template and room for the families'
    longest prompts."""
    config = TinyLlavaConfig(max_position_embeddings=TEXT_SIZES["max_position_embeddings"])
    if sizes is not None:
        config = TinyLlavaConfig(
            image_size=sizes.image_size or config.image_size,
            patch_size=sizes.patch_size or config.patch_size,
            vision_hidden_size=sizes.vision_hidden,
            vision_layers=sizes.vision_layers,
            vision_heads=sizes.vision_heads,
            vision_intermediate_size=sizes.vision_intermediate,
            text_hidden_size=sizes.text_hidden,
            text_layers=sizes.text_layers,
            text_heads=sizes.text_heads,
            text_intermediate_size=sizes.text_intermediate,
            max_position_embeddings=sizes.max_positions,
        )
    model, processor = build_tiny_llava(texts, config, seed=seed)
    processor.chat_template = LLAVA_CHAT_TEMPLATE
    return model, processor


def build_llava_next(
    texts: Iterable[str], seed: int = 0, sizes: TinySizes | None = None
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A tiny LlavaNextForConditionalGeneration (CLIP + Mistral), llava-v1.6-mistral's format.
    With `sizes`: crops of image_size, 2 n**2 + n image tokens for n = image_size / patch_size."""
    s = sizes or TinySizes()
    size, patch = _geometry(sizes)
    grid = [[size, size]]
    tokenizer = family_tokenizer(texts, LLAVA_NEXT_TOKENS, model_max_length=s.max_positions)
    config = LlavaNextConfig(
        vision_config=tower(
            "clip_vision_model", patch, sizes, size, projection_dim=s.vision_hidden
        ),
        text_config=text_sizes(tokenizer, sizes, model_type="mistral", head_dim=s.head_dim),
        image_token_index=token_id(tokenizer, "<image>"),
        image_grid_pinpoints=grid,
        image_seq_length=(size // patch) ** 2,
        vision_feature_select_strategy="default",
        # The last layer: a 2-layer tower has little to gain from LLaVA's second-to-last.
        vision_feature_layer=-1,
    )
    model = finish_model(LlavaNextForConditionalGeneration, config, tokenizer, seed, ("</s>",))
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=grid,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        # CLIP prepends a CLS position, which 'default' drops again.
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
    )
    return model, processor


def build_llava_onevision(
    texts: Iterable[str], seed: int = 0, sizes: TinySizes | None = None
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """A tiny LlavaOnevisionForConditionalGeneration (SigLIP + Qwen2), its ChatML format.
    With `sizes`: crops of image_size, 2 n**2 + n image tokens for n = image_size / patch_size."""
    s = sizes or TinySizes()
    size, patch = _geometry(sizes)
    grid = [[size, size]]
    tokenizer = family_tokenizer(texts, LLAVA_ONEVISION_TOKENS, model_max_length=s.max_positions)
    config = LlavaOnevisionConfig(
        vision_config=tower("siglip_vision_model", patch, sizes, size, vision_use_head=False),
        text_config=text_sizes(tokenizer, sizes, model_type="qwen2"),
        image_token_index=token_id(tokenizer, "<image>"),
        video_token_index=token_id(tokenizer, "<video>"),
        image_grid_pinpoints=grid,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    stops = ("<|im_end|>", "<|endoftext|>")
    model = finish_model(LlavaOnevisionForConditionalGeneration, config, tokenizer, seed, stops)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size},
        image_grid_pinpoints=grid,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    videos = video_processor("LlavaOnevisionVideoProcessor", size={"height": size, "width": size})
    processor = processor_from_parts(
        LlavaOnevisionProcessor,
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=videos,
        num_image_tokens=(size // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
    )
    return model, processor


def build_mistral3(
    texts: Iterable[str], seed: int = 0, sizes: TinySizes | None = None
) -> tuple[Mistral3ForConditionalGeneration, ProcessorMixin]:
    """A tiny Mistral3ForConditionalGeneration (Pixtral tower, 2x2 patch merger, Mistral) with
    Mistral-Small-3.1's PixtralProcessor: 8 px patches, images within 32 px, up to 4 `[IMG]`
    tokens (with `sizes`: within image_size, n**2 `[IMG]` and n break/end tokens for
    n = image_size / patch_size / 2). (transformers gates PixtralProcessor behind torchvision,
    which it does not use.)"""
    s = sizes or TinySizes()
    size, patch = _geometry(sizes, patch=8)
    tokenizer = family_tokenizer(texts, MISTRAL3_TOKENS, model_max_length=s.max_positions)
    head = s.vision_hidden // s.vision_heads
    config = Mistral3Config(
        vision_config=tower("pixtral", patch, sizes, size, head_dim=head),
        text_config=text_sizes(tokenizer, sizes, model_type="mistral", head_dim=s.head_dim),
        image_token_index=token_id(tokenizer, "[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    model = finish_model(Mistral3ForConditionalGeneration, config, tokenizer, seed, ("</s>",))
    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": size},
        patch_size={"height": patch, "width": patch},
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    processor = torchvision_free_processor_class("PixtralProcessor")(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        spatial_merge_size=2,
        chat_template=MISTRAL3_CHAT_TEMPLATE,
    )
    return model, processor
