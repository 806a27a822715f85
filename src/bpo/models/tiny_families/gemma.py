"""Tiny Gemma 3 and PaliGemma models, built from their own config classes.

Gemma 3: a SigLIP tower whose 4x4 patches are average-pooled to 2x2 = 4 `<image_soft_token>`s,
written by the processor as "\\n\\n<start_of_image>" + soft tokens + "<end_of_image>\\n\\n" where
the prompt holds `<start_of_image>`; so `processor.image_token` is `<start_of_image>` (one per
image, what the chat template writes) while the model's `image_token_id` is the soft token's. The
processor returns `token_type_ids` (1 on soft tokens: the image attends to itself both ways),
and the text model alternates sliding-window and full attention. Turns end with `<end_of_turn>`.

PaliGemma: a SigLIP tower and a Gemma text model with a prefix-LM mask; the processor puts the
`<image>` tokens first, then `<bos>`, the prompt and "\\n", and returns `token_type_ids` (0 on the
prefix, 1 on a training suffix). It has no chat template (the real checkpoints have none).
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

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
)

# google/gemma-3-4b-it's chat template, verbatim: "<bos><start_of_turn>user\nSYSTEM\n\n
# <start_of_image>Q<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"; a system turn is
# folded into the first user turn, text is trimmed, roles must alternate user/model, and the
# generation prompt is "<start_of_turn>model\n".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate '
    'user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

GEMMA3_TOKENS = FamilyTokens(
    bos="<bos>",
    eos="<eos>",
    pad="<pad>",
    named={
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    },
    extra=["<start_of_turn>", "<end_of_turn>"],
    corpus="user\nmodel\n",
)
PALIGEMMA_TOKENS = FamilyTokens(
    bos="<bos>", eos="<eos>", pad="<pad>", named={"image_token": "<image>"}
)
# A SigLIP tower on 32 px images cut into 8 px patches: 4x4 = 16 patch features.
IMAGE_SIZE = 32
PATCH = 8
# Gemma 3 pools the 4x4 patches to 2x2 image tokens.
GEMMA3_IMAGE_TOKENS = 4


def siglip_vision(sizes: TinySizes | None = None, **extra: object) -> dict[str, object]:
    """The tiny SigLIP vision tower both families use (`sizes`'s vision_extra last)."""
    s = sizes or TinySizes()
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": s.vision_hidden,
        "intermediate_size": s.vision_intermediate,
        "num_hidden_layers": s.vision_layers,
        "num_attention_heads": s.vision_heads,
        "image_size": s.image_size or IMAGE_SIZE,
        "patch_size": s.patch_size or PATCH,
        "vision_use_head": False,
        **extra,
        **s.vision_extra,
    }


def build_gemma3(
    texts: Iterable[str], seed: int = 0, sizes: TinySizes | None = None
) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """A tiny Gemma3ForConditionalGeneration: 4 soft tokens per image, no pan-and-scan crops.
    With `sizes`: the n x n patches are pooled 2x2 too, (n / 2)**2 soft tokens for
    n = image_size / patch_size."""
    s = sizes or TinySizes()
    size = s.image_size or IMAGE_SIZE
    soft_tokens = (size // (s.patch_size or PATCH) // 2) ** 2 if sizes else GEMMA3_IMAGE_TOKENS
    tokenizer = family_tokenizer(texts, GEMMA3_TOKENS, model_max_length=s.max_positions)
    text = text_sizes(
        tokenizer,
        sizes,
        model_type="gemma3_text",
        head_dim=s.head_dim,
        query_pre_attn_scalar=s.head_dim,
        # Longer than an image's soft tokens, shorter than the prompts: the window matters.
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    config = Gemma3Config(
        vision_config=siglip_vision(sizes),
        text_config=text,
        mm_tokens_per_image=soft_tokens,
        boi_token_index=token_id(tokenizer, "<start_of_image>"),
        eoi_token_index=token_id(tokenizer, "<end_of_image>"),
        image_token_index=token_id(tokenizer, "<image_soft_token>"),
    )
    # google/gemma-3-*-it's generation config stops at <eos> and <end_of_turn>.
    stops = ("<end_of_turn>", "<eos>")
    model = finish_model(Gemma3ForConditionalGeneration, config, tokenizer, seed, stops)
    image_processor = Gemma3ImageProcessorPil(
        size={"height": size, "width": size},
        do_pan_and_scan=False,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=soft_tokens,
    )
    return model, processor


def build_paligemma(
    texts: Iterable[str], seed: int = 0
) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """A tiny PaliGemmaForConditionalGeneration: 16 `<image>` tokens per image."""
    tokenizer = family_tokenizer(texts, PALIGEMMA_TOKENS)
    image_processor = SiglipImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=IMAGE_MEAN, image_std=IMAGE_STD
    )
    # What PaliGemma's preprocessor_config.json carries and its processor requires.
    image_processor.image_seq_length = (IMAGE_SIZE // PATCH) ** 2
    # Built before the model: the processor adds PaliGemma's 1,152 <locNNNN>/<segNNN> tokens to
    # the tokenizer, and the model's vocabulary must hold them.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = text_sizes(tokenizer, model_type="gemma", head_dim=HEAD_DIM)
    config = PaliGemmaConfig(
        vision_config=siglip_vision(projection_dim=text["hidden_size"]),
        text_config=text,
        image_token_index=token_id(tokenizer, "<image>"),
        projection_dim=text["hidden_size"],
        hidden_size=text["hidden_size"],
        vocab_size=len(tokenizer),
    )
    model = finish_model(PaliGemmaForConditionalGeneration, config, tokenizer, seed, ("<eos>",))
    return model, processor
