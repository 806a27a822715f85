"""Image-weakened negatives: every token conditioned on the noised image alone, keyed randomness."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from bpo.bootstrap.config import WeakenConfig
from bpo.bootstrap.weaken import noise_pixels, weakened_answers
from bpo.generate import GenerationRequest, TransformersGenerator, stream_seed
from bpo.models import build_prompt
from generation_helpers import mixed_requests

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def requests() -> list[GenerationRequest]:
    return mixed_requests()[:3]


def generator(loaded, batch_size: int) -> TransformersGenerator:
    """The transformers backend over the tiny LLaVA, `batch_size` samples per generate call."""
    return TransformersGenerator(*loaded, batch_size=batch_size)


def full_forward_logits(model, processor, request, pixel_values, generated):
    """Last-position logits (steps, V) of fresh, cache-free, unpadded forward passes over the
    prompt + generated[:s], for s = 0 .. len(generated) - 1, with the given pixel values."""
    prompt = build_prompt(processor, request.messages, has_image=True)
    inputs = processor(text=[prompt], images=[request.image], return_tensors="pt")
    steps = []
    for s in range(len(generated)):
        ids = torch.cat([inputs["input_ids"], torch.tensor([generated[:s]], dtype=torch.long)], 1)
        with torch.no_grad():
            out = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=pixel_values,
                use_cache=False,
            )
        steps.append(out.logits[0, -1])  # (V,)
    return torch.stack(steps)  # (steps, V)


def clean_pixels(processor, request):
    prompt = build_prompt(processor, request.messages, has_image=True)
    return processor(text=[prompt], images=[request.image], return_tensors="pt")["pixel_values"]


def test_every_generated_token_is_conditioned_on_the_noised_image_alone(loaded):
    """The key check against the official code's KV-cache bug (noise on the first token only) and
    its VCD-style mixing of clean and noisy logits.

    Three requests x two samples run in batches of 4 (padded, and mixing requests). For every
    sample and every step s, the raw logits generation produced equal, within 1e-5 (fp32), those
    of a fresh full forward pass over the noised image + prompt + the first s generated tokens.
    The check has power at every step: the same forward with the *clean* image gives logits more
    than 1e-3 away at every step, so any clean-image state at any step would fail the equality.
    """
    model, processor = loaded
    asked = requests()
    config = WeakenConfig(max_new_tokens=8, samples_per_prompt=2, seed=3)
    answers = weakened_answers(generator(loaded, 4), asked, config, return_logits=True)
    checked_steps = 0
    for i, request in enumerate(asked):
        clean = clean_pixels(processor, request)  # (1, C, H, W)
        for j, answer in enumerate(answers[i]):
            assert answer.logits is not None
            assert answer.logits.shape[0] == len(answer.token_ids) >= 1
            noised = noise_pixels(clean, 900, config, i, j)
            expected = full_forward_logits(model, processor, request, noised, answer.token_ids)
            torch.testing.assert_close(answer.logits, expected, atol=1e-5, rtol=0)
            with_clean = full_forward_logits(model, processor, request, clean, answer.token_ids)
            gap = (answer.logits - with_clean).abs().amax(dim=-1)  # (steps,)
            assert bool((gap > 1e-3).all()), gap
            checked_steps += len(answer.token_ids)
    assert checked_steps >= 20


def test_batch_of_three_equals_one_by_one(loaded):
    """Sampled answers (temperature 1) do not depend on the batch: the noise and the sampling of
    sample j of request i are keyed by (seed, i, j), so running request i alone with index i
    gives the tokens it got in a padded batch of 3 mixing requests."""
    asked = requests()
    config = WeakenConfig(max_new_tokens=8, samples_per_prompt=2, seed=11)
    batched = weakened_answers(generator(loaded, 3), asked, config)
    alone = [
        weakened_answers(generator(loaded, 1), [r], config, indices=[i])[0]
        for i, r in enumerate(asked)
    ]
    assert [[a.token_ids for a in row] for row in batched] == [
        [a.token_ids for a in row] for row in alone
    ]
    assert [[a.text for a in row] for row in batched] == [[a.text for a in row] for row in alone]
    # Six different samples: a shuffled order or a shared stream could not pass.
    assert len({tuple(a.token_ids) for row in batched for a in row}) == 6


def test_same_seed_same_answers_other_seed_other_noise_and_answers(loaded):
    _, processor = loaded
    asked = requests()
    config = WeakenConfig(max_new_tokens=8, seed=0)
    first = weakened_answers(generator(loaded, 2), asked, config)
    again = weakened_answers(generator(loaded, 2), asked, config)
    other = weakened_answers(generator(loaded, 8), asked, WeakenConfig(max_new_tokens=8, seed=1))
    ids = [[a.token_ids for a in row] for row in first]
    assert ids == [[a.token_ids for a in row] for row in again]
    assert ids != [[a.token_ids for a in row] for row in other]
    clean = clean_pixels(processor, asked[0])
    seed0, seed1 = WeakenConfig(seed=0), WeakenConfig(seed=1)
    same = noise_pixels(clean, 900, seed0, 0, 0)
    assert torch.equal(same, noise_pixels(clean, 900, seed0, 0, 0))
    assert not torch.allclose(same, noise_pixels(clean, 900, seed1, 0, 0))
    assert not torch.allclose(same, noise_pixels(clean, 900, seed0, 1, 0))
    assert not torch.allclose(same, noise_pixels(clean, 900, seed0, 0, 1))


def test_noise_pixels_is_the_forward_process_at_the_configured_step(loaded):
    """x_t - sqrt(abar_900) x_0 over the image's 3 * 32 * 32 = 3072 values has std
    sqrt(1 - abar_900) = 0.930695007 (sigmoid, test_noise's hand-worked value) to within
    5 / sqrt(2 * 3072) = 6.4% relative; sqrt(abar_900) = 0.3657961235."""
    _, processor = loaded
    clean = clean_pixels(processor, requests()[2]).double()
    noised = noise_pixels(clean.float(), 900, WeakenConfig(), 0, 0).double()
    residual = noised - 0.3657961235 * clean
    assert abs(float(residual.std()) / 0.930695007 - 1) < 5 / math.sqrt(2 * 3072)


def test_meta_records_what_made_each_sample(loaded):
    config = WeakenConfig(
        noise_steps=[500], schedule="linear", temperature=0.7, top_p=0.9, max_new_tokens=4, seed=5
    )
    answers = weakened_answers(generator(loaded, 8), requests()[:2], config, indices=[40, 41])
    assert answers[1][0].meta == {
        "noise_step": 500,
        "schedule": "linear",
        "temperature": 0.7,
        "top_p": 0.9,
        "max_new_tokens": 4,
        "seed": 5,
        "request_index": 41,
        "sample_index": 0,
    }
    assert answers[1][0].logits is None
    assert 1 <= len(answers[1][0].token_ids) <= 4


def test_several_noise_steps_make_their_own_samples(loaded):
    """noise_steps [300, 900] x samples_per_prompt 2: sample indices 0, 1 at step 300 and 2, 3
    at step 900, each keyed by its own sample index. Greedy (temperature 0), each sample's
    logits equal a full forward pass on `noise_pixels` at its own step and index, so neither
    the step nor the key of another sample was used; the four noise streams are distinct, and
    the samples at step 300 are those of noise_steps [300] alone (a step added later does not
    move the earlier ones)."""
    model, processor = loaded
    asked = requests()[:2]
    config = WeakenConfig(
        noise_steps=[300, 900], samples_per_prompt=2, temperature=0.0, max_new_tokens=4, seed=2
    )
    answers = weakened_answers(
        generator(loaded, 3), asked, config, indices=[20, 21], return_logits=True
    )
    for i, (request, row) in enumerate(zip(asked, answers, strict=True)):
        assert [a.meta["sample_index"] for a in row] == [0, 1, 2, 3]
        assert [a.meta["noise_step"] for a in row] == [300, 300, 900, 900]
        assert {a.meta["request_index"] for a in row} == {20 + i}
        clean = clean_pixels(processor, request)
        noised = [
            noise_pixels(clean, a.meta["noise_step"], config, 20 + i, k) for k, a in enumerate(row)
        ]
        for a, pixels in zip(row, noised, strict=True):
            expected = full_forward_logits(model, processor, request, pixels, a.token_ids)
            torch.testing.assert_close(a.logits, expected, atol=1e-5, rtol=0)
        for k in range(4):
            for other in range(k):
                assert not torch.allclose(noised[k], noised[other])
    keys = {stream_seed(2, i, k, "noise") for i in (20, 21) for k in range(4)}
    assert len(keys) == 8
    alone = weakened_answers(
        generator(loaded, 3), asked, replace(config, noise_steps=[300]), indices=[20, 21]
    )
    assert [[a.token_ids for a in row] for row in alone] == [
        [a.token_ids for a in row[:2]] for row in answers
    ]


def test_bad_requests_and_configs_are_refused_with_the_reason(loaded):
    no_image = GenerationRequest([{"role": "user", "content": "Describe the image."}], None)
    with pytest.raises(ValueError, match="request 7 has no image"):
        weakened_answers(generator(loaded, 8), [no_image], indices=[7])
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        weakened_answers(generator(loaded, 8), requests(), WeakenConfig(top_p=0.0))
    with pytest.raises(ValueError, match=r"noise step must be an integer in \[0, 999\]"):
        weakened_answers(generator(loaded, 8), requests(), WeakenConfig(noise_steps=[1000]))
    with pytest.raises(ValueError, match="2 indices for 3 requests"):
        weakened_answers(generator(loaded, 8), requests(), indices=[0, 1])
