"""Tiny Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 models, built from their own config classes.

What sets these apart from LLaVA for a stage: the image is cut into `patch_size` squares of
`temporal_patch_size` frames and handed over flat, `pixel_values` of shape
(patches, C * T * P * P) with `image_grid_thw` (T, H, W in patches) per image; `merge_size**2`
neighbouring patches become one `<|image_pad|>` token, wrapped in `<|vision_start|>` and
`<|vision_end|>`; the text model uses 3-D (multimodal) rotary positions; and the processor also
returns `mm_token_type_ids`. The image processor resizes each image to a multiple of
`patch_size * merge_size` within [min_pixels, max_pixels], so the token count follows the image's
aspect; these tiny ones keep every image between 4 and 16 tokens. Turns end with `<|im_end|>`.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from bpo.models.load import processor_from_parts
from bpo.models.tiny_families.common import (
    HEAD_DIM,
    IMAGE_MEAN,
    IMAGE_STD,
    FamilyTokens,
    TinySizes,
    family_tokenizer,
    finish_model,
    text_sizes,
    token_id,
    video_processor,
)

# Qwen2-VL-Instruct's chat template, verbatim (Qwen2.5-VL-Instruct's is the same): ChatML with a
# default system turn, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>
# user\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n<|im_start|>assistant\nA<|im_end|>
# \n"; the generation prompt is "<|im_start|>assistant\n".
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-Instruct's chat template without its tool branches (tools, tool calls, the "tool"
# role): the same ChatML as Qwen2-VL's but with no default system turn, and a system turn written
# only when it comes first.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}{%- else %}"
    "{%- for content in messages[0].content %}{%- if 'text' in content %}{{- content.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}"
    "{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}"
    "{%- for content_item in message.content %}{%- if 'text' in content_item %}"
    "{{- content_item.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3.5's chat template without its tool branches: Qwen3-VL's ChatML, but the answer after the
# last user turn carries its (here empty) reasoning, "<|im_start|>assistant\n<think>\n\n</think>
# \n\nA<|im_end|>\n", and the generation prompt opens it: "<|im_start|>assistant\n<think>\n".
QWEN3_5_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- macro render_content(content, do_vision_count) %}"
    "{%- if content is string %}{{- content }}{%- else %}{%- for item in content %}"
    "{%- if 'image' in item or 'image_url' in item or item.type == 'image' %}"
    "{%- if do_vision_count %}{%- set image_count.value = image_count.value + 1 %}{%- endif %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif 'video' in item or item.type == 'video' %}"
    "{%- if do_vision_count %}{%- set video_count.value = video_count.value + 1 %}{%- endif %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in item %}{{- item.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- endmacro %}"
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + render_content(messages[0].content, false) + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if message.role == 'user' and ns.last_query_index == messages|length - 1 %}"
    "{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = render_content(message.content, True) %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}"
    "{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n')"
    " + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)

QWEN_TOKENS = FamilyTokens(
    eos="<|im_end|>",
    pad="<|endoftext|>",
    extra=[
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<think>",
        "</think>",
    ],
    corpus="system\nuser\nassistant\nYou are a helpful assistant.",
)
# The real generation configs stop at the end of a turn and at <|endoftext|>.
QWEN_STOPS = ("<|im_end|>", "<|endoftext|>")
# Vision patches: 8 px squares of 2 frames; 2x2 patches make one image token. An image is
# resized to a multiple of 16 px with 32x32 to 64x64 pixels: 4 to 16 image tokens.
PATCH = 8
MERGE = 2
MIN_PIXELS = 32 * 32
MAX_PIXELS = 64 * 64


def _pixels(sizes: TinySizes | None) -> dict[str, int]:
    """The image processor's pixel bounds: 32x32 to `sizes.image_size` squared (default 64)."""
    largest = sizes.image_size**2 if sizes and sizes.image_size else MAX_PIXELS
    return {"shortest_edge": min(MIN_PIXELS, largest), "longest_edge": largest}


