"""The transformers backend: batching, padding and sampling never change an answer."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bpo.generate import (
    Decoding,
    GenerateConfig,
    GenerationRequest,
    TransformersGenerator,
    load_generator,
    stream_seed,
)
from bpo.generate.config import check_generate_config
from bpo.models import build_prompt
from bpo.models.load import ModelConfig
from generation_helpers import mixed_requests

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = Decoding(max_new_tokens=6)


def requests() -> list[GenerationRequest]:
    return mixed_requests()


def seeded(asked: list[GenerationRequest], seed: int) -> list[GenerationRequest]:
    """The requests with their own sampling seeds, keyed by position."""
    return [replace(r, seed=stream_seed(seed, k, 0, "sample")) for k, r in enumerate(asked)]


def answers(model, processor, asked, decoding=GREEDY, batch_size=1) -> list[tuple[str, list]]:
    generated = TransformersGenerator(model, processor, batch_size).generate(asked, decoding)
    return [(g.text, g.token_ids) for g in generated]


def test_batched_answers_equal_one_by_one_answers_in_input_order(loaded):
    """Batches of 3 mix prompt lengths (so left padding happens) and are formed in length order,
    not input order: equal answers at equal positions show both the padding and the reordering
    are undone. The answers differ from each other, so a shuffled order could not pass."""
    model, processor = loaded
    asked = requests()
    alone = [answers(model, processor, [r])[0] for r in asked]
    batched = answers(model, processor, asked, batch_size=3)
    assert batched == alone
    assert len({text for text, _ in alone}) >= 3, alone


def test_config_front_end_and_dict_requests(loaded, tiny_llava_folder):
    """`load_generator` + `GenerateConfig.decoding()` (what a stage's `generation:` section
    gives) on dict requests answers what the generator answers one request at a time."""
    model, processor = loaded
    asked = requests()[:2]
    as_dicts = [{"messages": r.messages, "image": r.image} for r in asked]
    config = GenerateConfig(batch_size=2, max_new_tokens=6)
    generator = load_generator(
        ModelConfig(str(tiny_llava_folder)),
        config.backend,
        config.batch_size,
        loaded=loaded,
    )
    assert isinstance(generator, TransformersGenerator) and generator.batch_size == 2
    assert config.decoding() == GREEDY
    got = [(g.text, g.token_ids) for g in generator.generate(as_dicts, config.decoding())]
    assert got == answers(model, processor, asked, batch_size=1)


def test_sampling_is_reproducible_with_a_seed(loaded):
    """Temperature 1.5, each request with its own seed: the same seeds give the same answers;
    so do other batch sizes (each row draws from its own generator), while other seeds give
    other answers."""
    model, processor = loaded
    sampled = Decoding(max_new_tokens=6, temperature=1.5)
    asked = seeded(requests(), 7)
    first = answers(model, processor, asked, sampled, batch_size=2)
    assert answers(model, processor, asked, sampled, batch_size=2) == first
    assert answers(model, processor, asked, sampled, batch_size=5) == first
    assert [answers(model, processor, [r], sampled)[0] for r in asked] == first
    assert answers(model, processor, seeded(requests(), 8), sampled, batch_size=2) != first


def test_sampling_needs_a_seed_on_every_request(loaded):
    model, processor = loaded
    asked = seeded(requests(), 7)
    asked[3] = replace(asked[3], seed=None)
    with pytest.raises(ValueError, match="request 3 has no seed"):
        TransformersGenerator(model, processor).generate(asked, Decoding(temperature=1.0))


def test_a_tokenizer_that_pads_on_the_right_gives_the_same_answers(loaded):
    """The layer pads on the left itself, whatever the tokenizer is set to.

    The tokenizer really pads on the right here (the processor's own batch ends a short row in
    padding), yet batches of 3 answer what each request gets alone with a left-padding
    tokenizer, and the tokenizer's setting is left as it was."""
    model, processor = loaded
    asked = requests()
    alone = [answers(model, processor, [r])[0] for r in asked]
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    try:
        prompts = [build_prompt(processor, r.messages) for r in asked[:2]]
        plain = processor(text=prompts, images=[r.image for r in asked[:2]], padding=True)
        assert [row[-1] for row in plain["attention_mask"]].count(0) == 1  # right padding
        assert answers(model, processor, asked, batch_size=3) == alone
        assert tokenizer.padding_side == "right"
    finally:
        tokenizer.padding_side = "left"


