"""Pairs to tensors: one image + prompt prefix and two answers per pair.

    encode_pair(pair, processor, image, max_length=None) -> EncodedPair
    collate_pairs(items, pad_token_id(processor)) -> PairBatch

The packed layout. Each pair is one row `[prefix | chosen | rejected | pad]`, right-padded:

    input_ids       (B, L)  the row's tokens, `pad_token_id` on padding
    segments        (B, L)  0 prefix, 1 chosen, 2 rejected, -1 padding
    position_ids    (B, L)  0.. over the prefix and chosen; the rejected block restarts at the
                            prefix length, so both answers sit where they would after the prefix
    score_positions (B, K)  for every answer token, the row position whose logits predict it;
                            the first token of either answer is predicted by the prefix's last
                            position, so that position appears twice
    score_targets   (B, K)  the answer token predicted there (`pad_token_id` where unused)
    score_branch    (B, K)  1 chosen, 2 rejected, 0 unused
    score_weights   (B, K)  only with a dense preference (`shared_token_weights`): each answer
                            token's weight in the preference scores, 0 where unused
    prefix_lengths, chosen_lengths, rejected_lengths  (B,)
    + the vision tensors (e.g. pixel_values), each pair's concatenated along dim 0 in row order
      (`bpo.models.family.join_vision`); `extra["vision_sizes"]` holds each pair's dim-0 size per
      key so the naive reference can duplicate them per answer;
    + the processor's token-aligned outputs (`token_type_ids`, `mm_token_type_ids`), (B, L): the
      prefix's values, 0 over both answers (text) and padding; their names in
      `extra["token_keys"]`;
    + with the image-contrast term on (`EncodedPair.noised_vision` set): the vision tensors with
      each pair's pixels noised, joined the same way under `noised_<name>` (names in
      `extra["noised_vision_keys"]`, `PairBatch.noised_vision`), and `has_image` (B,) bool.

`bpo.train.logprobs` turns `segments` into the block attention mask: chosen tokens see the prefix
and the chosen tokens before them; rejected tokens see the prefix and the rejected tokens before
them, never the chosen block.

A pair that cannot become such a row (an answer with no tokens, a prompt that leaves no room for
an answer within max_length, messages the template cannot render) raises EncodeError naming the
pair; `bpo.train.data.PairDataset` turns it into a reported bad pair.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bpo.data.records import PreferencePair
from bpo.models.family import encode_sample, join_vision, token_aligned_keys, vision_keys
from bpo.models.prompts import build_prompt, tokenize_prompt_and_answer

PREFIX, CHOSEN, REJECTED, PAD = 0, 1, 2, -1
NOISED = "noised_"  # the prefix of the noised vision tensors' names in PairBatch.tensors


class EncodeError(ValueError):
    """A pair that cannot be encoded; the message names it, `reason` is its bad-pair reason."""

    def __init__(self, message: str, reason: str = "unencodable") -> None:
        super().__init__(message)
        self.reason = reason


def pad_token_id(processor: Any) -> int:
    """The id padding is written with: the pad token's, else the EOS token's, else 0.

    Padding is masked out of attention and scoring, so any id in the vocabulary gives the same
    log-probs; many LLaMA-family tokenizers have no pad token.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


@dataclass
class EncodedPair:
    """One pair, tokenized. `prompt_ids` has the image tokens expanded (what the model sees)."""

    key: str
    prompt_ids: list[int]
    chosen_ids: list[int]  # answer tokens after the prompt, ending with the end-of-turn token
    rejected_ids: list[int]
    vision: dict[str, Tensor] = field(default_factory=dict)  # processor's image outputs, batch 1
    # The processor's token-aligned outputs over prompt_ids (e.g. token_type_ids), by name.
    token_types: dict[str, list[int]] = field(default_factory=dict)
    truncated: bool = False  # an answer was cut to fit max_length
    # `vision` with the pixels noised, for the image-contrast term ({} without an image); None
    # when the term is off (`bpo.train.image_noise`).
    noised_vision: dict[str, Tensor] | None = None
    # (chosen, rejected) per-token weights of a dense preference (`shared_token_weights`); None
    # when it is off.
    answer_weights: tuple[list[float], list[float]] | None = None


