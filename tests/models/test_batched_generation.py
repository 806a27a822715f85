"""Batched greedy generation with left padding gives each prompt what it gets alone."""

from __future__ import annotations

import torch

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
