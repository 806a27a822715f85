"""Answer log-probs: the shared-prefix packed rows equal the naive batch of two, values and grads."""

from __future__ import annotations

import copy

import pytest
import torch

from bpo.models.prompts import build_prompt, tokenize_prompt_and_answer
from bpo.train.batch import CHOSEN, PAD, PREFIX, REJECTED, collate_pairs, encode_pair
from bpo.train.logprobs import (
    block_attention_mask,
    chosen_logps,
    image_blocks,
    naive_pair_logps,
    pair_logps,
)


def _batch(processor, pairs, image, with_image=(True, True, False)):
    """The fixture's pairs as one batch; the last one text-only, so vision rows skip a pair."""
    items = [
        encode_pair(pair, processor, image if has else None)
        for pair, has in zip(pairs, with_image, strict=True)
    ]
    return collate_pairs(items, processor.tokenizer.pad_token_id)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_block_mask_by_hand():
    """Row [p p c c r pad]: chosen sees prefix + earlier chosen; rejected sees prefix + itself,
    not the chosen block; padding sees only itself. 0 = allowed, min = blocked."""
    segments = torch.tensor([[PREFIX, PREFIX, CHOSEN, CHOSEN, REJECTED, PAD]])
    allowed = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    mask = block_attention_mask(segments, torch.float32)
    expected = torch.where(torch.tensor(allowed, dtype=torch.bool), 0.0, torch.finfo().min)
    assert mask.shape == (1, 1, 6, 6)
    assert torch.equal(mask[0, 0], expected)


def test_block_mask_with_a_window_and_an_image_block_by_hand():
    """Row [p p p c c r r] with positions [0 1 2 3 4 3 4], a window of 2 and tokens 0-1 one image
    block: a query sees keys whose position is less than 2 behind its own, the block's two
    tokens see each other both ways, and the rejected block's window counts from its restarted
    positions (its second token sees the prefix's last token, as it would after the prefix)."""
    segments = torch.tensor([[PREFIX] * 3 + [CHOSEN] * 2 + [REJECTED] * 2])
    positions = torch.tensor([[0, 1, 2, 3, 4, 3, 4]])
    blocks = image_blocks(torch.tensor([[1, 1, 0, 0, 0, 0, 0]]))
    assert blocks.tolist() == [[0, 0, -1, -1, -1, -1, -1]]
    allowed = [
        [1, 1, 0, 0, 0, 0, 0],  # image token 0 sees token 1 of its block
        [1, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0],  # position 2 - 0 = 2 is outside the window
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 1, 0, 0, 1, 0],  # rejected at position 3: the prefix's last token and itself
        [0, 0, 0, 0, 0, 1, 1],
    ]
    mask = block_attention_mask(segments, torch.float32, positions, window=2, blocks=blocks)
    expected = torch.where(torch.tensor(allowed, dtype=torch.bool), 0.0, torch.finfo().min)
    assert torch.equal(mask[0, 0], expected)


def test_naive_equals_a_hand_rolled_forward(llava, pairs, image):
    """naive_pair_logps for one pair = a plain forward of prompt + answer, log_softmax, gather."""
    model, processor = llava
    pair = pairs[1]
    batch = _batch(processor, [pair], image, with_image=(True,))
    got = naive_pair_logps(model, batch)
    for answer, value, count in (
        (pair.chosen, got.chosen, got.chosen_tokens),
        (pair.rejected, got.rejected, got.rejected_tokens),
    ):
        _, answer_ids = tokenize_prompt_and_answer(processor, pair.prompt, answer)
        prompt = build_prompt(processor, pair.prompt)
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        ids = torch.cat([inputs["input_ids"], torch.tensor([answer_ids])], dim=1)
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0]
        logps = torch.log_softmax(logits, -1)
        start = inputs["input_ids"].shape[1]
        expected = sum(logps[start + j - 1, t] for j, t in enumerate(answer_ids))
        assert count.item() == len(answer_ids)
        assert value.item() == pytest.approx(expected.item(), abs=1e-5)


