"""What differs between model families, in one place; the stages call this and never a model type.

    family_of(model) -> Family                 # by config.model_type; unknown -> the generic path
    check_supported(model)                     # a family no stage can serve stops here, by name
    encode_sample(processor, prompt, image)    # one sample's processor outputs, batch 1
    join_samples(samples, pad_token_id, side)  # samples -> one batch (text padded, vision joined)
    token_aligned_keys(sample)                 # per-token outputs besides ids and mask
    attention_layout(model) -> AttentionLayout # layer types, sliding windows, bidirectional images
    packing_refusal(model)                     # why answers cannot share a packed row, or None
    mrope_positions(model, ...)                # 3-D positions from the model's own rope index
    language_model_name(model)                 # the dotted name of the decoder (`get_decoder()`)

Why per-sample encoding: a processor's batched output lays images out in as many ways as there
are families (LLaVA one row per image; LLaVA-NeXT and Idefics3 (images, crops, C, H, W) per row;
InternVL and Aya tiles stacked along dim 0; Qwen and GLM every image's patches flattened into one
(sum of t*h*w, C*T*P*P) tensor split by `image_grid_thw`), and some processors want a flat image
list where others want it nested per sample. Cutting one sample out of a batch would need a rule
per layout. Encoding each sample alone (one prompt, one image) needs none: every stage has a
sample's own tensors (weakening noises exactly them), and joining samples is one rule for every
layout: concatenate along dim 0, padding a crop axis with all-zero crops (which those models drop,
as their processors pad a batch themselves).

Token-aligned outputs (`token_type_ids` for Gemma 3, `mm_token_type_ids` for Qwen/GLM) mark image
tokens; answers are text, so they extend over answers with 0. Families whose token-aligned outputs
are not of that kind (PaliGemma's prefix/suffix types, Mllama's cross-attention mask) are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# The text outputs every processor gives; everything else is vision or token-aligned.
TEXT_KEYS = ("input_ids", "attention_mask")


class UnsupportedModelError(ValueError):
    """A model family (or a feature of it) that bpo cannot serve; the message names what."""


@dataclass(frozen=True)
class Family:
    """One model family's quirks.

    model_types: the `config.model_type` values it covers.
    tier: "first" (every stage verified on a tiny model), "second" (verified or refused),
        "generic" (an unknown family on the generic path).
    positions: "1d", or "mrope" (3-D positions from the model's `get_rope_index`).
    unsupported: why no stage can serve it (stops before any work), or None.
    bidirectional_images: image tokens attend both ways inside their image block (Gemma 3,
        given `token_type_ids`).
    image_embeds: whether the vLLM route of image weakening serves it: the engine takes the
        noised image's features as one (tokens, hidden) tensor per image. Families whose vLLM
        models want more with the embeddings (Qwen/GLM: the image grid) are not wired yet.
    """

    name: str
    model_types: tuple[str, ...]
    tier: str = "first"
    positions: str = "1d"
    unsupported: str | None = None
    bidirectional_images: bool = False
    image_embeds: bool = False


FAMILIES = (
    Family("llava", ("llava",), image_embeds=True),
    Family("llava_next", ("llava_next",)),
    Family("llava_onevision", ("llava_onevision",)),
    Family("qwen2_vl", ("qwen2_vl",), positions="mrope"),
    Family("qwen2_5_vl", ("qwen2_5_vl",), positions="mrope"),
    Family("qwen3_vl", ("qwen3_vl", "qwen3_vl_moe"), positions="mrope"),
    Family("gemma3", ("gemma3",), bidirectional_images=True),
    Family("internvl", ("internvl",)),
    Family("idefics3", ("idefics3", "smolvlm")),
    Family("mistral3", ("mistral3",)),
    Family("aya_vision", ("aya_vision",), tier="second"),
    Family("glm4v", ("glm4v", "glm4v_moe"), tier="second", positions="mrope"),
    # Linear-attention layers: scored by the naive path (`packing_refusal`).
    Family("qwen3_5", ("qwen3_5", "qwen3_5_moe"), tier="second", positions="mrope"),
    Family(
        "mllama",
        ("mllama",),
        tier="second",
        unsupported="Mllama reads the image through cross-attention layers whose "
        "token-aligned `cross_attention_mask` (tokens x images x tiles) bpo does not extend over "
        "answers yet",
    ),
    Family(
        "paligemma",
        ("paligemma",),
        tier="second",
        unsupported="PaliGemma has no chat template and scores a prefix/suffix format "
        "(`token_type_ids` 0 on the prefix, 1 on the suffix, bidirectional prefix) that bpo's "
        "chat prompts do not produce",
    ),
    Family(
        "gemma4",
        ("gemma4",),
        tier="second",
        unsupported="Gemma 4 has attention quirks of its own (like Gemma 3's bidirectional image "
        "blocks) that no tiny Gemma 4 has been checked against yet (its processor also needs an "
        "audio feature extractor)",
    ),
    Family(
        "phi4_multimodal",
        ("phi4_multimodal",),
        tier="second",
        unsupported="Phi-4-multimodal is not an AutoModelForImageTextToText in transformers",
    ),
)
_BY_TYPE = {t: family for family in FAMILIES for t in family.model_types}


def unwrap(model: Any) -> Any:
    """The transformers model under a DDP/DeepSpeed (`.module`) or peft wrapper."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _config(model_or_config: Any) -> Any:
    config = getattr(unwrap(model_or_config), "config", None)
    return config if config is not None else model_or_config


def _has_mrope_section(config: Any) -> bool:
    for c in (config, getattr(config, "text_config", None)):
        for name in ("rope_scaling", "rope_parameters"):
            rope = getattr(c, name, None)
            if isinstance(rope, dict) and "mrope_section" in rope:
                return True
    return False


def family_of(model_or_config: Any) -> Family:
    """The family of a model (or its config); an unknown one gets the generic path."""
    config = _config(model_or_config)
    model_type = getattr(config, "model_type", None) or "unknown"
    if model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    positions = "mrope" if _has_mrope_section(config) else "1d"
    return Family(model_type, (model_type,), tier="generic", positions=positions)


def check_supported(model_or_config: Any) -> Family:
    """The model's family, or UnsupportedModelError naming the family and what is missing."""
    family = family_of(model_or_config)
    if family.unsupported:
        raise UnsupportedModelError(
            f"model family {family.name!r} is not supported: {family.unsupported}. Supported "
            f"families: {', '.join(f.name for f in FAMILIES if not f.unsupported)}"
        )
    return family


# ---- encoding -------------------------------------------------------------------------------


def encode_sample(
    processor: Any, prompt: str, image: Any | None, add_special_tokens: bool = True
) -> dict[str, Tensor]:
    """The processor's outputs for one prompt and at most one image, as batch-1 tensors."""
    kwargs: dict[str, Any] = {"images": [image]} if image is not None else {}
    out = processor(
        text=[prompt], return_tensors="pt", add_special_tokens=add_special_tokens, **kwargs
    )
    return {k: v for k, v in out.items() if isinstance(v, Tensor)}


def token_aligned_keys(sample: dict[str, Tensor]) -> list[str]:
    """Outputs besides ids and mask with one value per token (`token_type_ids`, ...).

    Raises UnsupportedModelError for a per-token output that is not one int per token (Mllama's
    `cross_attention_mask`): bpo does not know how it extends over an answer.
    """
    ids = sample["input_ids"]
    keys = []
    for key, value in sample.items():
        pixels = key.startswith("pixel")  # image tensors, whatever their shape happens to be
        if key in TEXT_KEYS or pixels or value.dim() < 2 or value.shape[:2] != ids.shape:
            continue
        if value.dim() != 2 or value.is_floating_point():
            raise UnsupportedModelError(
                f"the processor gives a per-token output {key!r} of shape {tuple(value.shape)}; "
                "bpo extends only integer token types over answers"
            )
        keys.append(key)
    return sorted(keys)


def vision_keys(sample: dict[str, Tensor]) -> list[str]:
    """The sample's vision outputs: everything that is neither text nor token-aligned."""
    aligned = set(token_aligned_keys(sample))
    return sorted(k for k in sample if k not in TEXT_KEYS and k not in aligned)


def _pad_text(rows: Sequence[Tensor], value: int, side: str) -> Tensor:
    """(1, n) rows padded with `value` on `side` into one (len(rows), longest) tensor."""
    width = max(row.shape[-1] for row in rows)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        n = row.shape[-1]
        if side == "left":
            out[i, width - n :] = row.reshape(-1)
        else:
            out[i, :n] = row.reshape(-1)
    return out


def join_vision(parts: Sequence[Tensor]) -> Tensor:
    """One vision key over samples: concatenated along dim 0.

    A (1, crops, C, H, W) layout (LLaVA-NeXT, Idefics3; its (1, crops, H, W) pixel mask too) with
    fewer crops in one sample is padded with all-zero crops first, as those processors pad a
    batch themselves. (A tile stack (tiles, C, H, W) never differs past dim 0.)
    """
    if parts[0].dim() >= 3 and len({p.shape[1] for p in parts}) > 1:
        most = max(p.shape[1] for p in parts)
        parts = [
            torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, most - p.shape[1]))
            for p in parts
        ]
    return torch.cat(list(parts), dim=0)


