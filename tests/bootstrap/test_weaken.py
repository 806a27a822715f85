"""Image-weakened negatives: every token conditioned on the noised image alone, keyed randomness."""

from __future__ import annotations

import math

import pytest
import torch
from bootstrap_helpers import mixed_requests

from bpo.bootstrap import GenerationRequest
from bpo.bootstrap.weaken import (
    KeyedSampler,
    WeakenConfig,
    noise_pixels,
    nucleus,
    stream_seed,
    weakened_answers,
)
from bpo.models import build_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def requests() -> list[GenerationRequest]:
    return mixed_requests()[:3]


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
    answers = weakened_answers(model, processor, asked, config, batch_size=4, return_logits=True)
    checked_steps = 0
    for i, request in enumerate(asked):
        clean = clean_pixels(processor, request)  # (1, C, H, W)
        for j, answer in enumerate(answers[i]):
            assert answer.logits is not None
            assert answer.logits.shape[0] == len(answer.token_ids) >= 1
            noised = noise_pixels(clean, config, i, j)
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
    model, processor = loaded
    asked = requests()
    config = WeakenConfig(max_new_tokens=8, samples_per_prompt=2, seed=11)
    batched = weakened_answers(model, processor, asked, config, batch_size=3)
    alone = [
        weakened_answers(model, processor, [r], config, batch_size=1, indices=[i])[0]
        for i, r in enumerate(asked)
    ]
    assert [[a.token_ids for a in row] for row in batched] == [
        [a.token_ids for a in row] for row in alone
    ]
    assert [[a.text for a in row] for row in batched] == [[a.text for a in row] for row in alone]
    # Six different samples: a shuffled order or a shared stream could not pass.
    assert len({tuple(a.token_ids) for row in batched for a in row}) == 6


def test_same_seed_same_answers_other_seed_other_noise_and_answers(loaded):
    model, processor = loaded
    asked = requests()
    config = WeakenConfig(max_new_tokens=8, seed=0)
    first = weakened_answers(model, processor, asked, config, batch_size=2)
    again = weakened_answers(model, processor, asked, config, batch_size=2)
    other = weakened_answers(model, processor, asked, WeakenConfig(max_new_tokens=8, seed=1))
    ids = [[a.token_ids for a in row] for row in first]
    assert ids == [[a.token_ids for a in row] for row in again]
    assert ids != [[a.token_ids for a in row] for row in other]
    clean = clean_pixels(processor, asked[0])
    seed0, seed1 = WeakenConfig(seed=0), WeakenConfig(seed=1)
    assert torch.equal(noise_pixels(clean, seed0, 0, 0), noise_pixels(clean, seed0, 0, 0))
    assert not torch.allclose(noise_pixels(clean, seed0, 0, 0), noise_pixels(clean, seed1, 0, 0))
    assert not torch.allclose(noise_pixels(clean, seed0, 0, 0), noise_pixels(clean, seed0, 1, 0))
    assert not torch.allclose(noise_pixels(clean, seed0, 0, 0), noise_pixels(clean, seed0, 0, 1))


def test_noise_pixels_is_the_forward_process_at_the_configured_step(loaded):
    """x_t - sqrt(abar_900) x_0 over the image's 3 * 32 * 32 = 3072 values has std
    sqrt(1 - abar_900) = 0.930695007 (sigmoid, test_noise's hand-worked value) to within
    5 / sqrt(2 * 3072) = 6.4% relative; sqrt(abar_900) = 0.3657961235."""
    _, processor = loaded
    clean = clean_pixels(processor, requests()[2]).double()
    noised = noise_pixels(clean.float(), WeakenConfig(), 0, 0).double()
    residual = noised - 0.3657961235 * clean
    assert abs(float(residual.std()) / 0.930695007 - 1) < 5 / math.sqrt(2 * 3072)


def test_meta_records_what_made_each_sample(loaded):
    model, processor = loaded
    config = WeakenConfig(
        noise_step=500, schedule="linear", temperature=0.7, top_p=0.9, max_new_tokens=4, seed=5
    )
    answers = weakened_answers(model, processor, requests()[:2], config, indices=[40, 41])
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


def test_streams_are_keyed_by_seed_request_sample_and_purpose():
    seeds = {stream_seed(s, i, j, k) for s in (0, 1) for i in (0, 1) for j in (0, 1) for k in "ab"}
    assert len(seeds) == 16
    assert all(0 <= s < 2**63 for s in seeds)
    assert stream_seed(0, 1, 2, "noise") == stream_seed(0, 1, 2, "noise")


def test_bad_requests_and_configs_are_refused_with_the_reason(loaded):
    model, processor = loaded
    no_image = GenerationRequest([{"role": "user", "content": "Describe the image."}], None)
    with pytest.raises(ValueError, match="request 7 has no image"):
        weakened_answers(model, processor, [no_image], indices=[7])
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        weakened_answers(model, processor, requests(), WeakenConfig(top_p=0.0))
    with pytest.raises(ValueError, match=r"noise step must be an integer in \[0, 999\]"):
        weakened_answers(model, processor, requests(), WeakenConfig(noise_step=1000))
