"""Pairs to tensors: encode_pair's ids and truncation, collate_pairs' packed layout."""

from __future__ import annotations

import pytest
import torch

from bpo.models.prompts import tokenize_prompt_and_answer
from bpo.train.batch import EncodedPair, collate_pairs, encode_pair

IMAGE_TOKENS = 16  # the tiny LLaVA's (32 / 8) ** 2 patches


def _expand_image(ids, image_id):
    out = []
    for token in ids:
        out.extend([image_id] * IMAGE_TOKENS if token == image_id else [token])
    return out


def test_encode_pair_expands_the_image_and_keeps_the_answer_ids(processor, pairs, image):
    """Prompt ids = the model layer's prompt ids with <image> expanded to 16 tokens; answers are
    exactly tokenize_prompt_and_answer's; pixel_values are the processor's for the image."""
    pair = pairs[1]
    item = encode_pair(pair, processor, image)
    prompt_ids, chosen_ids = tokenize_prompt_and_answer(processor, pair.prompt, pair.chosen)
    _, rejected_ids = tokenize_prompt_and_answer(processor, pair.prompt, pair.rejected)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert item.key == pair.key
    assert item.prompt_ids == _expand_image(prompt_ids, image_id)
    assert item.prompt_ids.count(image_id) == IMAGE_TOKENS
    assert (item.chosen_ids, item.rejected_ids) == (chosen_ids, rejected_ids)
    assert item.chosen_ids[-1] == processor.tokenizer.eos_token_id
    assert not item.truncated
    expected = processor(images=[image], text=["<image>"], return_tensors="pt")["pixel_values"]
    assert item.vision.keys() == {"pixel_values"}
    assert torch.equal(item.vision["pixel_values"], expected)


def test_encode_pair_without_an_image(processor, pairs):
    """A text-only prompt: no image tokens, no vision tensors."""
    pair = pairs[2]
    item = encode_pair(pair, processor, None)
    prompt_ids, _ = tokenize_prompt_and_answer(processor, pair.prompt, pair.chosen, has_image=False)
    assert item.prompt_ids == prompt_ids
    assert item.vision == {}


def test_max_length_cuts_answers_only(processor, pairs, image):
    """max_length = prompt + 3: the 11-token rejected answer keeps its first 3 tokens, the
    2-token chosen answer is untouched, the prompt (image tokens included) is whole."""
    pair = pairs[1]
    full = encode_pair(pair, processor, image)
    assert (len(full.chosen_ids), len(full.rejected_ids)) == (2, 11)
    cut = encode_pair(pair, processor, image, max_length=len(full.prompt_ids) + 3)
    assert cut.truncated
    assert cut.prompt_ids == full.prompt_ids
    assert cut.chosen_ids == full.chosen_ids
    assert cut.rejected_ids == full.rejected_ids[:3]
    exact = encode_pair(pair, processor, image, max_length=len(full.prompt_ids) + 11)
    assert not exact.truncated and exact.rejected_ids == full.rejected_ids


def test_a_prompt_too_long_names_the_pair_and_the_fix(processor, pairs, image):
    pair = pairs[1]
    prompt_len = len(encode_pair(pair, processor, image).prompt_ids)
    with pytest.raises(
        ValueError, match=rf"pair {pair.key}: .*{prompt_len} tokens.*raise max_length"
    ):
        encode_pair(pair, processor, image, max_length=prompt_len)


def test_collate_lays_out_packed_rows_by_hand():
    """Pair a: prompt [5 6 7], chosen [8 9], rejected [10]; pair b: prompt [5], chosen [11],
    rejected [12 13 14], no image. Pad id 0. The answers' first tokens are scored at the
    prompt's last position (2 for a, 0 for b); rejected positions restart after the prompt."""
    pixels = torch.arange(6.0).view(1, 6)
    items = [
        EncodedPair("a", [5, 6, 7], [8, 9], [10], {"pixel_values": pixels}),
        EncodedPair("b", [5], [11], [12, 13, 14], truncated=True),
    ]
    batch = collate_pairs(items, pad_token_id=0)
    t = batch.tensors
    assert batch.keys == ["a", "b"]
    assert t["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [5, 11, 12, 13, 14, 0]]
    assert t["segments"].tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 2, 2, 2, -1]]
    assert t["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 2, 3, 0]]
    assert t["score_positions"].tolist() == [[2, 3, 2, 0], [0, 0, 2, 3]]
    assert t["score_targets"].tolist() == [[8, 9, 10, 0], [11, 12, 13, 14]]
    assert t["score_branch"].tolist() == [[1, 1, 2, 0], [1, 2, 2, 2]]
    assert t["prefix_lengths"].tolist() == [3, 1]
    assert t["chosen_lengths"].tolist() == [2, 1]
    assert t["rejected_lengths"].tolist() == [1, 3]
    assert torch.equal(t["pixel_values"], pixels)
    assert batch.extra["vision_sizes"] == {"pixel_values": [1, 0]}
    assert batch.extra["truncated"] == [False, True]
    moved = batch.to("cpu")
    assert moved.keys == batch.keys and moved.vision.keys() == {"pixel_values"}
