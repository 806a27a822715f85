"""Batched greedy generation with left padding gives each prompt what it gets alone."""

from __future__ import annotations

import torch

from bpo.generate import Decoding, TransformersGenerator
from bpo.models import build_prompt, load_model_and_processor

NEW_TOKENS = 8


def generate(model, processor, images, prompts):
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            # No early eos, so every row yields exactly NEW_TOKENS to compare.
            min_new_tokens=NEW_TOKENS,
        )
    return inputs, out[:, inputs["input_ids"].shape[1] :]


def test_left_padded_batch_matches_single_prompts(tiny, image):
    model, processor = load_model_and_processor(
        str(tiny[2]), dtype="float32", device="cpu", attn_implementation="eager"
    )
    prompts = [
        build_prompt(processor, [{"role": "user", "content": "<image>\nDescribe the image."}]),
        build_prompt(
            processor,
            [
                {"role": "user", "content": "<image>\nDescribe the image."},
                {"role": "assistant", "content": "a red circle and a blue square ."},
                {"role": "user", "content": "How many shapes are there?"},
            ],
        ),
    ]
    inputs, batched = generate(model, processor, [image, image], prompts)
    mask = inputs["attention_mask"]
    assert mask[0, 0] == 0 and mask[1].all()  # the short prompt really is padded, on the left
    for row, prompt in enumerate(prompts):
        _, alone = generate(model, processor, [image], [prompt])
        assert batched[row].tolist() == alone[0].tolist()

    # The control: padded on the right, the short prompt's continuation follows pad tokens and
    # comes out different, so the equality above is evidence, not a coincidence.
    processor.tokenizer.padding_side = "right"
    _, right_padded = generate(model, processor, [image, image], prompts)
    _, alone = generate(model, processor, [image], prompts[:1])
    assert right_padded[0].tolist() != alone[0].tolist()


def test_the_generation_layer_pads_on_the_left_whatever_the_tokenizer_says(tiny, image):
    """`TransformersGenerator` given a processor set to pad on the right still answers each
    prompt with what it gets alone: it pads on the left itself."""
    model, processor = load_model_and_processor(
        str(tiny[2]), dtype="float32", device="cpu", attn_implementation="eager"
    )
    requests = [
        {"messages": [{"role": "user", "content": "<image>\nDescribe the image."}], "image": image},
        {
            "messages": [
                {"role": "user", "content": "<image>\nDescribe the image."},
                {"role": "assistant", "content": "a red circle and a blue square ."},
                {"role": "user", "content": "How many shapes are there?"},
            ],
            "image": image,
        },
    ]
    prompts = [build_prompt(processor, r["messages"]) for r in requests]
    alone = [generate(model, processor, [image], [p])[1][0].tolist() for p in prompts]
    processor.tokenizer.padding_side = "right"
    decoding = Decoding(NEW_TOKENS, extra={"min_new_tokens": NEW_TOKENS})
    batched = TransformersGenerator(model, processor, batch_size=2).generate(requests, decoding)
    assert [g.token_ids for g in batched] == alone