def join_samples(
    samples: Sequence[dict[str, Tensor]], pad_token_id: int, side: str = "left"
) -> dict[str, Tensor]:
    """Batch-1 samples as one batch: text and token-aligned outputs padded, vision joined.

    Vision keys are joined over the samples that have them (text-only samples have none).
    """
    aligned = token_aligned_keys(samples[0])
    out = {
        "input_ids": _pad_text([s["input_ids"] for s in samples], pad_token_id, side),
        "attention_mask": _pad_text(
            [s.get("attention_mask", torch.ones_like(s["input_ids"])) for s in samples], 0, side
        ),
    }
    for key in aligned:
        out[key] = _pad_text([s[key] for s in samples], 0, side)
    for key in sorted({k for s in samples for k in vision_keys(s)}):
        out[key] = join_vision([s[key] for s in samples if key in s])
    return out


# ---- attention and positions ----------------------------------------------------------------


@dataclass(frozen=True)
class AttentionLayout:
    """How a model's decoder layers attend, beyond causal.

    windows: per distinct layer type, its sliding window (None: full attention). A mask for
        each type is needed when there is more than one (Gemma 3: "full_attention" and
        "sliding_attention"); the model then takes a dict of masks by layer type.
    bidirectional_images: image tokens see every token of their own image block (Gemma 3, given
        `token_type_ids`).
    """

    windows: dict[str, int | None] = field(default_factory=lambda: {"full_attention": None})
    bidirectional_images: bool = False

    @property
    def by_layer_type(self) -> bool:
        return len(self.windows) > 1


