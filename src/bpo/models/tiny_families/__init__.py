"""Tiny models of every model family bpo serves, built from each family's own config classes.

    build_tiny_family("qwen2_vl", texts) -> (Qwen2VLForConditionalGeneration, Qwen2VLProcessor)
    save_tiny_family("qwen2_vl", texts, folder)  # loads back with load_model_and_processor

Each is the family's real transformers model class and processor class (PIL image processor),
random fp32 weights from a fixed seed, hidden sizes 32-64, 2 layers, ~130-240k parameters, a
byte-level BPE vocabulary trained on `texts` holding the family's special tokens, the family's
chat template, and a generation config that stops at the family's end-of-turn token. Images are
small (32-64 px) and never split, so each gives 4-16 image tokens (LLaVA: 16). A `TinySizes`
builds a first-class family bigger (benchmarks: `benchmarks/family_prefix_sharing.py`).

    idefics      idefics3, smolvlm
    llava_like   llava, llava_next, llava_onevision, mistral3
    qwen         qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_5
    gemma        gemma3, paligemma
    internvl     internvl, aya_vision
    second_tier  glm4v, mllama

FIRST_CLASS are the families every stage is verified on; SECOND_TIER the other native
image-text families of transformers 5.24, built where cheap (NOT_BUILT says why not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bpo.models.tiny_families import gemma, idefics, internvl, llava_like, qwen, second_tier
from bpo.models.tiny_families.common import TinySizes, save_family
from bpo.models.tiny_families.idefics import (
    IDEFICS3_CHAT_TEMPLATE,
    TinyIdefics3Config,
    build_tiny_idefics3,
    save_tiny_idefics3,
)

FIRST_CLASS = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "gemma3",
    "internvl",
    "idefics3",
    "smolvlm",
    "mistral3",
)
SECOND_TIER = (
    "aya_vision",
    "glm4v",
    "mllama",
    "paligemma",
    "qwen3_5",
    "gemma4",
    "phi4_multimodal",
)
NOT_BUILT = {
    "gemma4": "Gemma4ForConditionalGeneration exists, but its processor also wants an audio "
    "feature extractor and no copy of Gemma 4's chat template was at hand to check a tiny one "
    "against; not built yet",
    "phi4_multimodal": "Phi-4-multimodal is not an AutoModelForImageTextToText in transformers "
    "(only Phi4MultimodalForCausalLM, with a torchvision-only image processor); not built",
}

_BUILDERS: dict[str, Callable[..., tuple[Any, Any]]] = {
    "llava": llava_like.build_llava,
    "llava_next": llava_like.build_llava_next,
    "llava_onevision": llava_like.build_llava_onevision,
    "qwen2_vl": qwen.build_qwen2_vl,
    "qwen2_5_vl": qwen.build_qwen2_5_vl,
    "qwen3_vl": qwen.build_qwen3_vl,
    "gemma3": gemma.build_gemma3,
    "internvl": internvl.build_internvl,
    "idefics3": idefics.build_idefics3,
    "smolvlm": idefics.build_smolvlm,
    "mistral3": llava_like.build_mistral3,
    "aya_vision": internvl.build_aya_vision,
    "glm4v": second_tier.build_glm4v,
    "mllama": second_tier.build_mllama,
    "paligemma": gemma.build_paligemma,
    "qwen3_5": qwen.build_qwen3_5,
}
# Every family with a builder, first class first.
BUILT = tuple(name for name in (*FIRST_CLASS, *SECOND_TIER) if name in _BUILDERS)


def build_tiny_family(
    name: str, texts: Iterable[str], seed: int = 0, sizes: TinySizes | None = None
) -> tuple[Any, Any]:
    """(model, processor) of the tiny model of family `name` (a `BUILT` one), vocabulary
    trained on `texts`, weights drawn from `seed`; `sizes` (FIRST_CLASS families only) makes
    it bigger (`common.TinySizes`)."""
    if name not in _BUILDERS:
        why = NOT_BUILT.get(name, f"no such family; built ones: {', '.join(BUILT)}")
        raise ValueError(f"cannot build a tiny {name!r}: {why}")
    if sizes is None:
        return _BUILDERS[name](list(texts), seed)
    if name not in FIRST_CLASS:
        raise ValueError(f"sizes are for the first-class families only, not {name!r}")
    return _BUILDERS[name](list(texts), seed, sizes=sizes)


def save_tiny_family(name: str, texts: Iterable[str], out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny model of family `name` and save it (safetensors) and its processor into
    `out_dir`, so `load_model_and_processor(out_dir)` loads the family's own classes."""
    model, processor = build_tiny_family(name, texts, seed)
    return save_family(model, processor, out_dir)


__all__ = [
    "BUILT",
    "FIRST_CLASS",
    "IDEFICS3_CHAT_TEMPLATE",
    "NOT_BUILT",
    "SECOND_TIER",
    "TinyIdefics3Config",
    "TinySizes",
    "build_tiny_family",
    "build_tiny_idefics3",
    "save_tiny_family",
    "save_tiny_idefics3",
]
