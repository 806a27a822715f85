"""A second model family through the Auto classes: a tiny Idefics3 (SmolVLM's architecture).

Each stage that touches the model or its processor runs on it and is checked against a value
worked out independently: identical logits after a reload, exact prompt strings, batched
generation against a greedy loop, weakened answers against a greedy loop on the noised pixels,
and the prefix-shared log-probs and gradients against the naive batch of two.
"""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from transformers import Idefics3ForConditionalGeneration, Idefics3Processor

from bpo.bootstrap.config import WeakenConfig
from bpo.bootstrap.weaken import noise_pixels, weakened_answers
from bpo.data.records import PreferencePair
from bpo.generate import Decoding, TransformersGenerator
from bpo.models import (
    build_full_text,
    build_prompt,
    count_image_tokens,
    load_model_and_processor,
    tokenize_prompt_and_answer,
)
from bpo.models.tiny_families import (
    IDEFICS3_CHAT_TEMPLATE,
    TinyIdefics3Config,
    build_tiny_idefics3,
    save_tiny_idefics3,
)
from bpo.train.batch import CHOSEN, REJECTED, EncodedPair, collate_pairs, encode_pair
from bpo.train.logprobs import naive_pair_logps, pair_logps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ONE_TURN = [{"role": "user", "content": "<image>\nDescribe the image."}]
TWO_TURNS = [
    {"role": "user", "content": "<image>\nDescribe the image."},
    {"role": "assistant", "content": "a red circle and a blue square ."},
    {"role": "user", "content": "How many shapes are there?"},
]
WITH_SYSTEM = [{"role": "system", "content": "A chat about shapes."}, *ONE_TURN]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def built(texts, tmp_path_factory):
    """(model, processor, saved folder, config) of the default tiny Idefics3."""
    config = TinyIdefics3Config()
    model, processor = build_tiny_idefics3(texts, config, seed=0)
    folder = save_tiny_idefics3(model, processor, tmp_path_factory.mktemp("idefics3"), config)
    return model, processor, folder, config


def load(folder, attn_implementation="eager"):
    return load_model_and_processor(
        str(folder), dtype="float32", device="cpu", attn_implementation=attn_implementation
    )


@pytest.fixture(scope="module")
def loaded(built):
    """The saved tiny Idefics3 loaded the way every stage loads a model."""
    return load(built[2])


@pytest.fixture(scope="module")
def images():
    """Two different images of different sizes (the processor resizes both to one square)."""
    first = Image.new("RGB", (40, 30), (255, 0, 0))
    first.paste((0, 0, 255), (20, 0, 40, 30))
    second = Image.new("RGB", (24, 36), (0, 200, 0))
    second.paste((250, 250, 0), (0, 0, 12, 12))
    return first, second


def test_round_trip_through_the_auto_classes(built, loaded, images):
    model, processor, _, config = built
    loaded_model, loaded_processor = loaded
    assert isinstance(loaded_model, Idefics3ForConditionalGeneration)
    assert isinstance(loaded_processor, Idefics3Processor)
    assert loaded_model.config._attn_implementation == "eager"
    assert loaded_processor.tokenizer.padding_side == "left"
    assert loaded_processor.chat_template == IDEFICS3_CHAT_TEMPLATE
    prompt = build_prompt(processor, TWO_TURNS)
    assert build_prompt(loaded_processor, TWO_TURNS) == prompt
    inputs = processor(images=images[0], text=prompt, return_tensors="pt")
    loaded_inputs = loaded_processor(images=images[0], text=prompt, return_tensors="pt")
    assert sorted(inputs) == ["attention_mask", "input_ids", "pixel_attention_mask", "pixel_values"]
    for name in inputs:
        assert torch.equal(inputs[name], loaded_inputs[name]), name
    # One image per row, never split: (B, images, C, H, W).
    assert inputs["pixel_values"].shape == (1, 1, 3, config.image_size, config.image_size)
    with torch.no_grad():
        expected = model(**inputs).logits
        actual = loaded_model(**loaded_inputs).logits
    assert expected.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.equal(actual, expected)


