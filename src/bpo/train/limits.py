"""How long a pair may be: the default `max_length`, and out-of-memory errors that name the pairs.

A pair store holds whatever bootstrap wrote, so one answer of 24,000 tokens can reach the
reference pass. Unbounded, its packed row (prefix + both answers) asks for tens of GB; beyond the
model's context its log-probs mean nothing anyway (learned positions fail outright, RoPE
extrapolates badly). So `max_length: null` resolves, before anything is fingerprinted or encoded,
to the model's context length capped at DEFAULT_MAX_LENGTH_CAP; longer answers are cut from the
end, and the cut pairs are counted (`truncated`) and reported by the reference pass and training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from bpo.train.batch import PairBatch
from bpo.train.config import TrainConfig

# LLaVA-1.5's context (max_position_embeddings 4096) and LLaVA-NeXT's training length, so no
# LLaVA image layout (up to 2,880 image tokens for anyres) is refused; models that advertise far
# more (Qwen2.5-VL, Gemma 3: 128k) stay within what one DPO row of a 7B model fits on one GPU.
DEFAULT_MAX_LENGTH_CAP = 4096
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# Where families keep their language model's config (InternVL: llm_config).
TEXT_CONFIGS = ("text_config", "llm_config", "language_config")
MAX_NAMED_PAIRS = 4
OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def context_length(model_config: Any) -> tuple[int, str] | None:
    """(the language model's context length, the config key it came from), or None if unsaid."""
    configs = [("", model_config)]
    configs += [(f"{name}.", getattr(model_config, name, None)) for name in TEXT_CONFIGS]
    if hasattr(model_config, "get_text_config"):
        configs.append(("text_config.", model_config.get_text_config()))
    for prefix, config in configs:
        for key in CONTEXT_KEYS:
            value = getattr(config, key, None) if config is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, f"{prefix}{key}"
    return None


def resolve_max_length(
    config: TrainConfig, model: Any, log: Callable[[str], None] | None = None
) -> TrainConfig:
    """`config` with `max_length` set: as given, else the model's context capped (see module doc).

    Call it before the reference fingerprint or any encoding: `bpo refs` and `bpo train` must key
    the cache with the same number.
    """
    if config.max_length is not None:
        return config
    found = context_length(getattr(model, "config", None))
    if found is None:
        length, why = DEFAULT_MAX_LENGTH_CAP, "the model's config gives no context length"
    else:
        context, key = found
        length = min(context, DEFAULT_MAX_LENGTH_CAP)
        why = f"the model's {key}={context}, at most {DEFAULT_MAX_LENGTH_CAP}"
    if log is not None:
        log(
            f"max_length not set: using {length} tokens per answer branch ({why}); longer answers "
            "are cut and counted as truncated; set run.max_length to choose"
        )
    return replace(config, max_length=length)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocator failure (CUDA's OutOfMemoryError, the CPU allocator's)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MESSAGES)


class BatchOutOfMemoryError(RuntimeError):
    """A batch did not fit in memory; the message names its pairs and the settings to lower."""


def describe_rows(batch: PairBatch) -> str:
    """The batch's pairs, longest packed row first, with their token counts."""
    t = batch.tensors
    rows = zip(
        batch.keys,
        t["prefix_lengths"].tolist(),
        t["chosen_lengths"].tolist(),
        t["rejected_lengths"].tolist(),
        strict=True,
    )
    ranked = sorted(rows, key=lambda row: -sum(row[1:]))
    named = [
        f"{key} (row of {p + c + r:,} tokens: prompt {p:,}, chosen {c:,}, rejected {r:,})"
        for key, p, c, r in ranked[:MAX_NAMED_PAIRS]
    ]
    more = len(ranked) - MAX_NAMED_PAIRS
    return ", ".join(named) + (f" and {more} more" if more > 0 else "")


@contextmanager
def naming_out_of_memory(
    batch: PairBatch, stage: str, max_length: int | None, fix: str
) -> Iterator[None]:
    """Turn an allocator failure inside the block into a BatchOutOfMemoryError naming the pairs.

    Args:
        stage: what ran ("the reference pass", "training step 12").
        fix: the settings to lower, as the user writes them.
    """
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise BatchOutOfMemoryError(
            f"out of memory in {stage} on a batch of {len(batch)} pair(s): {describe_rows(batch)}; "
            f"max_length={max_length} tokens per answer branch; {fix}"
        ) from exc
