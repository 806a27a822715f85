"""Length-grouped epoch batches: the padded share, the grouping, keyed order, resume, rank shards."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bpo.data.records import PreferencePair
from bpo.train.batch import collate_pairs, encode_pair, pad_token_id
from bpo.train.config import TrainConfig
from bpo.train.data import _length_grouped, epoch_batches, padded_share, row_lengths

# A long-tailed list of 203 row lengths (203: no batch size below divides it evenly).
LONG_TAILED = (np.random.default_rng(7).lognormal(4.0, 0.8, 203).astype(int) + 1).tolist()


def flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


def test_padded_share_of_a_tiny_length_list():
    """Lengths [3, 5, 2, 8]. Batches [0, 1], [2, 3]: 2x5 + 2x8 = 26 slots for 3+5+2+8 = 18
    tokens, so 8/26 is padding. Batches [1, 3], [0, 2]: 2x8 + 2x3 = 22 slots, 4/22. One batch of
    all four: 4x8 = 32 slots, 14/32. A batch of one row has no padding."""
    lengths = [3, 5, 2, 8]
    assert padded_share(lengths, [[0, 1], [2, 3]]) == pytest.approx(8 / 26)
    assert padded_share(lengths, [[1, 3], [0, 2]]) == pytest.approx(4 / 22)
    assert padded_share(lengths, [[0, 1, 2, 3]]) == pytest.approx(14 / 32)
    assert padded_share(lengths, [[0], [1], [2], [3]]) == 0.0


def test_mega_batches_are_sorted_then_the_batch_order_shuffled_longest_first():
    """Order 0..15, batches of 2: 16 // (2 x 4) = 2 batches per mega-batch, so mega-batches of 4.
    Lengths by index: [1, 9, 5, 3 | 2, 2, 7, 4 | 6, 1, 8, 3 | 10, 2, 3, 4].
    Sorted longest first, ties in order: [1, 2, 3, 0] [6, 7, 4, 5] [10, 8, 11, 9] [12, 15, 14, 13],
    cut in twos; the batch with the longest row (length 10: pair 12) goes first. The 16 rows hold
    70 tokens; the batches' longest rows sum to 9+3+7+2+8+3+10+3 = 45, so 2x45 = 90 slots and
    20/90 padding, where the plain cut [0, 1], [2, 3], ... has 2x(9+5+2+7+6+8+10+4) = 102 slots
    and 32/102."""
    lengths = [1, 9, 5, 3, 2, 2, 7, 4, 6, 1, 8, 3, 10, 2, 3, 4]
    batches = _length_grouped(list(range(16)), lengths, chunk=2, step=2, seed=0, epoch=0)
    want = [[1, 2], [3, 0], [6, 7], [4, 5], [10, 8], [11, 9], [12, 15], [14, 13]]
    assert sorted(batches) == sorted(want)
    assert batches[0] == [12, 15]
    assert padded_share(lengths, batches) == pytest.approx(20 / 90)
    plain = [list(range(at, at + 2)) for at in range(0, 16, 2)]
    assert padded_share(lengths, plain) == pytest.approx(32 / 102)


def test_the_order_is_keyed_by_seed_and_epoch_and_holds_every_pair_once():
    """203 pairs in batches of 4: 51 batches, one of 3; recomputed equal, another epoch or seed
    gives another order; and less padding than the plain shuffle of the same (seed, epoch)."""
    n, lengths = len(LONG_TAILED), LONG_TAILED
    batches = epoch_batches(n, 4, seed=3, epoch=1, lengths=lengths)
    assert sorted(flat(batches)) == list(range(n))
    assert [len(b) for b in batches] == [4] * 50 + [3]  # the short one last, as unsorted
    assert batches == epoch_batches(n, 4, seed=3, epoch=1, lengths=list(lengths))
    assert batches != epoch_batches(n, 4, seed=3, epoch=2, lengths=lengths)
    assert batches != epoch_batches(n, 4, seed=4, epoch=1, lengths=lengths)
    assert max(lengths[i] for i in batches[0]) == max(lengths)
    plain = epoch_batches(n, 4, seed=3, epoch=1)
    assert padded_share(lengths, batches) < padded_share(lengths, plain) / 2


def test_a_resume_mid_epoch_continues_with_the_same_batches(processor):
    """A resumed process recomputes its epoch from the pairs (row_lengths of fresh copies) and
    skips the micro-batches done: what is left is the uninterrupted run's tail, exactly."""
    pairs = [
        PreferencePair(
            f"p{i}",
            None,
            [{"role": "user", "content": "Describe the image."}],
            "a red circle ." * (1 + i % 5),
            "a dog ." * (1 + i % 3),
            "test",
        )
        for i in range(40)
    ]
    uninterrupted = epoch_batches(40, 2, 5, 0, lengths=row_lengths(pairs, processor))
    copies = [PreferencePair.from_json(p.to_json()) for p in pairs]
    resumed = epoch_batches(40, 2, 5, 0, lengths=row_lengths(copies, processor))
    assert resumed[7:] == uninterrupted[7:] and len(uninterrupted) == 20


