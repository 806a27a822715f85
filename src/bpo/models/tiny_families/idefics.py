"""Tiny Idefics3 (SmolVLM) and SmolVLM2 models, built from a config for tests.

Idefics3 is the architecture of SmolVLM
(`HuggingFaceTB/SmolVLM-*-Instruct` load as `Idefics3ForConditionalGeneration`): a SigLIP-style
vision tower, a pixel-shuffle connector (`scale_factor**2` patches become one image token) and a
Llama text model with ordinary 1-D rotary positions. Its processor differs from LLaVA's where
stages can trip: the image tokens are wrapped in `<fake_token_around_image><global-img>...`, the
pixel tensor is 5-D `(B, images, C, H, W)` with a `pixel_attention_mask`, and turns end with
`<end_of_utterance>`. A tiny one here is saved with `save_pretrained` and loads back through
`bpo.models.load.load_model_and_processor` (the Auto classes), offline.

Image splitting is off: every image is resized to one `image_size` square, so each row holds
exactly one image and `config.num_image_tokens` image tokens.

SmolVLM2 (`HuggingFaceTB/SmolVLM2-*-Instruct`, model type `smolvlm`) is the same design under its
own classes (`SmolVLMForConditionalGeneration`, `SmolVLMProcessor` with a video processor); its
processor needs the `num2words` package (transformers raises without it, for video prompts).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from bpo.models.load import processor_from_parts
from bpo.models.tiny import (
    init_tiny_model,
    save_tiny_llava,
    tiny_text_config,
    train_bpe_tokenizer,
)
from bpo.models.tiny_families.common import TinySizes, video_processor

IDEFICS3_BOS = "<|im_start|>"
IDEFICS3_EOS = "<end_of_utterance>"
IDEFICS3_SPECIAL_TOKENS = ["<fake_token_around_image>", "<global-img>", IDEFICS3_EOS, IDEFICS3_BOS]

# SmolVLM-Instruct's chat template, verbatim: "<|im_start|>User:<image>Q<end_of_utterance>\n
# Assistant: A<end_of_utterance>\n". The role word is followed by ':' alone when the turn starts
# with the image, by ': ' otherwise; the generation prompt is "Assistant:" with no space.
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# SmolVLM2-Instruct's chat template, verbatim (transformers' smolvlm DEFAULT_CHAT_TEMPLATE):
# SmolVLM's above with a `<video>` part besides `<image>`.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}"
    "{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# The template's role words as it writes them (at a line's start), added to the tokenizer's corpus
# so that each becomes one token.
ROLE_TEXT = "User:\nAssistant:\nSystem:"


@dataclass
class TinyIdefics3Config:
    """Sizes of a tiny Idefics3 model. Defaults give ~0.2M parameters and 4 image tokens."""

    image_size: int = 32
    patch_size: int = 8
    # Pixel shuffle: scale_factor**2 neighbouring patches become one image token.
    scale_factor: int = 2
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate_size: int = 64
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 192
    vocab_size: int = 512
    max_position_embeddings: int = 256
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    @property
    def num_image_tokens(self) -> int:
        """`<image>` tokens per image (the model's `image_seq_len`)."""
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2


def build_idefics3_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, extra_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with SmolVLM's specials: `<|im_start|>` is the BOS (written by
    the chat template, never added by the tokenizer) and `<end_of_utterance>` the EOS."""
    tokenizer = train_bpe_tokenizer([*texts, ROLE_TEXT], vocab_size, extra_tokens=extra_tokens)
    tokenizer.add_special_tokens(
        {
            "bos_token": IDEFICS3_BOS,
            "eos_token": IDEFICS3_EOS,
            "additional_special_tokens": IDEFICS3_SPECIAL_TOKENS,
        }
    )
    return tokenizer


def build_idefics3_processor(
    config: TinyIdefics3Config, tokenizer: PreTrainedTokenizerFast
) -> Idefics3Processor:
    """An Idefics3Processor that resizes every image to one square and never splits it."""
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": config.image_size},
        max_image_size={"longest_edge": config.image_size},
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=config.num_image_tokens,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )


def build_idefics3_model(
    config: TinyIdefics3Config, tokenizer: PreTrainedTokenizerFast, seed: int = 0
) -> Idefics3ForConditionalGeneration:
    """A randomly initialised Idefics3ForConditionalGeneration of the given sizes."""
    vision = Idefics3VisionConfig(
        hidden_size=config.vision_hidden_size,
        intermediate_size=config.vision_intermediate_size,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
    )
    text = tiny_text_config(config, tokenizer)
    idefics3 = Idefics3Config(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=config.scale_factor,
        pad_token_id=tokenizer.pad_token_id,
    )
    return init_tiny_model(Idefics3ForConditionalGeneration, idefics3, tokenizer, seed)


def build_tiny_idefics3(
    texts: Iterable[str],
    config: TinyIdefics3Config | None = None,
    seed: int = 0,
    extra_tokens: Sequence[str] = (),
) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """Train a tokenizer on `texts`, then build the processor and a fresh model around it."""
    config = config or TinyIdefics3Config()
    tokenizer = build_idefics3_tokenizer(texts, config.vocab_size, extra_tokens=extra_tokens)
    processor = build_idefics3_processor(config, tokenizer)
    model = build_idefics3_model(config, tokenizer, seed=seed)
    return model, processor


def save_tiny_idefics3(
    model: Idefics3ForConditionalGeneration,
    processor: Idefics3Processor,
    out_dir: str | Path,
    config: TinyIdefics3Config | None = None,
) -> Path:
    """Save model (safetensors) and processor so `from_pretrained(out_dir)` loads them offline."""
    return save_tiny_llava(model, processor, out_dir, config)  # nothing in it is LLaVA-specific


def _config(sizes: TinySizes | None) -> TinyIdefics3Config:
    """The default tiny Idefics3 config with room for the families' longest prompts, or one at
    `sizes` (key/value heads = query heads, as in every tiny Idefics3)."""
    default = TinyIdefics3Config(max_position_embeddings=512)
    if sizes is None:
        return default
    return TinyIdefics3Config(
        image_size=sizes.image_size or default.image_size,
        patch_size=sizes.patch_size or default.patch_size,
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


def build_idefics3(
    texts: Iterable[str], seed: int = 0, sizes: TinySizes | None = None
) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """The default tiny Idefics3 with room for the families' longest prompts (with `sizes`:
    (image_size / patch_size / 2)**2 image tokens)."""
    return build_tiny_idefics3(texts, _config(sizes), seed=seed)


def build_smolvlm(
    texts: Iterable[str], seed: int = 0, sizes: TinySizes | None = None
) -> tuple[SmolVLMForConditionalGeneration, SmolVLMProcessor]:
    """A tiny SmolVLMForConditionalGeneration at the default Idefics3 sizes: 4 image tokens."""
    config = _config(sizes)
    tokenizer = build_idefics3_tokenizer(texts, config.vocab_size)
    image_processor = SmolVLMImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": config.image_size},
        max_image_size={"longest_edge": config.image_size},
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )
    videos = video_processor(
        "SmolVLMVideoProcessor",
        size={"longest_edge": config.image_size},
        max_image_size={"longest_edge": config.image_size},
    )
    processor = processor_from_parts(
        SmolVLMProcessor,
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=videos,
        image_seq_len=config.num_image_tokens,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    vision = {
        "hidden_size": config.vision_hidden_size,
        "intermediate_size": config.vision_intermediate_size,
        "num_hidden_layers": config.vision_layers,
        "num_attention_heads": config.vision_heads,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
    }
    smolvlm = SmolVLMConfig(
        vision_config=vision,
        text_config=tiny_text_config(config, tokenizer).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=config.scale_factor,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = init_tiny_model(SmolVLMForConditionalGeneration, smolvlm, tokenizer, seed)
    return model, processor