@dataclass
class PairBatch:
    """A collated batch of pairs, laid out as `bpo.train.logprobs` needs (see the module doc)."""

    tensors: dict[str, Tensor]
    keys: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def to(self, device: Any) -> PairBatch:
        """The same batch with every tensor on `device`."""
        tensors = {name: t.to(device) for name, t in self.tensors.items()}
        return PairBatch(tensors=tensors, keys=list(self.keys), extra=dict(self.extra))

    @property
    def vision(self) -> dict[str, Tensor]:
        """The vision tensors (whatever the processor gave besides text), by keyword."""
        return {name: self.tensors[name] for name in self.extra.get("vision_keys", [])}

    @property
    def noised_vision(self) -> dict[str, Tensor]:
        """The vision tensors with each pair's pixels noised (the image-contrast term), by keyword."""
        names = self.extra.get("noised_vision_keys", [])
        return {name: self.tensors[NOISED + name] for name in names}

    @property
    def token_types(self) -> dict[str, Tensor]:
        """The token-aligned outputs (e.g. token_type_ids), (B, L) over the packed rows."""
        return {name: self.tensors[name] for name in self.extra.get("token_keys", [])}

    def __len__(self) -> int:
        return len(self.keys)


def _prompt_ids_with_image(
    processor: Any, prompt_text: str, image: Any, add_special_tokens: bool
) -> tuple[list[int], dict[str, Tensor], dict[str, list[int]]]:
    """Prompt ids with the image placeholder expanded by the processor, its vision tensors and
    its token-aligned outputs."""
    out = encode_sample(processor, prompt_text, image, add_special_tokens)
    vision = {k: out[k] for k in vision_keys(out)}
    token_types = {k: out[k][0].tolist() for k in token_aligned_keys(out)}
    return out["input_ids"][0].tolist(), vision, token_types


def _check_same_text(key: str, expanded: list[int], plain: list[int], image_token_id: int) -> None:
    """Outside the image run, the processor's ids must be the tokenizer's: else answers misalign.

    The placeholder the template writes may expand to any run holding image tokens: N image
    tokens (LLaVA), `<fake_token_around_image><global-img><image>*N<fake_token_around_image>`
    (Idefics3/SmolVLM), `\n\n<start_of_image><image_soft_token>*N<end_of_image>\n\n` in place
    of `<start_of_image>` (Gemma 3), image patch tokens of another id than the placeholder's
    (Aya Vision). So the two may differ only in one stretch, which the processor's ids make longer
    (or fill with image tokens); the prompt's end (where answers start) must be the same.
    """
    start = 0
    while start < min(len(expanded), len(plain)) and expanded[start] == plain[start]:
        start += 1
    end = 0  # common suffix, not overlapping the common prefix
    while (
        end < min(len(expanded), len(plain)) - start
        and expanded[len(expanded) - 1 - end] == plain[len(plain) - 1 - end]
    ):
        end += 1
    middle = expanded[start : len(expanded) - end]
    expanded_image = image_token_id in middle or len(middle) > len(plain) - start - end
    if end == 0 or not expanded_image:
        raise EncodeError(
            f"pair {key}: the processor tokenizes the prompt differently from the tokenizer "
            f"(beyond expanding the image): {expanded} vs {plain}"
        )


def _fit_answers(
    key: str, prompt_len: int, chosen: list[int], rejected: list[int], max_length: int | None
) -> tuple[list[int], list[int], bool]:
    """Cut each answer so that prompt + answer <= max_length; the prompt is never cut."""
    if max_length is None:
        return chosen, rejected, False
    budget = max_length - prompt_len
    if budget < 1:
        raise EncodeError(
            f"pair {key}: the prompt alone is {prompt_len} tokens (image tokens included), which "
            f"leaves no room for an answer within max_length={max_length}; raise max_length "
            f"above {prompt_len}",
            reason="prompt_too_long",
        )
    truncated = len(chosen) > budget or len(rejected) > budget
    return chosen[:budget], rejected[:budget], truncated


