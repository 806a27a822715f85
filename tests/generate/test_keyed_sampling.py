"""Keyed sampling: the nucleus, the per-row sampler, the stream seeds and end-of-sequence cuts."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from bpo.generate import KeyedSampler, stream_seed
from bpo.generate.sampling import eos_ids, nucleus, until_eos


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    """probs (0.5, 0.3, 0.15, 0.05). Ascending, the mass up to each token is 0.05, 0.20, 0.50,
    1.00. top_p = 0.8 drops tokens whose mass-up-to is <= 0.2 (0.05 and 0.15): {0.5, 0.3} = 0.8
    is kept. top_p = 0.75 keeps the same two; top_p = 0.85 also keeps 0.15 (0.2 > 0.15).
    Temperature 2 halves the logits."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isinf(nucleus(logits, 1.0, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(nucleus(logits, 1.0, 0.75)).tolist() == [[False, False, True, True]]
    assert torch.isinf(nucleus(logits, 1.0, 0.85)).tolist() == [[False, False, False, True]]
    torch.testing.assert_close(nucleus(logits, 2.0, 1.0), logits / 2)
    kept = nucleus(logits, 1.0, 0.8).softmax(-1)
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_keyed_sampler_draws_from_the_tempered_distribution():
    """4000 rows, each with its own seed, share the logits log(0.5, 0.3, 0.2) at temperature 1:
    each token's frequency is within 5 standard errors sqrt(p (1 - p) / 4000) (<= 0.0079) of p.
    At temperature 0 the sampler is greedy."""
    n = 4000
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(n, 3)
    forced = KeyedSampler(list(range(n)), 1.0, 1.0)(None, logits.clone())  # type: ignore[arg-type]
    assert bool((torch.isfinite(forced).sum(-1) == 1).all())
    counts = torch.bincount(forced.argmax(-1), minlength=3).double() / n
    for p, f in zip([0.5, 0.3, 0.2], counts.tolist(), strict=True):
        assert abs(f - p) < 5 * math.sqrt(p * (1 - p) / n)
    greedy = KeyedSampler([0, 1], 0.0, 1.0)(None, logits[:2].clone())  # type: ignore[arg-type]
    assert greedy.argmax(-1).tolist() == [0, 0]


def test_a_rows_draws_depend_on_its_seed_alone():
    """Row 1 with seed 5 draws the same 20 tokens in a batch of 3 as alone: its generator is its
    own, whatever runs beside it."""
    logits = torch.zeros(3, 50)  # uniform over 50 tokens: a shared stream would show at once
    together = KeyedSampler([4, 5, 6], 1.0, 1.0)
    alone = KeyedSampler([5], 1.0, 1.0)
    rows = [(together(None, logits.clone()), alone(None, logits[:1].clone())) for _ in range(20)]
    assert [int(t[1].argmax()) for t, _ in rows] == [int(a[0].argmax()) for _, a in rows]
    assert len({int(t[0].argmax()) for t, _ in rows}) > 5


def test_streams_are_keyed_by_seed_request_sample_and_purpose():
    seeds = {stream_seed(s, i, j, k) for s in (0, 1) for i in (0, 1) for j in (0, 1) for k in "ab"}
    assert len(seeds) == 16
    assert all(0 <= s < 2**63 for s in seeds)
    assert stream_seed(0, 1, 2, "noise") == stream_seed(0, 1, 2, "noise")
    assert stream_seed(0, "coco_1", 0, "sample") != stream_seed(0, "coco_2", 0, "sample")


def test_end_of_sequence_ids_and_cuts():
    """The generation config's eos ids win over the tokenizer's; a cut keeps the first eos."""
    tokenizer = SimpleNamespace(eos_token_id=2)
    assert eos_ids(
        SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 9])), tokenizer
    ) == {7, 9}
    assert eos_ids(
        SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=7)), tokenizer
    ) == {7}
    assert eos_ids(None, tokenizer) == {2}
    assert until_eos([5, 6, 9, 0, 0], {7, 9}) == [5, 6, 9]
    assert until_eos([5, 6], {7, 9}) == [5, 6]
