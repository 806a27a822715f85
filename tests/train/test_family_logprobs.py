"""Every family's answer log-probs against its own plain forward (the oracle), values and grads.

The oracle is one ordinary forward of prompt + answer as the processor encodes it, with every
output the processor gives (`mm_token_type_ids` for Qwen, `token_type_ids` for Gemma 3, ...):
nothing of bpo's packing, masks or positions. Both the packed rows (`pair_logps`) and the naive
batch of two must equal it; "packed == naive" alone would not catch a naive path that drops an
input the model needs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from bpo.data.records import PreferencePair
from bpo.models import load_model_and_processor
from bpo.models.family import FAMILIES as KNOWN
from bpo.models.prompts import adds_special_tokens, build_full_text, tokenize_prompt_and_answer
from bpo.models.tiny_families import BUILT
from bpo.train.batch import collate_pairs, encode_pair
from bpo.train.logprobs import chosen_logps, naive_pair_logps, pair_logps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Every family with a tiny model that bpo does not refuse (Mllama and PaliGemma are refused).
REFUSED = {family.name for family in KNOWN if family.unsupported}
FAMILIES = [name for name in BUILT if name not in REFUSED]
PROMPTS = [
    [{"role": "user", "content": "<image>\nDescribe the image."}],
    [
        {"role": "user", "content": "<image>\nDescribe the image."},
        {"role": "assistant", "content": "a red circle ."},
        {"role": "user", "content": "How many shapes are there?"},
    ],
    [{"role": "user", "content": "What is in the image?"}],
]
ANSWERS = [
    ("a red circle and a blue square .", "a green triangle ."),
    ("two .", "three shapes ."),
    ("a yellow square .", "a purple circle and a red square and a blue triangle ."),
]
WITH_IMAGE = (True, True, False)  # the last pair is text-only: vision rows skip it


def _images():
    first = Image.new("RGB", (40, 30), (255, 0, 0))
    first.paste((0, 0, 255), (20, 0, 40, 30))
    second = Image.new("RGB", (36, 48), (0, 200, 0))
    second.paste((250, 250, 0), (0, 0, 12, 12))
    return [first, second, None]


def _pairs():
    return [
        PreferencePair(
            id=f"p{i}", image="x.png", prompt=prompt, chosen=c, rejected=r, source="weaken"
        )
        for i, (prompt, (c, r)) in enumerate(zip(PROMPTS, ANSWERS, strict=True))
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tiny_families):
    """(name, model, processor) of one family's tiny model, loaded as every stage loads it."""
    model, processor = load_model_and_processor(
        str(tiny_families(request.param)),
        dtype="float32",
        device="cpu",
        attn_implementation="eager",
    )
    return request.param, model, processor


def _batch(processor):
    items = [
        encode_pair(pair, processor, image) for pair, image in zip(_pairs(), _images(), strict=True)
    ]
    return collate_pairs(items, processor.tokenizer.pad_token_id)


def plain_answer_logp(model, processor, messages, answer, image):
    """Summed log-prob of `answer` after `messages` from one plain forward of prompt + answer."""
    prompt, full = build_full_text(processor, messages, answer, has_image=image is not None)
    _, answer_ids = tokenize_prompt_and_answer(processor, messages, answer, image is not None)
    specials = adds_special_tokens(processor.tokenizer, prompt)
    kwargs = {"images": [image]} if image is not None else {}
    inputs = processor(text=[full], return_tensors="pt", add_special_tokens=specials, **kwargs)
    ids = inputs["input_ids"][0]
    n = len(answer_ids)
    assert ids[-n:].tolist() == answer_ids  # the processor's tokens end with bpo's answer ids
    logits = model(**inputs, use_cache=False).logits[0, -n - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[-n:, None]).sum()


def _plain(model, processor):
    """(chosen, rejected) per pair from the oracle, as (B,) tensors with autograd."""
    chosen, rejected = [], []
    for pair, image in zip(_pairs(), _images(), strict=True):
        chosen.append(plain_answer_logp(model, processor, pair.prompt, pair.chosen, image))
        rejected.append(plain_answer_logp(model, processor, pair.prompt, pair.rejected, image))
    return torch.stack(chosen), torch.stack(rejected)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_and_naive_equal_the_models_own_forward(family):
    name, model, processor = family
    batch = _batch(processor)
    with torch.no_grad():
        chosen, rejected = _plain(model, processor)
        packed = pair_logps(model, batch)
        naive = naive_pair_logps(model, batch)
        sft = chosen_logps(model, batch)
    for got in (packed, naive):
        torch.testing.assert_close(got.chosen, chosen, atol=1e-4, rtol=0, msg=name)
        torch.testing.assert_close(got.rejected, rejected, atol=1e-4, rtol=0, msg=name)
    torch.testing.assert_close(sft.chosen, chosen, atol=1e-4, rtol=0, msg=name)
    assert (chosen - rejected).abs().min() > 1e-3  # distinct answers: a swap would show


def test_packed_gradients_equal_the_models_own_forward(family):
    name, model, processor = family
    model = copy.deepcopy(model)
    batch = _batch(processor)
    packed = pair_logps(model, batch)
    packed_grads = _grads(model, (packed.chosen - packed.rejected).sum())
    chosen, rejected = _plain(model, processor)
    plain_grads = _grads(model, (chosen - rejected).sum())
    assert plain_grads.keys() == packed_grads.keys()
    for param, expected in plain_grads.items():
        scale = expected.norm().item()
        error = (packed_grads[param] - expected).norm().item()
        assert error <= 1e-3 * scale + 1e-7, f"{name} {param}: {error} vs |grad| {scale}"


def test_sliding_windows_shorter_than_the_prefix_stay_exact(tiny_families):
    """Gemma 3 with a window of 8 tokens, far shorter than the image + prompt prefix: each
    sliding layer gets its own windowed mask, and the answers still equal the plain forward,
    which differs from the same weights without a window (so the window is really in play)."""
    model, processor = load_model_and_processor(
        str(tiny_families("gemma3")), dtype="float32", device="cpu", attn_implementation="eager"
    )
    config = copy.deepcopy(model.config)
    config.text_config.sliding_window = 8
    windowed = type(model)(config).eval()
    windowed.load_state_dict(model.state_dict())
    assert "sliding_attention" in config.text_config.layer_types
    batch = _batch(processor)
    with torch.no_grad():
        chosen, rejected = _plain(windowed, processor)
        unwindowed, _ = _plain(model, processor)
        packed = pair_logps(windowed, batch)
    assert (chosen - unwindowed).abs().max() > 1e-3
    torch.testing.assert_close(packed.chosen, chosen, atol=1e-4, rtol=0)
    torch.testing.assert_close(packed.rejected, rejected, atol=1e-4, rtol=0)
