"""Reference scoring of the pairs of one sample together: one row per image + prompt + chosen.

A bootstrapped store holds several pairs per sample (the gold answer against each weakened and
each injected negative), and each repeats the image, the prompt and the chosen answer. Training
keeps one row per pair (a batch is a sample of pairs), but the reference pass, which only
scores, takes a sample's pairs together:

    [prefix | chosen | rejected_1 | ... | rejected_k | pad]

Rejected block j has segment and branch id REJECTED + j: it sees the prefix and itself, never
the chosen block or another rejected one, and its positions restart at the prefix length, as the
rejected block of a pair row does. `bpo.train.logprobs` reads "the same segment" for the mask
and "segment >= REJECTED" for M-RoPE positions, so its masks, sliding windows and positions apply
unchanged, and each pair's log-probs equal those of its own pair row. The vision tower and the
prefix run once per sample instead of once per pair, and the chosen answer is scored once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bpo.models.family import packing_refusal
from bpo.train.batch import (
    CHOSEN,
    PAD,
    PREFIX,
    REJECTED,
    EncodedPair,
    PairBatch,
    _collate_vision,
    _pad_rows,
)
from bpo.train.logprobs import packed_token_logps


def same_prefix_and_chosen(a: EncodedPair, b: EncodedPair) -> bool:
    """Whether two encoded pairs have one image, prompt and chosen answer (token for token)."""
    return (
        a.prompt_ids == b.prompt_ids
        and a.chosen_ids == b.chosen_ids
        and a.token_types == b.token_types
        and a.vision.keys() == b.vision.keys()
        and all(torch.equal(a.vision[k], b.vision[k]) for k in a.vision)
    )


def group_pairs(items: Sequence[EncodedPair]) -> list[list[EncodedPair]]:
    """The items in groups that share image, prompt and chosen answer, in first-seen order."""
    groups: list[list[EncodedPair]] = []
    by_text: dict[tuple[tuple[int, ...], tuple[int, ...]], list[list[EncodedPair]]] = {}
    for item in items:
        candidates = by_text.setdefault((tuple(item.prompt_ids), tuple(item.chosen_ids)), [])
        group = next((g for g in candidates if same_prefix_and_chosen(g[0], item)), None)
        if group is None:
            group = []
            candidates.append(group)
            groups.append(group)
        group.append(item)
    return groups


def _group_row(group: Sequence[EncodedPair]) -> tuple[list[int], ...]:
    """(ids, segments, positions, score positions, score targets, score branch) of one row."""
    first = group[0]
    p, c = len(first.prompt_ids), len(first.chosen_ids)
    ids = first.prompt_ids + first.chosen_ids
    segments = [PREFIX] * p + [CHOSEN] * c
    positions = list(range(p + c))
    # Token j of an answer is predicted by the position before it; j = 0 by the prefix's last.
    score_at = [p - 1, *range(p, p + c - 1)]
    targets = list(first.chosen_ids)
    branch = [CHOSEN] * c
    for j, item in enumerate(group):
        r, start = len(item.rejected_ids), len(ids)
        ids += item.rejected_ids
        segments += [REJECTED + j] * r
        positions += range(p, p + r)
        score_at += [p - 1, *range(start, start + r - 1)]
        targets += item.rejected_ids
        branch += [REJECTED + j] * r
    return ids, segments, positions, score_at, targets, branch


def collate_groups(groups: Sequence[Sequence[EncodedPair]], pad_token_id: int) -> PairBatch:
    """Right-padded group rows, one per group (`keys`: each group's first pair's key)."""
    for group in groups:
        for item in group:
            if not item.prompt_ids or not item.chosen_ids or not item.rejected_ids:
                raise ValueError(f"pair {item.key}: prompt and both answers need a token each")
    rows = [_group_row(group) for group in groups]
    firsts = [group[0] for group in groups]
    vision, sizes = _collate_vision(firsts)
    widths = [len(row[0]) for row in rows]
    token_keys = sorted({k for item in firsts for k in item.token_types})
    token_types = {
        k: _pad_rows(
            [
                item.token_types.get(k, [0] * len(item.prompt_ids))
                + [0] * (width - len(item.prompt_ids))
                for item, width in zip(firsts, widths, strict=True)
            ],
            0,
        )
        for k in token_keys
    }
    names = ("input_ids", "segments", "position_ids", "score_positions", "score_targets")
    pads = (pad_token_id, PAD, 0, 0, pad_token_id)
    tensors = {
        name: _pad_rows([row[i] for row in rows], v)
        for i, (name, v) in enumerate(zip(names, pads, strict=True))
    }
    tensors["score_branch"] = _pad_rows([row[5] for row in rows], 0)
    tensors["prefix_lengths"] = torch.tensor([len(item.prompt_ids) for item in firsts])
    tensors["chosen_lengths"] = torch.tensor([len(item.chosen_ids) for item in firsts])
    # All the row's rejected tokens: what an out-of-memory message counts per row.
    tensors["rejected_lengths"] = torch.tensor(
        [sum(len(item.rejected_ids) for item in group) for group in groups]
    )
    extra = {
        "pad_token_id": pad_token_id,
        "vision_keys": sorted(vision),
        "vision_sizes": sizes,
        "token_keys": token_keys,
        "groups": [[item.key for item in group] for group in groups],
        "truncated": [[item.truncated for item in group] for group in groups],
    }
    return PairBatch(
        tensors={**tensors, **vision, **token_types}, keys=[i.key for i in firsts], extra=extra
    )


def branch_sums(token_logps: Tensor, branch: Tensor, branches: int) -> tuple[Tensor, Tensor]:
    """(B, branches) summed log-probs and token counts per branch id (0: unused positions)."""
    values = token_logps.masked_fill(branch == 0, 0.0)
    sums = torch.zeros(branch.shape[0], branches, dtype=values.dtype, device=values.device)
    counts = torch.zeros(branch.shape[0], branches, dtype=torch.long, device=values.device)
    sums.scatter_add_(1, branch, values)
    counts.scatter_add_(1, branch, (branch != 0).long())
    return sums, counts


def group_scores(model: Any, batch: PairBatch) -> list[tuple[str, float, float, int, int, bool]]:
    """(key, chosen log-prob, rejected log-prob, chosen tokens, rejected tokens, truncated) of
    every pair of the group rows, in the groups' order, from one forward."""
    why = packing_refusal(model)
    if why:
        raise ValueError(f"{why}: score its pairs one pair row at a time (bpo.train.logprobs)")
    branch = batch.tensors["score_branch"]
    largest = max(len(group) for group in batch.extra["groups"])
    sums, counts = branch_sums(packed_token_logps(model, batch), branch, REJECTED + largest)
    sums, counts = sums.float().tolist(), counts.tolist()
    out = []
    for row, (keys, cut) in enumerate(
        zip(batch.extra["groups"], batch.extra["truncated"], strict=True)
    ):
        for j, (key, truncated) in enumerate(zip(keys, cut, strict=True)):
            b = REJECTED + j
            out.append(
                (
                    key,
                    sums[row][CHOSEN],
                    sums[row][b],
                    counts[row][CHOSEN],
                    counts[row][b],
                    truncated,
                )
            )
    return out
