"""Tiny GLM-4.1V and Llama-3.2-Vision (Mllama) models, built from their own config classes.

GLM-4.1V: Qwen2-VL's layout (flat patches, `image_grid_thw`, 3-D rotary positions, 2x2 merged
patches per `<|image|>` token, `mm_token_type_ids`), wrapped in `<|begin_of_image|>` and
`<|end_of_image|>`; GLM turns have no end marker: an answer stops where the model writes the next
`<|user|>` (or `<|endoftext|>`), as the real generation config says.

Mllama: no image tokens in the text stream at all; one `<|image|>` per image marks where the text
starts to cross-attend to the tiles' features (`cross_attention_mask`, tokens x images x tiles).
Here an image is one 32 px tile (`max_image_tiles=1`).

Both chat templates are written from the checkpoints' documented formats, not checked against a
stored copy of the files (unlike the first-class families'); the comments say what they render.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import (
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vProcessor,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaProcessor,
)
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

from bpo.models.load import processor_from_parts
from bpo.models.tiny_families.common import (
    HEAD_DIM,
    IMAGE_MEAN,
    IMAGE_STD,
    VISION_HEADS,
    VISION_HIDDEN,
    VISION_INTERMEDIATE,
    VISION_LAYERS,
    FamilyTokens,
    family_tokenizer,
    finish_model,
    text_sizes,
    token_id,
    video_processor,
)

# GLM-4.1V's chat format: "[gMASK]<sop><|system|>\nS<|user|>\n<|begin_of_image|><|image|>
# <|end_of_image|>Q<|assistant|>\nA<|user|>\nQ2<|assistant|>\n"; the generation prompt is
# "<|assistant|>\n".
GLM4V_CHAT_TEMPLATE = (
    "[gMASK]<sop>{%- for msg in messages %}"
    "{%- if msg.content is string %}{%- set content = msg.content %}{%- else %}"
    "{%- set parts = namespace(text='') %}{%- for item in msg.content %}"
    "{%- if item.type == 'video' or 'video' in item %}"
    "{%- set parts.text = parts.text + '<|begin_of_video|><|video|><|end_of_video|>' %}"
    "{%- elif item.type == 'image' or 'image' in item %}"
    "{%- set parts.text = parts.text + '<|begin_of_image|><|image|><|end_of_image|>' %}"
    "{%- elif item.type == 'text' %}{%- set parts.text = parts.text + item.text %}{%- endif %}"
    "{%- endfor %}{%- set content = parts.text %}{%- endif %}"
    "{{- '<|' + msg.role + '|>\\n' + content }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

# Llama-3.2-11B-Vision-Instruct's chat format without tools: "<|begin_of_text|><|start_header_id|>
# user<|end_header_id|>\n\n<|image|>Q<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n
# A<|eot_id|>". A conversation with an image has no system header (a system turn with an image
# is an error, as in the real template); one without an image opens with the dated system header.
MLLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] | trim %}{%- endif %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- set image_ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- if message['content'] is not string %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}"
    "{%- set image_ns.has_images = true %}{%- endif %}{%- endfor %}{%- endif %}{%- endfor %}"
    "{%- if image_ns.has_images and not system_message == '' %}"
    "{{- raise_exception('Prompting with images is incompatible with system messages.') }}"
    "{%- endif %}"
    "{%- if not image_ns.has_images %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}"
    "{{- '<|image|>' }}{%- elif content['type'] == 'text' %}{{- content['text'] | trim }}"
    "{%- endif %}{%- endfor %}{%- endif %}{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

GLM4V_TOKENS = FamilyTokens(
    eos="<|endoftext|>",
    pad="<|endoftext|>",
    extra=[
        "[gMASK]",
        "<sop>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|observation|>",
        "<|begin_of_image|>",
        "<|image|>",
        "<|end_of_image|>",
        "<|begin_of_video|>",
        "<|video|>",
        "<|end_of_video|>",
        "<think>",
        "</think>",
    ],
)
MLLAMA_TOKENS = FamilyTokens(
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    pad="<|finetune_right_pad_id|>",
    extra=[
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|image|>",
        "<|python_tag|>",
    ],
    corpus="system\nuser\nassistant\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024",
)
PATCH = 8
MERGE = 2
IMAGE_SIZE = 32


def build_glm4v(
    texts: Iterable[str], seed: int = 0
) -> tuple[Glm4vForConditionalGeneration, Glm4vProcessor]:
    """A tiny Glm4vForConditionalGeneration: 8 px patches, 32x32 to 64x64 px images, so 4 to 16
    image tokens."""
    tokenizer = family_tokenizer(texts, GLM4V_TOKENS)
    vision = {
        "depth": VISION_LAYERS,
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": VISION_INTERMEDIATE,
        "num_heads": VISION_HEADS,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "out_hidden_size": 64,
    }
    rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5}
    config = Glm4vConfig(
        vision_config=vision,
        text_config=text_sizes(tokenizer, head_dim=HEAD_DIM, rope_parameters=rope),
        image_token_id=token_id(tokenizer, "<|image|>"),
        video_token_id=token_id(tokenizer, "<|video|>"),
        image_start_token_id=token_id(tokenizer, "<|begin_of_image|>"),
        image_end_token_id=token_id(tokenizer, "<|end_of_image|>"),
        video_start_token_id=token_id(tokenizer, "<|begin_of_video|>"),
        video_end_token_id=token_id(tokenizer, "<|end_of_video|>"),
    )
    stops = ("<|user|>", "<|endoftext|>", "<|observation|>")
    model = finish_model(Glm4vForConditionalGeneration, config, tokenizer, seed, stops)
    size = {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    image_processor = Glm4vImageProcessorPil(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=2,
        size=size,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    videos = video_processor(
        "Glm4vVideoProcessor", patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, size=size
    )
    processor = processor_from_parts(
        Glm4vProcessor,
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=videos,
        chat_template=GLM4V_CHAT_TEMPLATE,
    )
    return model, processor


def build_mllama(
    texts: Iterable[str], seed: int = 0
) -> tuple[MllamaForConditionalGeneration, MllamaProcessor]:
    """A tiny MllamaForConditionalGeneration: the second text layer cross-attends to the image."""
    tokenizer = family_tokenizer(texts, MLLAMA_TOKENS)
    vision = {
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": VISION_INTERMEDIATE,
        "num_hidden_layers": VISION_LAYERS,
        "num_global_layers": 1,
        "attention_heads": VISION_HEADS,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "max_num_tiles": 1,
        "supported_aspect_ratios": [[1, 1]],
        # The final features concatenate the last layer's with these layers' outputs.
        "intermediate_layers_indices": [0],
        "vision_output_dim": 2 * VISION_HIDDEN,
    }
    text = text_sizes(tokenizer, cross_attention_layers=[1])
    text["num_hidden_layers"] += 1  # the cross-attention layer comes on top of 2 self-attention
    config = MllamaConfig(
        vision_config=vision, text_config=text, image_token_index=token_id(tokenizer, "<|image|>")
    )
    stops = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")
    model = finish_model(MllamaForConditionalGeneration, config, tokenizer, seed, stops)
    image_processor = MllamaImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        max_image_tiles=1,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    processor = MllamaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=MLLAMA_CHAT_TEMPLATE
    )
    return model, processor
