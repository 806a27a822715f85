"""The pairs a run reads: selection, bad pairs, the pad-id policy, collation, reference scores."""

from __future__ import annotations

from copy import deepcopy
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import bpo.train.batch as batch_module
import bpo.train.data as data_module
from bpo.data.records import PreferencePair
from bpo.data.store import PairWriter
from bpo.train.batch import collate_pairs, encode_pair, pad_token_id
from bpo.train.data import (
    BadPair,
    Collator,
    PairDataset,
    epoch_batches,
    load_store_pairs,
    score_pairs,
    select_pairs,
)
from bpo.train.logprobs import pair_logps

ASK = [{"role": "user", "content": "Describe the image."}]


def made(pair_id: str, source: str, step: int | None = None) -> PreferencePair:
    """A text-only pair of `source`, made at noise step `step` (None: no noise step)."""
    meta = {} if step is None else {"noise_step": step}
    return PreferencePair(pair_id, None, ASK, "a red circle .", "a dog .", source, meta)


def five_pairs() -> list[PreferencePair]:
    """Weakened pairs made at steps 100, 500 and 900, and two injected ones (no noise step)."""
    return [
        made("w100", "weaken", 100),
        made("i1", "inject"),
        made("w500", "weaken", 500),
        made("w900", "weaken", 900),
        made("i2", "inject"),
    ]


def ids(pairs: list[PreferencePair]) -> list[str]:
    return [p.id for p in pairs]


def test_selection_by_source_and_noise_step():
    """noise_steps [100, 900] keeps w100 and w900 (injected pairs have no step); with sources
    [weaken], [500] keeps w500; [inject] with any noise step keeps nothing; [inject] alone keeps
    both injected pairs; no filter keeps all five, in order."""
    pairs = five_pairs()
    assert ids(select_pairs(pairs, None, [100, 900])) == ["w100", "w900"]
    assert ids(select_pairs(pairs, ["weaken"], [500])) == ["w500"]
    assert ids(select_pairs(pairs, ["inject"], [100, 900])) == []
    assert ids(select_pairs(pairs, ["inject"], None)) == ["i1", "i2"]
    assert ids(select_pairs(pairs, None, None)) == ["w100", "i1", "w500", "w900", "i2"]


def test_a_store_is_read_through_the_same_selection(tmp_path):
    store = tmp_path / "pairs"
    with PairWriter(store, {"stage": "data-test"}) as writer:
        for pair in five_pairs():
            writer.write(pair)
    assert ids(load_store_pairs(store, None, [500, 900])) == ["w500", "w900"]
    assert ids(load_store_pairs(store, ["inject"])) == ["i1", "i2"]
    with pytest.raises(ValueError, match=r"holds no pairs of noise steps \[300\]; check run.pairs"):
        load_store_pairs(store, None, [300])


def test_epoch_order_is_a_seeded_permutation_split_across_processes():
    """Each epoch is a new permutation, the same for the same (seed, epoch); two processes get
    disjoint halves of each global batch, the last one filled by wrapping around."""
    one = epoch_batches(5, 2, seed=3, epoch=0)
    assert sorted(i for b in one for i in b) == [0, 1, 2, 3, 4]
    assert [len(b) for b in one] == [2, 2, 1]
    assert one == epoch_batches(5, 2, seed=3, epoch=0) != epoch_batches(5, 2, seed=3, epoch=1)
    rank0, rank1 = (epoch_batches(5, 2, 3, 0, rank, world=2) for rank in (0, 1))
    flat = [i for b in one for i in b]
    assert rank0 == [flat[0:2], flat[4:5] + flat[0:1]] and rank1 == [flat[2:4], flat[1:3]]


def test_pad_id_is_the_pad_token_else_eos_else_zero(processor):
    tokenizer = processor.tokenizer
    assert pad_token_id(processor) == tokenizer.convert_tokens_to_ids("<pad>")
    no_pad = deepcopy(processor)
    no_pad.tokenizer.pad_token = None
    assert pad_token_id(no_pad) == tokenizer.convert_tokens_to_ids("</s>")
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_an_empty_answer_is_a_bad_pair_not_a_failed_batch(processor, pairs, image):
    blank = replace(pairs[0], rejected="   ")
    dataset = PairDataset([pairs[1], blank], processor, images={"x.png": image})
    collated = Collator(pad_token_id(processor))([dataset[0], dataset[1]])
    assert collated.batch.keys == [pairs[1].key]
    assert collated.bad == [
        BadPair(
            blank.key,
            "empty_answer",
            f"pair {blank.key}: the rejected answer is empty; fix or drop the pair",
        )
    ]


def test_an_answer_that_encodes_to_no_tokens_is_a_bad_pair(processor, pairs, image, monkeypatch):
    """As with a template that writes no end-of-turn token and a tokenizer that merges the answer
    into the prompt's last token: the chosen answer has no ids of its own."""
    real = batch_module.tokenize_prompt_and_answer

    def no_chosen_ids(processor, messages, answer, has_image):
        prompt, answer_ids = real(processor, messages, answer, has_image)
        return prompt, [] if answer == pairs[0].chosen else answer_ids

    monkeypatch.setattr(batch_module, "tokenize_prompt_and_answer", no_chosen_ids)
    item = PairDataset(pairs[:1], processor, images={"x.png": image})[0]
    message = f"pair {pairs[0].key}: the chosen answer encodes to no tokens; fix or drop the pair"
    assert item == BadPair(pairs[0].key, "empty_answer", message)