def test_logits_token_ids_and_progress(loaded):
    """Greedy: every generated token is the argmax of the logits returned for its step, the
    answer stops at the first end of sequence (or at max_new_tokens), its text is its ids
    decoded, and progress reports each batch's rows (batches of 3 over 4 image rows and 1
    text-only row: 3, 1, 1)."""
    model, processor = loaded
    generator = TransformersGenerator(model, processor, batch_size=3)
    seen: list[int] = []
    generated = generator.generate(requests(), GREEDY, progress=seen.append, return_logits=True)
    assert sorted(seen) == [1, 1, 3]
    eos = generator.eos
    for g in generated:
        assert g.logits is not None and g.logits.shape == (
            len(g.token_ids),
            len(processor.tokenizer),
        )
        assert g.logits.argmax(-1).tolist() == g.token_ids
        assert len(g.token_ids) == GREEDY.max_new_tokens or g.token_ids[-1] in eos
        assert not eos & set(g.token_ids[:-1])
        text = processor.tokenizer.decode(g.token_ids, skip_special_tokens=True).strip()
        assert g.text == text
    assert all(g.logits is None for g in generator.generate(requests()[:1], GREEDY))


def test_a_pixels_transform_changes_only_its_own_row(loaded):
    """A request's `pixels` transform acts on its own row of the batch: zeroed pixels change
    that answer's logits, while the other row of the same batch answers as without it."""
    model, processor = loaded
    asked = requests()[:2]
    generator = TransformersGenerator(model, processor, batch_size=2)
    plain = generator.generate(asked, GREEDY, return_logits=True)
    zeroed = [replace(asked[0], pixels=torch.zeros_like), asked[1]]
    changed = generator.generate(zeroed, GREEDY, return_logits=True)
    assert (changed[0].logits[0] - plain[0].logits[0]).abs().max() > 1e-3
    torch.testing.assert_close(changed[1].logits, plain[1].logits, rtol=0, atol=1e-5)


def test_bad_requests_and_settings_are_refused_with_the_reason(loaded):
    model, processor = loaded
    generator = TransformersGenerator(model, processor)
    embeds = GenerationRequest(requests()[0].messages, image_embeds=torch.zeros(1, 16, 64))
    with pytest.raises(ValueError, match="image_embeds are for the vLLM backend"):
        generator.generate([embeds], GREEDY)
    with pytest.raises(ValueError, match="exactly one of messages= and prompt="):
        GenerationRequest()
    with pytest.raises(ValueError, match="exactly one of messages= and prompt="):
        GenerationRequest(requests()[0].messages, prompt="USER: hi ASSISTANT:")
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        generator.generate(requests(), Decoding(max_new_tokens=0))
    with pytest.raises(ValueError, match=r"temperature must be >= 0"):
        generator.generate(requests(), Decoding(temperature=-0.5))
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generator.generate(requests(), Decoding(top_p=0.0))
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        TransformersGenerator(model, processor, batch_size=0)
    assert generator.generate([], GREEDY) == []


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown generation backend 'tgi'"):
        load_generator(ModelConfig("missing"), "tgi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown generation backend 'tgi'"):
        check_generate_config(GenerateConfig(backend="tgi"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"generation\.batch_size must be at least 1"):
        check_generate_config(GenerateConfig(batch_size=0))


def test_decoding_of_a_generation_section():
    """Greedy unless do_sample; max_new_tokens overridable per call (one-word benchmarks)."""
    config = GenerateConfig(max_new_tokens=64, temperature=0.7, top_p=0.9, extra={"a": 1})
    assert config.decoding() == Decoding(64, 0.0, 1.0, {"a": 1})
    assert config.decoding(max_new_tokens=8) == Decoding(8, 0.0, 1.0, {"a": 1})
    sampled = replace(config, do_sample=True)
    assert sampled.decoding() == Decoding(64, 0.7, 0.9, {"a": 1})
