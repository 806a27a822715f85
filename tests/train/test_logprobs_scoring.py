"""The reference pass's forward (`scoring_mode`): training's forward's values exactly and the
plain forward's within tolerance, no autograd state, the model's mode restored, nothing left
behind that a backward could not use, and only answer positions through the LM head."""

from __future__ import annotations

import pytest
import torch

from bpo.models import load_model_and_processor
from bpo.train.batch import collate_pairs, encode_pair, pad_token_id
from bpo.train.logprobs import naive_pair_logps, pair_logps, scoring_mode


@pytest.fixture(scope="module")
def eager(tiny_llava_folder, one_torch_thread):
    """(model, processor) of the tiny LLaVA, fp32 on CPU, eager attention (training's CPU choice)."""
    return load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu", attn_implementation="eager"
    )


@pytest.fixture(scope="module")
def batch(eager, pairs, image):
    processor = eager[1]
    items = [encode_pair(p, processor, image) for p in pairs]
    return collate_pairs(items, pad_token_id(processor))


def test_values_equal_the_training_forward_and_the_plain_forward(eager, batch):
    """The pass's numbers are the training forward's (the same kernels: 0 difference), and the
    naive batch of two's (each answer its own row) within the packed path's tolerance; the
    model comes back in training mode, its attention untouched."""
    model = eager[0]
    model.eval()
    with torch.no_grad():
        naive = naive_pair_logps(model, batch)
    model.train()
    training = pair_logps(model, batch)  # as a step computes it, with autograd
    with scoring_mode(model):
        inside = model.training
        got = pair_logps(model, batch)
    assert (inside, model.training, model.config._attn_implementation) == (False, True, "eager")
    assert got.chosen.is_inference() and not got.chosen.requires_grad
    assert training.chosen.requires_grad
    torch.testing.assert_close(got.chosen, training.chosen.detach(), atol=0, rtol=0)
    torch.testing.assert_close(got.rejected, training.rejected.detach(), atol=0, rtol=0)
    torch.testing.assert_close(got.chosen, naive.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.rejected, naive.rejected, atol=1e-5, rtol=0)
    assert got.chosen_tokens.tolist() == naive.chosen_tokens.tolist()
    model.eval()


def test_a_tensor_a_module_caches_during_the_pass_can_be_saved_for_backward(eager, batch):
    """A module that keeps a tensor from its forward (a buffer and a plain attribute, as rotary
    caches and rope deltas do) would keep an inference tensor, which no backward may save; the
    pass hands back ordinary copies with the same values."""
    model = eager[0]
    projector = model.model.multi_modal_projector

    def cache(module, _inputs, output):
        module.register_buffer("seen", output.detach()[:1, :2].clone(), persistent=False)
        module.last = output.detach()[:1, :2].clone()

    handle = projector.register_forward_hook(cache)
    try:
        with scoring_mode(model):
            pair_logps(model, batch)
            raw = projector.last
    finally:
        handle.remove()
    weight = torch.ones(1, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensor"):
        (raw * weight).sum().backward()  # what the pass would leave without the copies
    for cached in (projector.seen, projector.last):
        assert not cached.is_inference()
        torch.testing.assert_close(cached, raw, rtol=0, atol=0)
        (cached * weight).sum().backward()
    del projector.seen, projector.last


def test_only_answer_positions_reach_the_lm_head(eager, batch):
    """The head sees (B, K, hidden) with K the most answer tokens of a pair (chosen + rejected),
    not the (B, L) packed rows."""
    model = eager[0]
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda _m, args, _o: shapes.append(args[0].shape))
    try:
        with scoring_mode(model):
            pair_logps(model, batch)
    finally:
        handle.remove()
    t = batch.tensors
    answers = int((t["chosen_lengths"] + t["rejected_lengths"]).max())
    hidden = model.config.text_config.hidden_size
    assert answers < t["input_ids"].shape[1]
    assert shapes == [torch.Size([len(batch), answers, hidden])]
