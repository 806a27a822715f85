"""Summed answer log-probs with one vision + prefix encoding per pair.

    pair_logps(model, batch: PairBatch) -> PairLogps       # shared prefix, the fast path
    packed_token_logps(model, batch) -> Tensor              # its per-token log-probs (groups too)
    naive_pair_logps(model, batch: PairBatch) -> PairLogps  # batch of two, the reference
    chosen_logps(model, batch: PairBatch) -> PairLogps      # chosen only (SFT); rejected = 0
    noised_chosen_logps(model, batch) -> PairLogps          # chosen only, on the noised images
    with scoring_mode(model): ...                           # forward-only scoring (references)

With a dense preference the batch carries `score_weights` (`bpo.train.batch`), and every path
also gives the weighted sums (`PairLogps.preference_chosen`, ...) beside the plain ones.

`pair_logps` runs each pair as one packed row `[prefix | chosen | rejected]` (see
`bpo.train.batch`) with a block attention mask, so the vision tower and the image + prompt prefix
run once for both answers. Three things make it exact, and each fails silently if missing:
  * the mask is an explicit 4D float mask (0 where allowed, dtype min elsewhere). transformers
    passes a 4D mask through unchanged; eager attention adds it to the scores (a bool mask would
    be added as 0/1), sdpa takes it as a bias. Without it, position ids that restart are read as
    packed sequences and the rejected answer loses sight of the prefix;
  * padding rows attend to themselves, so no softmax row is all -inf (NaN);
  * the first token of each answer is scored from the prefix's last position.
What differs between families comes from `bpo.models.family`: 3-D M-RoPE positions from the
model's own rope index (Qwen-VL, GLM), one mask per layer type with each sliding window applied
over the restarted positions (Gemma 3), bidirectional attention inside an image block (Gemma 3),
and the token-aligned inputs (`token_type_ids`, `mm_token_type_ids`) every path passes on.
Only answer positions reach the LM head (`logits_to_keep` with per-row positions), and the
log-softmax runs in fp32 on those positions alone.

`scoring_mode` is how the reference pass runs those forwards: eval mode and inference mode (no
autograd state at all), with the same kernels as training's forward. The pass scores a
sample's pairs in one row (`bpo.train.groups`), so its log-probs equal training's pair rows to
float rounding (~1e-7 relative: the same terms summed in rows of another length), as a faster
attention kernel for the pass would also move them. The model is given back as it
came: its mode, and any tensor a module cached during the pass turned back into an ordinary
tensor (an inference tensor could never be saved for a later backward).

The models are called, never taken apart, so a peft-wrapped model works the same way. The forward
must accept `input_ids, attention_mask, position_ids, logits_to_keep, use_cache` and the vision
tensors by keyword (LLaVA and other transformers image-text models do).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bpo.models.family import attention_layout, family_of, mrope_positions, packing_refusal
from bpo.train.batch import CHOSEN, PAD, PREFIX, REJECTED, PairBatch


@dataclass
class PairLogps:
    """Per pair (B,): summed answer log-probs and answer token counts (padding excluded).

    With a dense preference (the batch's `score_weights`), also the weighted sums and the sums of
    the weights; the `preference_*` properties are what the preference terms score (the weighted
    ones when there are weights, else the plain ones), while an NLL keeps the plain sums.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    weighted_chosen: Tensor | None = None
    weighted_rejected: Tensor | None = None
    chosen_weight: Tensor | None = None
    rejected_weight: Tensor | None = None

    @property
    def preference_chosen(self) -> Tensor:
        return self.chosen if self.weighted_chosen is None else self.weighted_chosen

    @property
    def preference_rejected(self) -> Tensor:
        return self.rejected if self.weighted_rejected is None else self.weighted_rejected

    @property
    def preference_chosen_tokens(self) -> Tensor:
        return self.chosen_tokens if self.chosen_weight is None else self.chosen_weight

    @property
    def preference_rejected_tokens(self) -> Tensor:
        return self.rejected_tokens if self.rejected_weight is None else self.rejected_weight


def _block_allowed(segments: Tensor) -> Tensor:
    """(B, L, L) bool: a token sees earlier tokens of the prefix and of its own segment."""
    length = segments.shape[1]
    pos = torch.arange(length, device=segments.device)
    causal = pos[None, :] <= pos[:, None]  # (L, L) key <= query
    query, key = segments[:, :, None], segments[:, None, :]  # (B, L, 1), (B, 1, L)
    same_branch = (key == PREFIX) | (key == query)
    return causal & same_branch & (key != PAD) & (query != PAD)


def image_blocks(token_type_ids: Tensor) -> Tensor:
    """(B, L) the index of the image block each token is in (runs of type 1), -1 elsewhere."""
    is_image = token_type_ids == 1
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.long().cumsum(-1) - 1, -1)