def test_packed_equals_naive_values_and_gradients(llava, pairs, image):
    """Three pairs (two prompts with an image, one multi-turn, one text-only; answers of 2 to 11
    tokens): the packed rows give the naive log-probs within 1e-5 and the same parameter
    gradients of sum(chosen - rejected) within 1e-4 relative, vision tower and projector included.
    """
    model, processor = llava
    batch = _batch(processor, pairs, image)
    packed = pair_logps(model, batch)
    naive = naive_pair_logps(model, batch)
    torch.testing.assert_close(packed.chosen, naive.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.rejected, naive.rejected, atol=1e-5, rtol=0)
    assert torch.equal(packed.chosen_tokens, naive.chosen_tokens)
    assert torch.equal(packed.rejected_tokens, naive.rejected_tokens)
    assert packed.chosen_tokens.tolist() == batch.tensors["chosen_lengths"].tolist()

    grads_packed = _grads(model, (packed.chosen - packed.rejected).sum())
    grads_naive = _grads(model, (naive.chosen - naive.rejected).sum())
    assert grads_packed.keys() == grads_naive.keys()
    assert any(n.startswith("model.vision_tower") for n in grads_naive)
    assert any(n.startswith("model.multi_modal_projector") for n in grads_naive)
    # Key biases get a zero gradient in exact arithmetic (softmax ignores a shift shared by all
    # keys), so their float noise is measured against a floor of 1e-6 of the total gradient.
    floor = 1e-6 * torch.cat([g.flatten() for g in grads_naive.values()]).norm().item()
    for name, expected in grads_naive.items():
        scale = max(expected.norm().item(), floor)
        error = (grads_packed[name] - expected).norm().item()
        assert error <= 1e-4 * scale, f"{name}: |diff| {error:.3g} vs |grad| {scale:.3g}"


def test_rejected_does_not_see_the_chosen_answer(llava, pairs, image):
    """Changing the chosen answer leaves the rejected log-prob untouched (and changes chosen's)."""
    model, processor = llava
    other = pairs[0].__class__(**{**pairs[0].to_json(), "chosen": "a white ring ."})
    with torch.no_grad():
        first = pair_logps(model, _batch(processor, pairs[:1], image, with_image=(True,)))
        second = pair_logps(model, _batch(processor, [other], image, with_image=(True,)))
    assert first.rejected.item() == pytest.approx(second.rejected.item(), abs=1e-5)
    assert abs(first.chosen.item() - second.chosen.item()) > 1e-2


def test_chosen_logps_equals_the_chosen_half(llava, pairs, image):
    """chosen_logps (SFT) = naive chosen values and counts; rejected fields are zero."""
    model, processor = llava
    batch = _batch(processor, pairs, image)
    with torch.no_grad():
        got = chosen_logps(model, batch)
        naive = naive_pair_logps(model, batch)
    torch.testing.assert_close(got.chosen, naive.chosen, atol=1e-5, rtol=0)
    assert torch.equal(got.chosen_tokens, naive.chosen_tokens)
    assert got.rejected.tolist() == [0.0] * 3
    assert got.rejected_tokens.tolist() == [0] * 3


def test_flash_attention_is_refused(llava, pairs, image):
    """A model that cannot take a 4D mask gets a clear error, not silently wrong log-probs."""
    model, processor = llava
    batch = _batch(processor, pairs[:1], image, with_image=(True,))
    before = model.config._attn_implementation
    model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
            pair_logps(model, batch)
    finally:
        model.config._attn_implementation = before


def test_a_peft_wrapped_model_gives_the_naive_values_and_gradients(llava, pairs, image):
    """LoRA on q/v projections (random, so the adapters matter): packed = naive through peft."""
    peft = pytest.importorskip("peft")
    model, processor = llava
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    batch = _batch(processor, pairs, image)
    packed = pair_logps(wrapped, batch)
    naive = naive_pair_logps(wrapped, batch)
    torch.testing.assert_close(packed.chosen, naive.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.rejected, naive.rejected, atol=1e-5, rtol=0)
    with torch.no_grad():
        plain = naive_pair_logps(model, batch)
    assert (packed.chosen - plain.chosen).abs().max() > 1e-2  # the adapters are in the forward
    grads_packed = _grads(wrapped, (packed.chosen - packed.rejected).sum())
    grads_naive = _grads(wrapped, (naive.chosen - naive.rejected).sum())
    assert grads_naive and all("lora_" in name for name in grads_naive)
    for name, expected in grads_naive.items():
        torch.testing.assert_close(grads_packed[name], expected, rtol=1e-4, atol=1e-6)


def test_bf16_weights_get_a_bf16_mask(llava, pairs, image):
    """A bf16 model (the GPU case) runs the packed path with a mask of its own dtype and lands
    near the fp32 values; sdpa would reject a mask of another dtype."""
    model, processor = llava
    batch = _batch(processor, pairs, image)
    with torch.no_grad():
        reference = naive_pair_logps(model, batch)
        got = pair_logps(copy.deepcopy(model).to(torch.bfloat16), batch)
    assert got.chosen.dtype == torch.float32  # log-softmax in fp32
    torch.testing.assert_close(got.chosen, reference.chosen, atol=0.05, rtol=0)
    torch.testing.assert_close(got.rejected, reference.rejected, atol=0.05, rtol=0)