def test_the_collator_adds_each_pairs_reference_logps_in_batch_order(processor, pairs, image):
    refs = {pairs[0].key: (-1.5, -2.5), pairs[1].key: (-3.0, -4.0)}
    dataset = PairDataset(pairs[:2], processor, images={"x.png": image})
    batch = Collator(pad_token_id(processor), refs)([dataset[1], dataset[0]]).batch
    assert batch.keys == [pairs[1].key, pairs[0].key]
    assert batch.tensors["ref_chosen_logps"].tolist() == [-3.0, -1.5]
    assert batch.tensors["ref_rejected_logps"].tolist() == [-4.0, -2.5]


def test_scores_equal_each_pair_scored_alone_with_or_without_a_pad_token(llava, pairs, image):
    """Batches of 2 over 3 pairs (the second one short): each score is the pair's own pair_logps.
    A tokenizer without a pad token pads with </s>; padding is masked, so the scores are equal."""
    model, processor = llava
    images = {"x.png": image}
    sizes = []
    scores, bad = score_pairs(
        model,
        PairDataset(pairs, processor, images=images),
        batch_size=2,
        on_batch=lambda batch_scores, batch_bad: sizes.append(len(batch_scores) + len(batch_bad)),
    )
    assert bad == [] and sizes == [2, 1]
    no_pad = deepcopy(processor)
    no_pad.tokenizer.pad_token = None
    eos_padded, _ = score_pairs(model, PairDataset(pairs, no_pad, images=images), batch_size=3)
    for pair, score, other in zip(pairs, scores, eos_padded, strict=True):
        alone = collate_pairs([encode_pair(pair, processor, image)], pad_token_id(processor))
        with torch.no_grad():
            want = pair_logps(model, alone)
        assert score.key == other.key == pair.key
        assert score.ref_chosen_logp == pytest.approx(want.chosen.item(), abs=1e-5)
        assert score.ref_rejected_logp == pytest.approx(want.rejected.item(), abs=1e-5)
        assert (score.chosen_tokens, score.rejected_tokens) == (
            int(want.chosen_tokens),
            int(want.rejected_tokens),
        )
        assert other.ref_chosen_logp == pytest.approx(score.ref_chosen_logp, abs=1e-5)
        assert other.ref_rejected_logp == pytest.approx(score.ref_rejected_logp, abs=1e-5)


def test_non_finite_reference_logps_are_refused_per_pair(llava, pairs, image, monkeypatch):
    model, processor = llava
    real = data_module.group_scores

    def second_rejected_is_inf(model, batch):  # pairs[1]'s rejected log-prob is -inf
        rows = real(model, batch)
        return [
            (key, c, float("-inf") if key == pairs[1].key else r, *rest)
            for key, c, r, *rest in rows
        ]

    monkeypatch.setattr(data_module, "group_scores", second_rejected_is_inf)
    dataset = PairDataset(pairs, processor, images={"x.png": image})
    scores, bad = score_pairs(model, dataset, batch_size=3, indices=[2, 1, 0])
    assert [s.key for s in scores] == [pairs[2].key, pairs[0].key]
    assert [(b.key, b.reason) for b in bad] == [(pairs[1].key, "non_finite_logps")]
    assert bad[0].message.startswith(f"pair {pairs[1].key}: reference log-probs are not finite")


def test_kept_encodings_are_made_once_and_equal_fresh_ones(processor, pairs, image, monkeypatch):
    rows = [pairs[0], pairs[1], replace(pairs[2], rejected="   ")]  # the last a bad pair
    fresh = PairDataset(rows, processor, images={"x.png": image}, shared_weight=0.0)
    expected = [fresh[i] for i in range(3)]
    real, made = data_module.encode_pair, []

    def counted(pair, *args):
        made.append(pair.key)
        return real(pair, *args)

    monkeypatch.setattr(data_module, "encode_pair", counted)
    kept = PairDataset(
        rows, processor, images={"x.png": image}, shared_weight=0.0, keep_encoded=True
    )
    read = [kept[i] for i in (0, 2, 1, 0, 1, 2)]
    assert made == [rows[0].key, rows[2].key, rows[1].key]  # each pair encoded on first read only
    assert read[3] is read[0] and read[4] is read[2] and read[5] is read[1]
    assert read[1] == expected[2]  # the bad pair, kept as its BadPair
    for got, want in zip((read[0], read[2]), expected[:2], strict=True):
        assert (got.prompt_ids, got.chosen_ids, got.rejected_ids, got.answer_weights) == (
            want.prompt_ids,
            want.chosen_ids,
            want.rejected_ids,
            want.answer_weights,
        )
        assert got.vision.keys() == want.vision.keys()
        assert all(torch.equal(got.vision[k], want.vision[k]) for k in want.vision)