def block_attention_mask(
    segments: Tensor,
    dtype: torch.dtype,
    positions: Tensor | None = None,
    window: int | None = None,
    blocks: Tensor | None = None,
) -> Tensor:
    """The additive (B, 1, L, L) mask of packed rows: 0 where a query may look, dtype min elsewhere.

    A token sees earlier tokens of the prefix and of its own segment; the rejected block never
    sees the chosen one. Padding sees only itself, which keeps every softmax row finite.
    window: a sliding window over the (B, L) 1-D `positions` (which restart for the rejected
        block, so a rejected token's window is the one it has after the prefix alone): a key
        is seen only when query position - key position < window.
    blocks: (B, L) image-block indices (`image_blocks`); tokens of one block see each other
        both ways (Gemma 3's bidirectional image attention).
    """
    allowed = _block_allowed(segments)
    if blocks is not None:
        allowed = allowed | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
    if window is not None:
        allowed = allowed & ((positions[:, :, None] - positions[:, None, :]) < window)
    length = segments.shape[1]
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=segments.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # (B, 1, L, L)


def packed_attention_mask(model: Any, batch: PairBatch, dtype: torch.dtype) -> Any:
    """The packed rows' mask as the model's layers need it: one 4D mask, or (layers of several
    types, e.g. Gemma 3's full and sliding ones) a dict of them by layer type."""
    layout = attention_layout(model)
    t = batch.tensors
    blocks = None
    if layout.bidirectional_images and "token_type_ids" in t:
        blocks = image_blocks(t["token_type_ids"])
    masks = {
        kind: block_attention_mask(t["segments"], dtype, t["position_ids"], window, blocks)
        for kind, window in layout.windows.items()
    }
    return masks if layout.by_layer_type else next(iter(masks.values()))


def packed_position_ids(model: Any, batch: PairBatch) -> Tensor:
    """The packed rows' positions: 1-D (B, L), or for M-RoPE families (3, B, L) from the model's
    own rope index over prefix + chosen, the rejected block restarting on all three axes at the
    position the chosen block starts at (answers are text: one step per token on every axis)."""
    t = batch.tensors
    if family_of(model).positions != "mrope":
        return t["position_ids"]
    segments = t["segments"]
    keep = (segments == PREFIX) | (segments == CHOSEN)
    types = t.get("mm_token_type_ids", torch.zeros_like(t["input_ids"]))
    positions = mrope_positions(model, t["input_ids"], types, keep, **batch.vision)  # (3, B, L)
    p = t["prefix_lengths"]
    rows = torch.arange(len(p), device=p.device)
    start = positions[:, rows, p]  # (3, B): the first chosen token's position
    offset = t["position_ids"] - p[:, None]  # (B, L): j for the rejected block's token j
    rejected = (segments >= REJECTED)[None]  # every rejected block (one per pair of a group row)
    return torch.where(rejected, start[:, :, None] + offset[None], positions)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


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


def _sum_branches(token_logps: Tensor, branch: Tensor, weights: Tensor | None = None) -> PairLogps:
    """Sum (B, K) token log-probs per pair and branch; branch 0 (unused) is left out.

    weights: (B, K) per-token weights (a dense preference): the weighted sums and the sums of the
    weights are added beside the plain ones.
    """
    chosen, rejected = branch == CHOSEN, branch == REJECTED
    out = PairLogps(
        chosen=(token_logps * chosen).sum(-1),
        rejected=(token_logps * rejected).sum(-1),
        chosen_tokens=chosen.sum(-1),
        rejected_tokens=rejected.sum(-1),
    )
    if weights is not None:
        weights = weights.to(token_logps.dtype)
        out.weighted_chosen = (token_logps * weights * chosen).sum(-1)
        out.weighted_rejected = (token_logps * weights * rejected).sum(-1)
        out.chosen_weight = (weights * chosen).sum(-1)
        out.rejected_weight = (weights * rejected).sum(-1)
    return out


def pair_logps(model: Any, batch: PairBatch) -> PairLogps:
    """Both answers' summed log-probs from one packed row per pair (one vision + prefix pass).

    A model whose layers are not all attention (`bpo.models.family.packing_refusal`) is scored
    by `naive_pair_logps`, a plain forward per answer, with a warning saying why.
    """
    why = packing_refusal(model)
    if why:
        _warn_once(f"{why}; scoring with the naive batch of two (a plain forward per answer)")
        return naive_pair_logps(model, batch)
    t = batch.tensors
    return _sum_branches(
        packed_token_logps(model, batch), t["score_branch"], t.get("score_weights")
    )