def _tokenize_answers(
    pair: PreferencePair, processor: Any, has_image: bool
) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids with one image placeholder, chosen ids, rejected ids); empty answers refused."""
    answers = {"chosen": pair.chosen, "rejected": pair.rejected}
    for name, text in answers.items():
        if not text.strip():
            raise EncodeError(
                f"pair {pair.key}: the {name} answer is empty; fix or drop the pair", "empty_answer"
            )
    ids = {}
    try:
        for name, text in answers.items():
            prompt, ids[name] = tokenize_prompt_and_answer(processor, pair.prompt, text, has_image)
    except ValueError as exc:  # messages the template cannot render, two image placeholders, ...
        raise EncodeError(f"pair {pair.key}: {exc}") from exc
    for name, answer_ids in ids.items():
        if not answer_ids:
            # Per pair, here: collate_pairs would otherwise fail the whole batch.
            raise EncodeError(
                f"pair {pair.key}: the {name} answer encodes to no tokens; fix or drop the pair",
                "empty_answer",
            )
    return prompt, ids["chosen"], ids["rejected"]


def encode_pair(
    pair: PreferencePair,
    processor: Any,
    image: Any | None,
    max_length: int | None = None,
) -> EncodedPair:
    """Tokenize a pair: the prompt (image tokens expanded), both answers, the vision tensors.

    image: the pair's PIL image, or None for a text-only prompt.
    max_length: the most tokens per branch, image tokens included: prompt + chosen and
        prompt + rejected each fit in it (the packed row holds prompt + both answers). Answers are
        cut from the end and `truncated` is set; a prompt that leaves no room raises EncodeError,
        as does an answer that is empty or encodes to no tokens.
    """
    has_image = image is not None
    prompt_plain, chosen, rejected = _tokenize_answers(pair, processor, has_image)
    vision: dict[str, Tensor] = {}
    token_types: dict[str, list[int]] = {}
    prompt_ids = prompt_plain
    if has_image:
        tokenizer = getattr(processor, "tokenizer", processor)
        text = build_prompt(processor, pair.prompt, add_generation_prompt=True, has_image=True)
        # tokenize_prompt_and_answer adds the specials unless the template wrote the BOS itself.
        specials = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
        prompt_ids, vision, token_types = _prompt_ids_with_image(processor, text, image, specials)
        image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
        _check_same_text(pair.key, prompt_ids, prompt_plain, image_token_id)
    chosen, rejected, truncated = _fit_answers(
        pair.key, len(prompt_ids), chosen, rejected, max_length
    )
    return EncodedPair(
        key=pair.key,
        prompt_ids=prompt_ids,
        chosen_ids=chosen,
        rejected_ids=rejected,
        vision=vision,
        token_types=token_types,
        truncated=truncated,
    )


def shared_token_weights(
    chosen: Sequence[int], rejected: Sequence[int], weight: float
) -> tuple[list[float], list[float]]:
    """Per-token weights of both answers for a dense preference: `weight` on the tokens the two
    answers share, 1 on the tokens where they differ.

    Shared tokens are those of the matching blocks `difflib.SequenceMatcher` finds between the two
    token-id sequences (the longest common runs, in order; no junk heuristic), so an edit that
    swaps one word leaves every other token shared, and a sampled answer that goes its own way
    shares only the runs it has in common with the gold.
    """
    chosen_w, rejected_w = [1.0] * len(chosen), [1.0] * len(rejected)
    matcher = difflib.SequenceMatcher(None, list(chosen), list(rejected), autojunk=False)
    for block in matcher.get_matching_blocks():
        chosen_w[block.a : block.a + block.size] = [weight] * block.size
        rejected_w[block.b : block.b + block.size] = [weight] * block.size
    return chosen_w, rejected_w


def _packed_row(item: EncodedPair) -> tuple[list[int], list[int], list[int]]:
    """(token ids, segments, position ids) of one `[prefix | chosen | rejected]` row."""
    p, c, r = len(item.prompt_ids), len(item.chosen_ids), len(item.rejected_ids)
    ids = item.prompt_ids + item.chosen_ids + item.rejected_ids
    segments = [PREFIX] * p + [CHOSEN] * c + [REJECTED] * r
    positions = list(range(p + c)) + list(range(p, p + r))
    return ids, segments, positions


def _score_row(item: EncodedPair) -> tuple[list[int], list[int], list[int]]:
    """(positions, target ids, branch) for every answer token of one packed row."""
    p, c, r = len(item.prompt_ids), len(item.chosen_ids), len(item.rejected_ids)
    # Token j of an answer is predicted by the position before it; for j = 0 that is the
    # prefix's last position (p - 1), shared by both answers.
    chosen_at = [p - 1, *range(p, p + c - 1)]
    rejected_at = [p - 1, *range(p + c, p + c + r - 1)]
    positions = chosen_at[:c] + rejected_at[:r]
    targets = item.chosen_ids + item.rejected_ids
    branch = [CHOSEN] * c + [REJECTED] * r
    return positions, targets, branch


def _pad_rows(
    rows: Sequence[list[int]] | Sequence[list[float]], value: float, dtype: torch.dtype = torch.long
) -> Tensor:
    """Right-pad lists of numbers into a (len(rows), longest) tensor (long unless `dtype`)."""
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def _collate_vision(items: Sequence[EncodedPair]) -> tuple[dict[str, Tensor], dict[str, list]]:
    """Each vision key joined over the pairs that have it, plus each pair's dim-0 size."""
    return _join_by_key([item.vision for item in items])