def test_image_tokens_match_vision_features(loaded, images):
    model, processor = loaded
    expected = TinyIdefics3Config().num_image_tokens
    assert expected == 4  # 4x4 patches, pixel-shuffled by 2
    inputs = processor(
        images=images[1], text=build_prompt(processor, ONE_TURN), return_tensors="pt"
    )
    with torch.no_grad():
        features = model.get_image_features(
            inputs["pixel_values"], inputs["pixel_attention_mask"]
        ).pooler_output
    n_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_tokens == features[0].shape[0] == expected
    assert count_image_tokens(processor) == count_image_tokens(processor, images[1]) == expected


def test_prompts_render_smolvlm_format(loaded):
    processor = loaded[1]
    assert build_prompt(processor, ONE_TURN) == (
        "<|im_start|>User:<image>Describe the image.<end_of_utterance>\nAssistant:"
    )
    assert build_prompt(processor, TWO_TURNS) == (
        "<|im_start|>User:<image>Describe the image.<end_of_utterance>\n"
        "Assistant: a red circle and a blue square .<end_of_utterance>\n"
        "User: How many shapes are there?<end_of_utterance>\nAssistant:"
    )
    assert build_prompt(processor, WITH_SYSTEM) == (
        "<|im_start|>System: A chat about shapes.<end_of_utterance>\n"
        "User:<image>Describe the image.<end_of_utterance>\nAssistant:"
    )
    assert build_prompt(processor, ONE_TURN, has_image=False) == (
        "<|im_start|>User: Describe the image.<end_of_utterance>\nAssistant:"
    )


def test_answers_end_with_end_of_utterance(loaded, texts):
    processor = loaded[1]
    tokenizer = processor.tokenizer
    prompt, full = build_full_text(processor, TWO_TURNS, "two .")
    # The template closes the turn itself, so no second end token is appended.
    assert full == prompt + " two .<end_of_utterance>"
    prompt_ids, answer_ids = tokenize_prompt_and_answer(processor, ONE_TURN, "a red circle .")
    # The template writes the BOS, so the tokenizer adds none.
    assert tokenizer.convert_ids_to_tokens(prompt_ids) == [
        "<|im_start|>",
        "User",
        ":",
        "<image>",
        "Describe",
        "Ġthe",
        "Ġimage",
        ".",
        "<end_of_utterance>",
        "Ċ",
        "Assistant",
        ":",
    ]
    assert tokenizer.convert_ids_to_tokens(answer_ids) == [
        "Ġa",
        "Ġred",
        "Ġcircle",
        "Ġ.",
        "<end_of_utterance>",
    ]
    assert answer_ids[-1] == tokenizer.eos_token_id == loaded[0].generation_config.eos_token_id
    for messages in (ONE_TURN, TWO_TURNS, WITH_SYSTEM):
        for answer in [*texts, "  two", "red.", "\nyes"]:
            prompt, full = build_full_text(processor, messages, answer)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            assert tokenize_prompt_and_answer(processor, messages, answer) == (
                prompt_ids,
                full_ids[len(prompt_ids) :],
            ), answer


def test_processor_wraps_the_image_tokens(loaded, images):
    """Unlike LLaVA's, this processor writes more than image tokens in place of `<image>`: the
    run is `<fake_token_around_image><global-img><image>*4<fake_token_around_image>`."""
    processor = loaded[1]
    tokenizer = processor.tokenizer
    prompt_ids, _ = tokenize_prompt_and_answer(processor, TWO_TURNS, "two .")
    prompt = build_prompt(processor, TWO_TURNS)
    expanded = processor(images=images[0], text=prompt)["input_ids"][0]
    at = prompt_ids.index(processor.image_token_id)
    wrapper = tokenizer.convert_tokens_to_ids(
        ["<fake_token_around_image>", "<global-img>", *["<image>"] * 4, "<fake_token_around_image>"]
    )
    assert expanded == prompt_ids[:at] + wrapper + prompt_ids[at + 1 :]