def packed_token_logps(model: Any, batch: PairBatch) -> Tensor:
    """(B, K) log-probs of every scored answer token of packed rows (`score_targets` at
    `score_positions`): one forward with the block mask and the packed positions."""
    _check_attention(model)
    t = batch.tensors
    input_ids = t["input_ids"]
    mask = packed_attention_mask(model, batch, _compute_dtype(model, input_ids.device))
    logits = _scored_logits(
        model,
        t["score_positions"],
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=packed_position_ids(model, batch),
        **batch.vision,
        **batch.token_types,
    )
    return _token_logps(logits, t["score_targets"])


def chosen_logps(
    model: Any, batch: PairBatch, vision: dict[str, Tensor] | None = None
) -> PairLogps:
    """Summed log-probs of the chosen answers alone (prefix + chosen rows); rejected fields are 0.

    vision: the vision tensors the rows are scored with; default the batch's own (clean) ones.
    """
    vision = batch.vision if vision is None else vision
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
    token_types = {k: v[:, :width].masked_fill(~keep, 0) for k, v in batch.token_types.items()}
    logits = _scored_logits(
        model,
        positions,
        input_ids=input_ids,
        attention_mask=keep.long(),
        **vision,
        **token_types,
    )
    weights = t["score_weights"][:, :k] if "score_weights" in t else None
    return _sum_branches(_token_logps(logits, t["score_targets"][:, :k]), branch, weights)


def noised_chosen_logps(model: Any, batch: PairBatch) -> PairLogps:
    """Summed log-probs of the chosen answers on the pairs' noised images (the image-contrast
    term): `chosen_logps`'s `[prompt | chosen]` rows with `batch.noised_vision`.

    What these rows share with the pair rows is the tokenization and the answer tokens, not the
    image features or the prefix: the image is another one, so its features and every prefix
    position after them are computed anew, in a forward of their own.
    """
    return chosen_logps(model, batch, batch.noised_vision)


def _naive_rows(batch: PairBatch) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """(input ids, attention mask, answer mask, token-aligned outputs) of 2B right-padded rows,
    chosen then rejected per pair: [p0 + c0, p0 + r0, p1 + c1, ...]. The answer mask marks
    answer tokens."""
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
    token_types = {
        name: values.repeat_interleave(2, dim=0).gather(1, src).masked_fill(~valid, 0)
        for name, values in batch.token_types.items()
    }
    return ids, valid.long(), answer, token_types


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
    ids, attention, answer, token_types = _naive_rows(batch)
    logits = model(
        input_ids=ids,
        attention_mask=attention,
        use_cache=False,
        **_duplicated_vision(batch),
        **token_types,
    ).logits  # (2B, W, V)
    # Token j is predicted by position j - 1.
    token_logps = _token_logps(logits[:, :-1], ids[:, 1:]) * answer[:, 1:]  # (2B, W - 1)
    sums = token_logps.sum(-1).view(-1, 2)  # (B, 2) chosen, rejected
    counts = answer.sum(-1).view(-1, 2)
    out = PairLogps(
        chosen=sums[:, 0],
        rejected=sums[:, 1],
        chosen_tokens=counts[:, 0],
        rejected_tokens=counts[:, 1],
    )
    if "score_weights" in batch.tensors:
        weights = _naive_weights(batch, answer[:, 1:]).to(token_logps.dtype)
        out.weighted_chosen, out.weighted_rejected = (token_logps * weights).sum(-1).view(-1, 2).T
        out.chosen_weight, out.rejected_weight = weights.sum(-1).view(-1, 2).T
    return out


def _naive_weights(batch: PairBatch, answer: Tensor) -> Tensor:
    """The batch's (B, K) score weights laid over the naive rows' (2B, W) answer positions.

    Score rows hold each pair's chosen tokens, then its rejected ones, in order, and the naive
    rows are chosen then rejected per pair: read row by row, both list the same tokens in the
    same order, so the used weights fill the answer positions in order.
    """
    t = batch.tensors
    used = t["score_weights"][t["score_branch"] != 0]
    return torch.zeros(answer.shape, dtype=used.dtype, device=used.device).masked_scatter(
        answer, used
    )


def _release_inference_tensors(model: Any) -> None:
    """Replace tensors that modules stored during an inference-mode forward (buffers, cached
    attributes) by ordinary copies, so training can use them in a backward."""
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, Tensor) and value.is_inference():
                setattr(module, name, value.clone())
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_inference():
                module._buffers[name] = buffer.clone()


@contextlib.contextmanager
def scoring_mode(model: Any) -> Iterator[None]:
    """Forward-only scoring: eval and inference mode; the model comes back in the mode it had,
    with nothing cached that a backward could not use (see the module doc)."""
    inner = getattr(model, "module", model)  # under a DDP wrapper
    was_training = inner.training
    inner.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        _release_inference_tensors(inner)
        inner.train(was_training)
