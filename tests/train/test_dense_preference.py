"""A dense preference: shared tokens weighted by hand, the weighted scores against a plain forward,
the loss on weighted scores by hand, and the settings that refuse it."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from bpo.models.prompts import build_prompt, tokenize_prompt_and_answer
from bpo.train.batch import collate_pairs, encode_pair, shared_token_weights
from bpo.train.config import LossSettings, ModelConfig, TrainConfig, check_config, dense_weight
from bpo.train.data import PairDataset
from bpo.train.logprobs import PairLogps, chosen_logps, naive_pair_logps, pair_logps
from bpo.train.losses import preference_loss


def test_shared_tokens_by_hand():
    # One token swapped: every other token is shared, in both answers.
    assert shared_token_weights([5, 6, 7, 8], [5, 9, 7, 8], 0.25) == (
        [0.25, 1.0, 0.25, 0.25],
        [0.25, 1.0, 0.25, 0.25],
    )
    # One token inserted: the chosen answer shares all its tokens, the rejected all but one.
    assert shared_token_weights([1, 2, 3], [1, 4, 2, 3], 0.0) == ([0.0] * 3, [0.0, 1.0, 0.0, 0.0])
    # Nothing in common: plain weights.
    assert shared_token_weights([1, 2], [3], 0.5) == ([1.0, 1.0], [1.0])


def _weighted_batch(processor, pairs, image, weight):
    items = [encode_pair(pair, processor, image) for pair in pairs]
    for item in items:
        item.answer_weights = shared_token_weights(item.chosen_ids, item.rejected_ids, weight)
    return items, collate_pairs(items, processor.tokenizer.pad_token_id)


def _plain_forward_token_logps(model, processor, pair, answer, image):
    """The answer's per-token log-probs from the model's own forward of prompt + answer."""
    _, answer_ids = tokenize_prompt_and_answer(processor, pair.prompt, answer)
    inputs = processor(
        images=[image], text=[build_prompt(processor, pair.prompt)], return_tensors="pt"
    )
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer_ids])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0]
    logps = torch.log_softmax(logits, -1)
    start = inputs["input_ids"].shape[1]
    return answer_ids, [logps[start + j - 1, t].item() for j, t in enumerate(answer_ids)]


def test_weighted_scores_equal_a_plain_forward_weighted_by_hand(llava, pairs, image):
    """Pair "one" (no token in common but the final "." run and "a"): the packed, naive and
    chosen-only paths' weighted sums equal the plain forward's token log-probs times the weights
    computed here; the plain sums are the unweighted ones."""
    model, processor = llava
    weight = 0.25
    _, batch = _weighted_batch(processor, pairs[:2], image, weight)
    packed, naive = pair_logps(model, batch), naive_pair_logps(model, batch)
    chosen_ids, chosen = _plain_forward_token_logps(
        model, processor, pairs[0], pairs[0].chosen, image
    )
    rejected_ids, rejected = _plain_forward_token_logps(
        model, processor, pairs[0], pairs[0].rejected, image
    )
    w_chosen, w_rejected = shared_token_weights(chosen_ids, rejected_ids, weight)
    assert weight in w_chosen and 1.0 in w_chosen  # the pair has shared and differing tokens
    want = {
        "weighted_chosen": sum(w * lp for w, lp in zip(w_chosen, chosen, strict=True)),
        "weighted_rejected": sum(w * lp for w, lp in zip(w_rejected, rejected, strict=True)),
        "chosen_weight": sum(w_chosen),
        "rejected_weight": sum(w_rejected),
        "chosen": sum(chosen),
        "rejected": sum(rejected),
    }
    for got in (packed, naive):
        for name, value in want.items():
            assert getattr(got, name)[0].item() == pytest.approx(value, abs=1e-5), name
    for name in ("weighted_chosen", "weighted_rejected", "chosen_weight", "rejected_weight"):
        torch.testing.assert_close(getattr(packed, name), getattr(naive, name), atol=1e-5, rtol=0)
    alone = chosen_logps(model, batch)
    torch.testing.assert_close(alone.weighted_chosen, packed.weighted_chosen, atol=1e-5, rtol=0)
    assert packed.preference_chosen is packed.weighted_chosen


def test_the_dataset_carries_the_weights_and_plain_runs_carry_none(llava, pairs, image):
    _, processor = llava
    images = {"x.png": image}
    item = PairDataset(pairs, processor, images=images, shared_weight=0.0)[0]
    assert item.answer_weights == shared_token_weights(item.chosen_ids, item.rejected_ids, 0.0)
    plain = PairDataset(pairs, processor, images=images)[0]
    assert plain.answer_weights is None
    batch = collate_pairs([plain], processor.tokenizer.pad_token_id)
    assert "score_weights" not in batch.tensors


def test_the_loss_scores_weighted_means_and_the_nll_plain_sums_by_hand():
    """Weighted sums -2 / -3 over weights 1.5 / 2, reference -2.5 / -2.5; plain chosen -6 over
    3 tokens. DPO on the weighted means: margin beta * ((-2 + 2.5) / 1.5 - (-3 + 2.5) / 2); the
    NLL anchor is the plain chosen log-prob per token, 6 / 3."""
    t = torch.tensor
    policy = PairLogps(
        chosen=t([-6.0]),
        rejected=t([-8.0]),
        chosen_tokens=t([3]),
        rejected_tokens=t([4]),
        weighted_chosen=t([-2.0]),
        weighted_rejected=t([-3.0]),
        chosen_weight=t([1.5]),
        rejected_weight=t([2.0]),
    )
    settings = LossSettings(beta=0.5, average_log_prob=True, rpo_alpha=1.0)
    losses, metrics = preference_loss(policy, t([-2.5]), t([-2.5]), settings)
    margin = 0.5 * (0.5 / 1.5 - (-0.5) / 2)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-margin)) + 2.0, abs=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(margin, abs=1e-6)
    assert metrics["logps/chosen"].item() == -6.0  # the logged log-probs stay the plain sums


def test_the_weight_is_checked():
    config = TrainConfig(model=ModelConfig("m"), pairs="p", image_root="i")
    assert dense_weight(config.loss) is None  # 1: plain DPO
    check_config(replace(config, loss=LossSettings(shared_token_weight=0.0)))
    with pytest.raises(ValueError, match=r"shared_token_weight must be in \[0, 1\]"):
        check_config(replace(config, loss=LossSettings(shared_token_weight=1.5)))
    dense_sft = replace(config, method="sft", loss=LossSettings(shared_token_weight=0.5))
    with pytest.raises(ValueError, match=r"shared_token_weight 0\.5 weighs DPO's tokens"):
        check_config(dense_sft)