def test_one_process_accumulating_two_takes_the_pairs_two_processes_take_per_step():
    """Whole optimizer steps are grouped: batch 2 x grad_accum 2 on one process and batch 2 on
    each of two processes take the same 4 pairs at every step, in the same order."""
    lengths = LONG_TAILED[:200]
    one = epoch_batches(200, 2, 3, 1, lengths=lengths, grad_accum=2)
    ranks = [epoch_batches(200, 2, 3, 1, rank, 2, lengths) for rank in (0, 1)]
    assert [one[k] + one[k + 1] for k in range(0, 100, 2)] == [
        a + b for a, b in zip(*ranks, strict=True)
    ]
    assert one != epoch_batches(200, 2, 3, 1, lengths=lengths)  # steps of 2 group otherwise


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_are_equal_sized_slices_of_the_grouped_global_batches(world):
    """203 pairs over `world` processes, 4 each: every process gets ceil(203 / 4w) batches of
    exactly 4; together they are the global batches, wrapped to a multiple of 4w as the plain
    order is, and every pair is among them."""
    n, lengths = len(LONG_TAILED), LONG_TAILED
    ranks = [epoch_batches(n, 4, 1, 0, rank, world, lengths) for rank in range(world)]
    count = -(-n // (4 * world))
    assert all(len(r) == count and all(len(b) == 4 for b in r) for r in ranks)
    joined = [[i for r in ranks for i in r[k]] for k in range(count)]
    plain = [epoch_batches(n, 4, 1, 0, rank, world) for rank in range(world)]
    assert sorted(flat(joined)) == sorted(i for r in plain for i in flat(r))
    assert set(flat(joined)) == set(range(n))
    # Each global batch is one run of a sorted mega-batch: rank 0 holds its longest rows.
    for batch in joined:
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def test_wrong_length_count_is_refused():
    with pytest.raises(ValueError, match="lengths holds 3 row lengths for 4 pairs"):
        epoch_batches(4, 2, 0, 0, lengths=[1, 2, 3])


def test_grouping_is_the_default(tmp_path):
    from bpo.models.load import ModelConfig

    assert TrainConfig(model=ModelConfig(str(tmp_path))).group_by_length is True


def test_row_lengths_rank_rows_as_the_encoded_rows_do(processor):
    """Single-turn image pairs: the encoded row (image tokens, template, BOS and EOS included) is
    the estimate plus one constant, give or take a token per answer where the tokenizer merges an
    answer's first word with what precedes it ("yes" alone is 2 tokens here, after the prompt 1);
    rows further apart than that sort the same by the estimate."""
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    answers = [
        ("a red circle and a blue square .", "a dog ."),
        ("no", "yes , a white ring ."),
        ("a green triangle , a yellow diamond and a white ring .", "a cat ."),
        ("yes", "no"),
    ]
    prompts = ["<image>\nDescribe the image.", "<image>\nIs there a square in the image?"]
    pairs = [
        PreferencePair(f"p{i}", "x.png", [{"role": "user", "content": prompts[i % 2]}], c, r, "t")
        for i, (c, r) in enumerate(answers)
    ]
    batch = collate_pairs(
        [encode_pair(p, processor, image) for p in pairs], pad_token_id(processor)
    )
    real = (batch.tensors["segments"] >= 0).sum(dim=1).tolist()
    estimate = row_lengths(pairs, processor)
    # Prompt rows: the image's tokens, BOS and the template around 6 or 10 text tokens (38 and 42
    # in all); each answer ends with EOS. Estimate: prompt text + both answers' text tokens.
    assert real == [38 + 9 + 4, 42 + 2 + 7, 38 + 13 + 4, 42 + 2 + 2]
    assert estimate == [6 + 8 + 3, 10 + 1 + 7, 6 + 12 + 3, 10 + 2 + 1]
    offsets = [r - e for r, e in zip(real, estimate, strict=True)]
    assert max(offsets) - min(offsets) <= 2
