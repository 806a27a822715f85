"""What every tiny model family shares: sizes, a tokenizer with the family's specials, seeding.

Each family module builds a real transformers model from the family's own config classes and the
family's own processor, at these sizes, so that a CPU forward takes milliseconds. A family's
tokenizer is the byte-level BPE of `bpo.models.tiny` trained on the caller's texts, with the
family's special tokens added as atomic tokens and its named ones (`image_token`, ...) set the way
the real checkpoint's tokenizer sets them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import transformers
from tokenizers import AddedToken
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin
from transformers.utils import is_torchvision_available

from bpo.models.load import VideoProcessorUnavailable
from bpo.models.tiny import init_tiny_model, train_bpe_tokenizer

# The text model of every family: 2 layers, hidden 64, head_dim 16 (4 query, 2 key/value heads).
TEXT_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    # Room for ~300-token prompts plus generation (the longest default system prompts).
    "max_position_embeddings": 512,
}
HEAD_DIM = 16
# The vision tower of every family: 2 layers, hidden 32.
VISION_HIDDEN = 32
VISION_LAYERS = 2
VISION_HEADS = 4
VISION_INTERMEDIATE = 64


@dataclass(frozen=True)
class TinySizes:
    """Other sizes for a first-class family's tiny model (benchmarks); `TinySizes()` is the shared
    default above, and a builder given no sizes builds exactly what it always did.

    text_kv_heads: ignored by the Llama-based builds (LLaVA, Idefics3, SmolVLM), whose key/value
        heads equal their query heads; head_dim is text_hidden // text_heads.
    image_size, patch_size: the square the processor makes of an image and the tower's patch
        (None: the family's own tiny values); what an image then costs in tokens follows the
        family's design (merging, pooling, pixel shuffle, anyres crops; see each builder). For
        Qwen, image_size is the largest square (max_pixels = image_size**2).
    vision_extra, text_extra: family-specific config entries set last (e.g. Qwen2.5-VL's
        `window_size`, Gemma 3's `sliding_window`), for the builds whose configs are dicts.
    """

    text_hidden: int = TEXT_SIZES["hidden_size"]
    text_intermediate: int = TEXT_SIZES["intermediate_size"]
    text_layers: int = TEXT_SIZES["num_hidden_layers"]
    text_heads: int = TEXT_SIZES["num_attention_heads"]
    text_kv_heads: int = TEXT_SIZES["num_key_value_heads"]
    max_positions: int = TEXT_SIZES["max_position_embeddings"]
    vision_hidden: int = VISION_HIDDEN
    vision_intermediate: int = VISION_INTERMEDIATE
    vision_layers: int = VISION_LAYERS
    vision_heads: int = VISION_HEADS
    image_size: int | None = None
    patch_size: int | None = None
    vision_extra: Mapping[str, Any] = field(default_factory=dict)
    text_extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.text_hidden // self.text_heads

    def text(self) -> dict[str, Any]:
        """The TEXT_SIZES entries at these sizes."""
        return {
            "hidden_size": self.text_hidden,
            "intermediate_size": self.text_intermediate,
            "num_hidden_layers": self.text_layers,
            "num_attention_heads": self.text_heads,
            "num_key_value_heads": self.text_kv_heads,
            "max_position_embeddings": self.max_positions,
        }


# Normalisation of the tiny image processors: the images are synthetic, any fixed values do.
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.25, 0.25, 0.25]


@dataclass
class FamilyTokens:
    """A family's special tokens, by role.

    named: tokens the tokenizer exposes as attributes (`image_token`, `boi_token`, ...), which the
        family's processor reads; all of them are also atomic special tokens.
    extra: other atomic special tokens (turn markers, image wrappers) in the family's vocabulary.
    corpus: text added to the training texts so the template's plain words get merged tokens.
    """

    eos: str
    pad: str
    bos: str | None = None
    named: dict[str, str] = field(default_factory=dict)
    extra: Sequence[str] = ()
    corpus: str = ""

    def specials(self) -> list[str]:
        """Every special token, in a fixed order and without repeats."""
        ordered = [self.bos, self.eos, self.pad, *self.named.values(), *self.extra]
        return list(dict.fromkeys(t for t in ordered if t))


def family_tokenizer(
    texts: Iterable[str],
    tokens: FamilyTokens,
    vocab_size: int = 512,
    model_max_length: int = TEXT_SIZES["max_position_embeddings"],
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` that carries the family's special tokens.

    The trained vocabulary keeps `bpo.models.tiny`'s own specials (`<unk>`, `<s>`, `</s>`,
    `<pad>`, `<image>`) at ids 0-4; a family that uses none of them simply never emits them.
    """
    base = train_bpe_tokenizer([*texts, tokens.corpus], vocab_size=vocab_size)
    backend = base.backend_tokenizer
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in tokens.specials()]
    )
    named_values = set(tokens.named.values())
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token=tokens.bos,
        eos_token=tokens.eos,
        pad_token=tokens.pad,
        extra_special_tokens=[
            t for t in tokens.specials() if t in tokens.extra or t in named_values
        ],
        # Generation pads on the left so every row's next token sits at the last position.
        padding_side="left",
        model_max_length=model_max_length,
        **tokens.named,
    )


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """The id of a token that must be in the vocabulary as one token."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise KeyError(f"{token!r} is not one token of this tokenizer")
    return ids[0]


def text_sizes(
    tokenizer: PreTrainedTokenizerFast, sizes: TinySizes | None = None, **overrides: Any
) -> dict[str, Any]:
    """The text config arguments every family shares: sizes (TEXT_SIZES, or `sizes`'s with its
    `text_extra` last), vocabulary and special ids."""
    extra = dict(sizes.text_extra) if sizes else {}
    return {
        **(sizes.text() if sizes else TEXT_SIZES),
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
        **extra,
    }


def finish_model(
    model_class: type[PreTrainedModel],
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    stop_tokens: Sequence[str],
) -> PreTrainedModel:
    """A seeded random `model_class` in fp32 eval mode whose generation stops at `stop_tokens`.

    stop_tokens: the family's end-of-turn token first, then any other token its real
        generation_config stops at.
    """
    model = init_tiny_model(model_class, config, tokenizer, seed)
    stops = [token_id(tokenizer, t) for t in stop_tokens]
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    return model


def video_processor(class_name: str, **settings: Any) -> Any:
    """The family's video processor, or a stand-in keeping its settings without torchvision.

    Images never need it; it is built so that the processor is the family's own, whole, and
    saves a folder that a user with torchvision loads with its real video processor.
    """
    if is_torchvision_available():
        return getattr(transformers, class_name)(**settings)
    return VideoProcessorUnavailable({"video_processor_type": class_name, **settings})


def save_family(model: PreTrainedModel, processor: ProcessorMixin, out_dir: str | Path) -> Path:
    """Save model (safetensors) and processor so `load_model_and_processor(out_dir)` loads them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
