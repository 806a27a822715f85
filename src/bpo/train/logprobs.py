"""Summed answer log-probs with one vision + prefix encoding per pair.

    pair_logps(model, batch: PairBatch) -> PairLogps       # shared prefix, the fast path
    naive_pair_logps(model, batch: PairBatch) -> PairLogps  # batch of two, the reference
    chosen_logps(model, batch: PairBatch) -> PairLogps      # chosen only (SFT); rejected = 0

`pair_logps` runs each pair as one packed row `[prefix | chosen | rejected]` (see
`bpo.train.batch`) with a block attention mask, so the vision tower and the image + prompt prefix
run once for both answers. Three things make it exact, and each fails silently if missing:
  * the mask is an explicit 4D float mask (0 where allowed, dtype min elsewhere). transformers
    passes a 4D mask through unchanged; eager attention adds it to the scores (a bool mask would
    be added as 0/1), sdpa takes it as a bias. Without it, position ids that restart are read as
    packed sequences and the rejected answer loses sight of the prefix;
  * padding rows attend to themselves, so no softmax row is all -inf (NaN);
  * the first token of each answer is scored from the prefix's last position.
Only answer positions reach the LM head (`logits_to_keep` with per-row positions), and the
log-softmax runs in fp32 on those positions alone.

The models are called, never taken apart, so a peft-wrapped model works the same way. The forward
must accept `input_ids, attention_mask, position_ids, logits_to_keep, use_cache` and the vision
tensors by keyword (LLaVA and other transformers image-text models do).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bpo.train.batch import CHOSEN, PAD, PREFIX, REJECTED, PairBatch


@dataclass
class PairLogps:
    """Per pair (B,): summed answer log-probs and answer token counts (padding excluded)."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor


def block_attention_mask(segments: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive (B, 1, L, L) mask of packed rows: 0 where a query may look, dtype min elsewhere.

    A token sees earlier tokens of the prefix and of its own segment; the rejected block never
    sees the chosen one. Padding sees only itself, which keeps every softmax row finite.
    """
    length = segments.shape[1]
    pos = torch.arange(length, device=segments.device)
    causal = pos[None, :] <= pos[:, None]  # (L, L) key <= query
    query, key = segments[:, :, None], segments[:, None, :]  # (B, L, 1), (B, 1, L)
    same_branch = (key == PREFIX) | (key == query)
    allowed = causal & same_branch & (key != PAD) & (query != PAD)  # (B, L, L)
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=segments.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # (B, 1, L, L)


def _compute_dtype(model: Any, device: torch.device) -> torch.dtype:
    """The dtype attention runs in: autocast's when active, else the embeddings'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    # A DDP or DeepSpeed wrapper keeps the model, and its methods, under `.module`.
    return getattr(model, "module", model).get_input_embeddings().weight.dtype


def _check_attention(model: Any) -> None:
    """Flash-attention kernels take no 4D mask; say so rather than compute something else."""
    config = getattr(getattr(model, "module", model), "config", None)  # under a DDP wrapper too
    impl = getattr(config, "_attn_implementation", None) or ""
    if impl.startswith("flash"):
        raise ValueError(
            f"pair_logps needs a 4D attention mask, which attn_implementation={impl!r} cannot take;"
            " load the model with attn_implementation='sdpa' (or 'eager'), or use naive_pair_logps"
        )


# Families whose rotary positions are 3-D (time, height, width; M-RoPE): given 1-D position ids
# they copy them to all three axes, so a restarted rejected block would get wrong image-relative
# positions and wrong log-probs with no error. They take the naive path until the packed layout
# computes their positions (`get_rope_index`).
MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def uses_mrope(model: Any) -> bool:
    """Whether the model's positions are M-RoPE's 3-D ones (the Qwen-VL families)."""
    config = getattr(getattr(model, "module", model), "config", None)
    configs = [config, getattr(config, "text_config", None)]
    for c in configs:
        if c is None:
            continue
        if getattr(c, "model_type", None) in MROPE_MODEL_TYPES:
            return True
        for name in ("rope_scaling", "rope_parameters"):
            rope = getattr(c, name, None)
            if isinstance(rope, dict) and "mrope_section" in rope:
                return True
    return False


def _scored_logits(model: Any, positions: Tensor, **inputs: Any) -> Tensor:
    """(B, K, V) logits at the given (B, K) row positions only, via `logits_to_keep`."""
    logits = model(**inputs, logits_to_keep=positions, use_cache=False).logits
    if logits.shape[:2] != positions.shape:
        raise ValueError(
            f"the model returned logits of shape {tuple(logits.shape)} for logits_to_keep of shape "
            f"{tuple(positions.shape)}; its forward must support per-row logits_to_keep positions"
        )
    return logits


def _token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """(B, K) log-probs of `targets` under (B, K, V) logits, the softmax taken in fp32."""
    logps = torch.log_softmax(logits.float(), dim=-1)  # (B, K, V)
    return logps.gather(-1, targets[..., None]).squeeze(-1)


def _sum_branches(token_logps: Tensor, branch: Tensor) -> PairLogps:
    """Sum (B, K) token log-probs per pair and branch; branch 0 (unused) is left out."""
    chosen, rejected = branch == CHOSEN, branch == REJECTED
    return PairLogps(
        chosen=(token_logps * chosen).sum(-1),
        rejected=(token_logps * rejected).sum(-1),
        chosen_tokens=chosen.sum(-1),
        rejected_tokens=rejected.sum(-1),
    )


def pair_logps(model: Any, batch: PairBatch) -> PairLogps:
    """Both answers' summed log-probs from one packed row per pair (one vision + prefix pass).

    M-RoPE models (Qwen-VL families) are scored by `naive_pair_logps` instead, with a warning.
    """
    if uses_mrope(model):
        warnings.warn(
            "this model uses 3-D M-RoPE positions, which the packed layout does not compute yet; "
            "scoring with the naive batch of two (correct, without the shared-prefix speed-up)",
            stacklevel=2,
        )
        return naive_pair_logps(model, batch)
    _check_attention(model)
    t = batch.tensors
    input_ids = t["input_ids"]
    mask = block_attention_mask(t["segments"], _compute_dtype(model, input_ids.device))
    logits = _scored_logits(
        model,
        t["score_positions"],
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=t["position_ids"],
        **batch.vision,
    )
    return _sum_branches(_token_logps(logits, t["score_targets"]), t["score_branch"])


def chosen_logps(model: Any, batch: PairBatch) -> PairLogps:
    """Summed log-probs of the chosen answers alone (prefix + chosen rows); rejected fields are 0."""
    t = batch.tensors
    width = int((t["prefix_lengths"] + t["chosen_lengths"]).max())
    segments = t["segments"][:, :width]
    keep = (segments == PREFIX) | (segments == CHOSEN)  # (B, W) the prefix + chosen row
    input_ids = t["input_ids"][:, :width].masked_fill(~keep, batch.extra["pad_token_id"])
    # Chosen entries come first in each score row; the rejected ones are dropped.
    k = int(t["chosen_lengths"].max())
    not_chosen = t["score_branch"][:, :k] != CHOSEN
    branch = t["score_branch"][:, :k].masked_fill(not_chosen, 0)
    positions = t["score_positions"][:, :k].masked_fill(not_chosen, 0)  # stay inside the row
    logits = _scored_logits(
        model,
        positions,
        input_ids=input_ids,
        attention_mask=keep.long(),
        **batch.vision,
    )
    return _sum_branches(_token_logps(logits, t["score_targets"][:, :k]), branch)


def _naive_rows(batch: PairBatch) -> tuple[Tensor, Tensor, Tensor]:
    """(input ids, attention mask, answer mask) of 2B right-padded rows, chosen then rejected
    per pair: [p0 + c0, p0 + r0, p1 + c1, ...]. The answer mask marks answer tokens."""
    t = batch.tensors
    packed = t["input_ids"]
    p, c, r = t["prefix_lengths"], t["chosen_lengths"], t["rejected_lengths"]
    width = int((p + torch.maximum(c, r)).max())
    j = torch.arange(width, device=packed.device)[None, :]  # (1, W)
    # A rejected row reads the packed row's prefix, then skips over the chosen block.
    rejected_src = torch.where(j < p[:, None], j, j + c[:, None])  # (B, W)
    chosen_src = j.expand_as(rejected_src)
    src = torch.stack([chosen_src, rejected_src], dim=1).flatten(0, 1)  # (2B, W)
    ends = torch.stack([p + c, p + r], dim=1).flatten()  # (2B,)
    starts = p.repeat_interleave(2)  # (2B,)
    valid = j < ends[:, None]  # (2B, W)
    rows = packed.repeat_interleave(2, dim=0)  # (2B, L)
    src = src.clamp(max=packed.shape[1] - 1)
    ids = rows.gather(1, src).masked_fill(~valid, batch.extra["pad_token_id"])
    answer = valid & (j >= starts[:, None])
    return ids, valid.long(), answer


def _duplicated_vision(batch: PairBatch) -> dict[str, Tensor]:
    """Each pair's vision tensors twice in a row, matching the naive rows' order."""
    out = {}
    for name, tensor in batch.vision.items():
        parts = torch.split(tensor, batch.extra["vision_sizes"][name], dim=0)
        out[name] = torch.cat([part for part in parts for _ in range(2)], dim=0)
    return out


def naive_pair_logps(model: Any, batch: PairBatch) -> PairLogps:
    """The reference: a standard batch of 2B sequences (prefix + chosen, prefix + rejected), each
    with its own copy of the image, a 2D padding mask and full logits."""
    ids, attention, answer = _naive_rows(batch)
    logits = model(
        input_ids=ids, attention_mask=attention, use_cache=False, **_duplicated_vision(batch)
    ).logits  # (2B, W, V)
    # Token j is predicted by position j - 1.
    token_logps = _token_logps(logits[:, :-1], ids[:, 1:]) * answer[:, 1:]  # (2B, W - 1)
    sums = token_logps.sum(-1).view(-1, 2)  # (B, 2) chosen, rejected
    counts = answer.sum(-1).view(-1, 2)
    return PairLogps(
        chosen=sums[:, 0],
        rejected=sums[:, 1],
        chosen_tokens=counts[:, 0],
        rejected_tokens=counts[:, 1],
    )