def _join_by_key(visions: Sequence[dict[str, Tensor]]) -> tuple[dict[str, Tensor], dict[str, list]]:
    """Each key joined over the dicts that have it (`join_vision`), plus each dict's dim-0 size."""
    keys = sorted({k for vision in visions for k in vision})
    tensors, sizes = {}, {}
    for k in keys:
        tensors[k] = join_vision([vision[k] for vision in visions if k in vision])
        sizes[k] = [vision[k].shape[0] if k in vision else 0 for vision in visions]
    return tensors, sizes


def _collate_noised(items: Sequence[EncodedPair]) -> tuple[dict[str, Tensor], list[str]]:
    """The noised vision tensors under `noised_<name>` and `has_image`; nothing when the term is
    off. Joined as the clean ones are, so pair b's noised pixels sit where its clean ones do."""
    if all(item.noised_vision is None for item in items):
        return {}, []
    noised, _ = _join_by_key([item.noised_vision or {} for item in items])
    tensors = {NOISED + name: tensor for name, tensor in noised.items()}
    tensors["has_image"] = torch.tensor([bool(item.noised_vision) for item in items])
    return tensors, sorted(noised)


def _collate_token_types(items: Sequence[EncodedPair]) -> dict[str, Tensor]:
    """Each token-aligned key as (B, L) rows: the prefix's values, then 0 (answers, padding)."""
    keys = sorted({k for item in items for k in item.token_types})
    return {
        k: _pad_rows(
            [
                item.token_types.get(k, [0] * len(item.prompt_ids))
                + [0] * (len(item.chosen_ids) + len(item.rejected_ids))
                for item in items
            ],
            0,
        )
        for k in keys
    }


def collate_pairs(items: Sequence[EncodedPair], pad_token_id: int) -> PairBatch:
    """Right-padded packed rows `[prefix | chosen | rejected]`, one per pair (see module doc)."""
    if not items:
        raise ValueError("collate_pairs needs at least one pair")
    for item in items:
        if not item.prompt_ids or not item.chosen_ids or not item.rejected_ids:
            raise ValueError(f"pair {item.key}: prompt and both answers need at least one token")
    packed = [_packed_row(item) for item in items]
    scored = [_score_row(item) for item in items]
    vision, sizes = _collate_vision(items)
    noised, noised_keys = _collate_noised(items)
    token_types = _collate_token_types(items)
    tensors = {
        "input_ids": _pad_rows([row[0] for row in packed], pad_token_id),
        "segments": _pad_rows([row[1] for row in packed], PAD),
        "position_ids": _pad_rows([row[2] for row in packed], 0),
        "score_positions": _pad_rows([row[0] for row in scored], 0),
        "score_targets": _pad_rows([row[1] for row in scored], pad_token_id),
        "score_branch": _pad_rows([row[2] for row in scored], 0),
        "prefix_lengths": torch.tensor([len(i.prompt_ids) for i in items]),
        "chosen_lengths": torch.tensor([len(i.chosen_ids) for i in items]),
        "rejected_lengths": torch.tensor([len(i.rejected_ids) for i in items]),
        **vision,
        **noised,
        **token_types,
    }
    extra = {
        "pad_token_id": pad_token_id,
        "vision_keys": sorted(vision),
        "vision_sizes": sizes,
        "token_keys": sorted(token_types),
        "truncated": [item.truncated for item in items],
    }
    if noised:
        extra["noised_vision_keys"] = noised_keys
    weights = _collate_weights(items)
    if weights is not None:
        tensors["score_weights"] = weights
    return PairBatch(tensors=tensors, keys=[item.key for item in items], extra=extra)


def _collate_weights(items: Sequence[EncodedPair]) -> Tensor | None:
    """(B, K) the answer tokens' weights in score-row order (chosen, then rejected), 0 where
    unused; None when no pair has weights (the dense preference is off)."""
    if all(item.answer_weights is None for item in items):
        return None
    missing = [item.key for item in items if item.answer_weights is None]
    if missing:
        raise ValueError(f"pairs {missing[:3]} have no answer weights but others of the batch do")
    rows = [item.answer_weights[0] + item.answer_weights[1] for item in items]
    return _pad_rows(rows, 0.0, torch.float32)
