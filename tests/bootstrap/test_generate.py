"""Batched generation gives every request what it gets alone, in the order it was asked."""

from __future__ import annotations

import pytest
from bootstrap_helpers import mixed_requests

from bpo.bootstrap import GenerateConfig, GenerationRequest, generate_answers, generate_with_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def requests() -> list[GenerationRequest]:
    return mixed_requests()


def test_batched_answers_equal_one_by_one_answers_in_input_order(loaded):
    """Batches of 3 mix prompt lengths (so left padding happens) and are formed in length order,
    not input order: equal answers at equal positions show both the padding and the reordering
    are undone. The answers differ from each other, so a shuffled order could not pass."""
    model, processor = loaded
    asked = requests()
    alone = [
        generate_answers(model, processor, [r], batch_size=1, max_new_tokens=6)[0] for r in asked
    ]
    batched = generate_answers(model, processor, asked, batch_size=3, max_new_tokens=6)
    assert batched == alone
    assert len(set(alone)) >= 3, alone


def test_config_front_end_and_dict_requests(loaded):
    model, processor = loaded
    asked = requests()[:2]
    as_dicts = [{"messages": r.messages, "image": r.image} for r in asked]
    config = GenerateConfig(batch_size=2, max_new_tokens=6)
    assert generate_with_config(model, processor, as_dicts, config) == generate_answers(
        model, processor, asked, batch_size=1, max_new_tokens=6
    )


def test_sampling_is_reproducible_with_a_seed(loaded):
    model, processor = loaded
    asked = requests()
    kwargs = {"batch_size": 2, "max_new_tokens": 6, "do_sample": True, "temperature": 1.5}
    first = generate_answers(model, processor, asked, seed=7, **kwargs)
    assert generate_answers(model, processor, asked, seed=7, **kwargs) == first


def test_right_padding_is_refused(loaded):
    model, processor = loaded
    processor.tokenizer.padding_side = "right"
    try:
        with pytest.raises(ValueError, match="pads on the right"):
            generate_answers(model, processor, requests()[:1])
    finally:
        processor.tokenizer.padding_side = "left"


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown generation backend 'tgi'"):
        generate_with_config(None, None, [], GenerateConfig(backend="tgi"))  # type: ignore[arg-type]