def qwen_image_processor(
    patch_size: int = PATCH, sizes: TinySizes | None = None
) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's image processor (every Qwen family uses it) with tiny patches and images."""
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=MERGE,
        temporal_patch_size=2,
        size=_pixels(sizes),
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )


def qwen_processor(
    processor_class: type[ProcessorMixin],
    video_class: str,
    tokenizer: PreTrainedTokenizerFast,
    chat_template: str,
    sizes: TinySizes | None = None,
) -> ProcessorMixin:
    """The family's processor with the tiny image processor and its (unused) video processor."""
    patch = _patch(sizes)
    videos = video_processor(
        video_class,
        patch_size=patch,
        merge_size=MERGE,
        temporal_patch_size=2,
        size=_pixels(sizes),
    )
    return processor_from_parts(
        processor_class,
        image_processor=qwen_image_processor(patch, sizes),
        tokenizer=tokenizer,
        video_processor=videos,
        chat_template=chat_template,
    )


def vision_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The image, video and vision start/end ids every Qwen config carries."""
    return {
        "image_token_id": token_id(tokenizer, "<|image_pad|>"),
        "video_token_id": token_id(tokenizer, "<|video_pad|>"),
        "vision_start_token_id": token_id(tokenizer, "<|vision_start|>"),
        "vision_end_token_id": token_id(tokenizer, "<|vision_end|>"),
    }


def _patch(sizes: TinySizes | None) -> int:
    return sizes.patch_size if sizes and sizes.patch_size else PATCH


def _tokenizer(texts: Iterable[str], sizes: TinySizes | None) -> PreTrainedTokenizerFast:
    return family_tokenizer(
        texts, QWEN_TOKENS, model_max_length=(sizes or TinySizes()).max_positions
    )


def _sections(sizes: TinySizes, default: list[int]) -> list[int]:
    """M-RoPE sections at `sizes`'s head_dim: the default's (for head_dim 16) scaled up."""
    scale = sizes.head_dim // HEAD_DIM
    return [n * scale for n in default]


def mrope(sections: list[int], **extra: object) -> dict[str, object]:
    """Multimodal rotary settings: `sections` split the rotated half-dimensions (head_dim / 2,
    or its `partial_rotary_factor` share) among time, height and width."""
    return {"rope_type": "default", "mrope_section": sections, **extra}


def build_qwen2_vl(
    texts: Iterable[str], seed: int = 0, sizes: TinySizes | None = None
) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """A tiny Qwen2VLForConditionalGeneration (ViT with 2-D rotary, merged patches)."""
    s = sizes or TinySizes()
    tokenizer = _tokenizer(texts, sizes)
    config = Qwen2VLConfig(
        vision_config={
            "depth": s.vision_layers,
            "embed_dim": s.vision_hidden,
            "hidden_size": s.text_hidden,  # the merger's output: the text model's hidden size
            "num_heads": s.vision_heads,
            "mlp_ratio": s.vision_intermediate // s.vision_hidden,
            "patch_size": _patch(sizes),
            "spatial_merge_size": MERGE,
            **s.vision_extra,
        },
        text_config=text_sizes(tokenizer, sizes, rope_parameters=mrope(_sections(s, [2, 3, 3]))),
        **vision_token_ids(tokenizer),
    )
    model = finish_model(Qwen2VLForConditionalGeneration, config, tokenizer, seed, QWEN_STOPS)
    processor = qwen_processor(
        Qwen2VLProcessor, "Qwen2VLVideoProcessor", tokenizer, QWEN2_VL_CHAT_TEMPLATE, sizes
    )
    return model, processor


def build_qwen2_5_vl(
    texts: Iterable[str], seed: int = 0, sizes: TinySizes | None = None
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """A tiny Qwen2_5_VLForConditionalGeneration (windowed attention in the ViT but its last
    layer, which attends over the whole image)."""
    s = sizes or TinySizes()
    patch = _patch(sizes)
    tokenizer = _tokenizer(texts, sizes)
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": s.vision_layers,
            "hidden_size": s.vision_hidden,
            "intermediate_size": s.vision_intermediate,
            "num_heads": s.vision_heads,
            "out_hidden_size": s.text_hidden,
            "patch_size": patch,
            "spatial_merge_size": MERGE,
            # One window of 2x2 merged tokens, so windowing really splits a 4x4-token image.
            "window_size": 2 * patch * MERGE,
            "fullatt_block_indexes": [s.vision_layers - 1],
            **s.vision_extra,
        },
        text_config=text_sizes(tokenizer, sizes, rope_parameters=mrope(_sections(s, [2, 3, 3]))),
        **vision_token_ids(tokenizer),
    )
    model = finish_model(Qwen2_5_VLForConditionalGeneration, config, tokenizer, seed, QWEN_STOPS)
    processor = qwen_processor(
        Qwen2_5_VLProcessor, "Qwen2VLVideoProcessor", tokenizer, QWEN2_VL_CHAT_TEMPLATE, sizes
    )
    return model, processor


def qwen3_vision(sizes: TinySizes | None = None, **extra: object) -> dict[str, object]:
    """Qwen3-VL's (and Qwen3.5's) ViT: learned position embeddings for a grid of 4x4 patches
    (interpolated to the image's grid)."""
    s = sizes or TinySizes()
    return {
        "depth": s.vision_layers,
        "hidden_size": s.vision_hidden,
        "intermediate_size": s.vision_intermediate,
        "num_heads": s.vision_heads,
        "out_hidden_size": s.text_hidden,
        "patch_size": _patch(sizes),
        "spatial_merge_size": MERGE,
        "num_position_embeddings": 16,
        **extra,
        **s.vision_extra,
    }


def build_qwen3_vl(
    texts: Iterable[str], seed: int = 0, sizes: TinySizes | None = None
) -> tuple[Qwen3VLForConditionalGeneration, Qwen3VLProcessor]:
    """A tiny Qwen3VLForConditionalGeneration (DeepStack: the first ViT layer's features are
    also added to the first text layer's image positions)."""
    s = sizes or TinySizes()
    tokenizer = _tokenizer(texts, sizes)
    rope = mrope(_sections(s, [4, 2, 2]), mrope_interleaved=True)
    text = text_sizes(tokenizer, sizes, head_dim=s.head_dim, rope_parameters=rope)
    config = Qwen3VLConfig(
        vision_config=qwen3_vision(sizes, deepstack_visual_indexes=[0]),
        text_config=text,
        **vision_token_ids(tokenizer),
    )
    model = finish_model(Qwen3VLForConditionalGeneration, config, tokenizer, seed, QWEN_STOPS)
    processor = qwen_processor(
        Qwen3VLProcessor, "Qwen3VLVideoProcessor", tokenizer, QWEN3_VL_CHAT_TEMPLATE, sizes
    )
    return model, processor


def build_qwen3_5(texts: Iterable[str], seed: int = 0) -> tuple[PreTrainedModel, Qwen3VLProcessor]:
    """A tiny Qwen3_5ForConditionalGeneration: Qwen3-VL's ViT before a hybrid text model, one
    Gated DeltaNet (linear attention) layer then one full-attention layer. Its processor is
    Qwen3-VL's, as for the real checkpoints."""
    tokenizer = family_tokenizer(texts, QWEN_TOKENS)
    text = text_sizes(
        tokenizer,
        head_dim=HEAD_DIM,
        # Rotary on half of each head, as Qwen3.5 rotates a fraction of it (0.25 there).
        rope_parameters=mrope([2, 1, 1], mrope_interleaved=True, partial_rotary_factor=0.5),
        layer_types=["linear_attention", "full_attention"],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=HEAD_DIM,
        linear_value_head_dim=HEAD_DIM,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    )
    config = Qwen3_5Config(
        vision_config=qwen3_vision(), text_config=text, **vision_token_ids(tokenizer)
    )
    model = finish_model(Qwen3_5ForConditionalGeneration, config, tokenizer, seed, QWEN_STOPS)
    processor = qwen_processor(
        Qwen3VLProcessor, "Qwen3VLVideoProcessor", tokenizer, QWEN3_5_CHAT_TEMPLATE
    )
    return model, processor