def greedy_loop(model, inputs, eos_id, steps=NEW_TOKENS):
    """Greedy decoding by hand: a full forward pass per step, no cache, stop after eos."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    vision = {k: inputs[k] for k in ("pixel_values", "pixel_attention_mask")}
    new = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, **vision, use_cache=False).logits
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token == eos_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    return new


def requests(images):
    return [
        {"messages": ONE_TURN, "image": images[0]},
        {"messages": TWO_TURNS, "image": images[1]},
        {"messages": WITH_SYSTEM, "image": images[1]},
    ]


def test_batched_generation_equals_a_greedy_loop(loaded, images):
    model, processor = loaded
    tokenizer = processor.tokenizer
    batch = requests(images)
    generated = TransformersGenerator(model, processor, 3).generate(batch, Decoding(NEW_TOKENS))
    answers = [g.text for g in generated]
    for request, answer, generation in zip(batch, answers, generated, strict=True):
        prompt = build_prompt(processor, request["messages"])
        inputs = processor(images=request["image"], text=prompt, return_tensors="pt")
        tokens = greedy_loop(model, inputs, tokenizer.eos_token_id)
        assert answer == tokenizer.decode(tokens, skip_special_tokens=True).strip()
        assert generation.token_ids == tokens
    assert len(set(answers)) > 1  # the rows are not one answer repeated


def test_weakened_answers_equal_a_greedy_loop_on_the_noised_pixels(loaded, images):
    model, processor = loaded
    config = WeakenConfig(noise_steps=[500], temperature=0.0, max_new_tokens=NEW_TOKENS, seed=3)
    batch = requests(images)
    generator = TransformersGenerator(model, processor, 3)
    answers = weakened_answers(generator, batch, config, indices=[7, 8, 9])
    for request, key, (answer,) in zip(batch, [7, 8, 9], answers, strict=True):
        prompt = build_prompt(processor, request["messages"])
        inputs = processor(images=request["image"], text=prompt, return_tensors="pt")
        clean = inputs["pixel_values"]
        inputs["pixel_values"] = noise_pixels(clean, 500, config, key, 0)  # (1, 1, C, H, W)
        assert not torch.allclose(inputs["pixel_values"], clean)
        assert answer.token_ids == greedy_loop(model, inputs, processor.tokenizer.eos_token_id)
        assert answer.meta["request_index"] == key


def split_processor(processor):
    """The processor with SmolVLM's image splitting on: 32 px crops of an image resized to 64 px,
    plus the whole image; a wide image gives fewer crops, so rows pad with all-zero images."""
    other = copy.deepcopy(processor)
    other.image_processor.do_image_splitting = True
    other.image_processor.size = {"longest_edge": 64}
    return other


def test_weakened_answers_with_split_images_do_not_depend_on_the_batch(loaded):
    model, processor = loaded
    processor = split_processor(processor)
    batch = [
        {"messages": ONE_TURN, "image": Image.new("RGB", (40, 30), (255, 0, 0))},
        {"messages": ONE_TURN, "image": Image.new("RGB", (64, 16), (0, 255, 0))},
    ]
    prompts = [build_prompt(processor, ONE_TURN)] * 2
    pixels = processor(
        images=[r["image"] for r in batch], text=prompts, padding=True, return_tensors="pt"
    )
    real = pixels["pixel_values"].flatten(2).ne(0).any(-1)  # (B, images): not padding
    assert real.sum(1).tolist() == [5, 3]  # 4 crops + whole; 2 crops + whole and 2 padding
    config = WeakenConfig(max_new_tokens=4)
    alone = weakened_answers(TransformersGenerator(model, processor, 1), batch, config)
    together = weakened_answers(TransformersGenerator(model, processor, 2), batch, config)
    assert [a[0].token_ids for a in together] == [a[0].token_ids for a in alone]


# --- prefix-shared training log-probs --------------------------------------------------------


def pairs():
    return [
        PreferencePair(
            id="p0",
            image="0.png",
            prompt=ONE_TURN,
            chosen="a red circle and a blue square .",
            rejected="a red circle .",
            source="weaken",
        ),
        PreferencePair(
            id="p1",
            image="1.png",
            prompt=TWO_TURNS,
            chosen="two .",
            rejected="a green triangle and a yellow circle and a purple square .",
            source="inject",
        ),
    ]


def encode_by_hand(pair, processor, image):
    """What `encode_pair` must give: the processor's prompt ids (image run expanded) and the
    answers as `tokenize_prompt_and_answer` cuts them."""
    _, chosen = tokenize_prompt_and_answer(processor, pair.prompt, pair.chosen)
    _, rejected = tokenize_prompt_and_answer(processor, pair.prompt, pair.rejected)
    out = processor(
        images=[image], text=[build_prompt(processor, pair.prompt)], return_tensors="pt"
    )
    vision = {k: out[k] for k in ("pixel_values", "pixel_attention_mask")}
    return EncodedPair(pair.key, out["input_ids"][0].tolist(), chosen, rejected, vision)


def test_encode_pair_accepts_the_image_wrapper(loaded, images):
    processor = loaded[1]
    for pair, image in zip(pairs(), images, strict=True):
        expected = encode_by_hand(pair, processor, image)
        got = encode_pair(pair, processor, image)
        assert (got.prompt_ids, got.chosen_ids, got.rejected_ids) == (
            expected.prompt_ids,
            expected.chosen_ids,
            expected.rejected_ids,
        )
        assert got.vision.keys() == expected.vision.keys()


def pair_batch(processor, images):
    encoded = [encode_pair(p, processor, im) for p, im in zip(pairs(), images, strict=True)]
    assert len({len(e.prompt_ids) for e in encoded}) == 2  # prefixes of different lengths
    return collate_pairs(encoded, processor.tokenizer.pad_token_id)


def grads(model, logps):
    model.zero_grad()
    # Distinct weights, so that a chosen/rejected mix-up would show in the gradients.
    (logps.chosen.sum() - 0.7 * logps.rejected.sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_prefix_shared_logps_and_gradients_equal_the_naive_pass(built, images, attn_implementation):
    model, processor = load(built[2], attn_implementation)
    batch = pair_batch(processor, images)
    shared = pair_logps(model, batch)
    naive = naive_pair_logps(model, batch)
    for field in ("chosen_tokens", "rejected_tokens"):
        assert torch.equal(getattr(shared, field), getattr(naive, field))
    for k, pair in enumerate(pairs()):
        chosen = tokenize_prompt_and_answer(processor, pair.prompt, pair.chosen)[1]
        rejected = tokenize_prompt_and_answer(processor, pair.prompt, pair.rejected)[1]
        assert shared.chosen_tokens[k] == len(chosen) and shared.rejected_tokens[k] == len(rejected)
    torch.testing.assert_close(shared.chosen, naive.chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared.rejected, naive.rejected, rtol=0, atol=1e-5)

    expected = grads(model, naive_pair_logps(model, batch))
    actual = grads(model, pair_logps(model, batch))
    assert actual.keys() == expected.keys()
    # Every part of the model is in the graph: vision tower, connector, text model, head.
    assert any(n.startswith("model.vision_model.") for n in expected)
    assert any(n.startswith("model.connector.") for n in expected)
    assert "lm_head.weight" in expected and "model.text_model.norm.weight" in expected
    for name, grad in expected.items():
        error = (actual[name] - grad).norm()
        assert error <= 1e-4 * grad.norm() + 1e-8, name


def test_the_model_honours_the_block_mask_and_restarted_positions(loaded, images):
    """The controls: the text model reads the 4D mask and the position ids it is given, so the
    equality above is evidence. Either change moves the rejected answers' log-probs."""
    model, processor = loaded
    batch = pair_batch(processor, images)
    with torch.no_grad():
        reference = pair_logps(model, batch).rejected

        seen = copy.deepcopy(batch)
        # Rejected tokens marked as chosen: the mask lets them see the chosen block.
        seen.tensors["segments"] = seen.tensors["segments"].clamp(max=CHOSEN)
        assert not torch.allclose(pair_logps(model, seen).rejected, reference, atol=1e-3)

        shifted = copy.deepcopy(batch)
        t = shifted.tensors
        # The rejected block continues after the chosen one instead of restarting.
        t["position_ids"] = (
            t["position_ids"] + (t["segments"] == REJECTED) * t["chosen_lengths"][:, None]
        )
        assert not torch.allclose(pair_logps(model, shifted).rejected, reference, atol=1e-3)


def test_prefix_sharing_with_split_images_of_different_crop_counts(loaded):
    model, processor = loaded
    processor = split_processor(processor)
    split_images = [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (64, 16), (0, 9, 0))]
    encoded = [encode_pair(p, processor, im) for p, im in zip(pairs(), split_images, strict=True)]
    assert [e.vision["pixel_values"].shape[1] for e in encoded] == [5, 3]
    batch = collate_pairs(encoded, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        shared = pair_logps(model, batch)
        torch.testing.assert_close(
            shared.chosen, naive_pair_logps(model, batch).chosen, rtol=0, atol=1e-5
        )
        for k, item in enumerate(encoded):
            alone = pair_logps(model, collate_pairs([item], processor.tokenizer.pad_token_id))
            torch.testing.assert_close(shared.rejected[k], alone.rejected[0], rtol=0, atol=1e-5)