def _layer_types(model: Any) -> tuple[list[str], int | None]:
    config = _config(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if not layer_types:
        # No per-layer types: every layer slides when the config names a window (Mistral).
        layer_types = ["sliding_attention" if window else "full_attention"]
    return sorted(set(layer_types)), window


def packing_refusal(model: Any) -> str | None:
    """Why the model's answers cannot share one packed row, or None when they can.

    A layer that is not attention (Qwen3.5's linear-attention / recurrent layers) carries state
    along the row, so the rejected block would read the chosen one whatever the mask says.
    """
    types, _ = _layer_types(model)
    other = [t for t in types if t not in ("full_attention", "sliding_attention")]
    if other:
        return (
            f"{type(unwrap(model)).__name__} has {', '.join(other)} layers, which carry state "
            "along a packed row past any attention mask"
        )
    return None


def attention_layout(model: Any) -> AttentionLayout:
    """The text model's layer types and windows, from its config (a packable model's)."""
    why = packing_refusal(model)
    if why:
        raise UnsupportedModelError(why)
    types, window = _layer_types(model)
    windows = {t: (window if t == "sliding_attention" else None) for t in types}
    return AttentionLayout(windows, bidirectional_images=family_of(model).bidirectional_images)


def _rope_index_owner(model: Any) -> Any:
    base = unwrap(model)
    for candidate in (getattr(base, "model", None), base):
        if candidate is not None and hasattr(candidate, "get_rope_index"):
            return candidate
    raise UnsupportedModelError(
        f"{type(base).__name__} uses 3-D M-RoPE positions but has no `get_rope_index`; bpo cannot "
        "compute its positions"
    )


def mrope_positions(
    model: Any, input_ids: Tensor, mm_token_type_ids: Tensor, keep: Tensor, **vision: Tensor
) -> Tensor:
    """(3, B, L) positions of the `keep`ed tokens of each row, by the model's own rope index.

    keep: (B, L) bool, the tokens that form each row's sequence (others get position 0).
    vision: the image tensors the rope index reads (`image_grid_thw`, ...).
    """
    owner = _rope_index_owner(model)
    grids = {k: v for k, v in vision.items() if k.endswith("grid_thw")}
    positions, _ = owner.get_rope_index(
        input_ids=input_ids,
        mm_token_type_ids=mm_token_type_ids,
        attention_mask=keep.long(),
        **grids,
    )
    return positions.masked_fill(~keep[None], 0)


def language_model_name(model: Any) -> str:
    """The dotted submodule name of the model's language model (what `get_decoder()` returns)."""
    base = unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    for name, module in base.named_modules():
        if module is decoder and name:
            return name
    raise UnsupportedModelError(
        f"{type(base).__name__} does not say where its language model is (`get_decoder()`)"
    )
