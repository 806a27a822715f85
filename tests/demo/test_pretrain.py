"""The demo base model's training recipes: token ids, batches and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from bpo.demo import pretrain as train
from bpo.models.load import load_processor
from bpo.models.prompts import tokenize_prompt_and_answer


@pytest.mark.parametrize("has_image", [True, False])
def test_cached_encoding_equals_the_model_layers_tokenization(tiny_llava_folder, has_image):
    """PromptCache + encode_answer (fast: prompts tokenized once) give exactly the ids of
    `tokenize_prompt_and_answer`, the model layer's one way to tokenize a training answer; for
    an image prompt the processor's expansion of <image> comes on top."""
    processor = load_processor(str(tiny_llava_folder))
    question, answer = "Describe the image.", "a red circle and a blue square ."
    content = f"<image>\n{question}" if has_image else question
    prompt_ids, answer_ids = tokenize_prompt_and_answer(
        processor, [{"role": "user", "content": content}], answer, has_image=has_image
    )
    cached = train.PromptCache(processor)(question, has_image)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    expanded = []
    for token in prompt_ids:  # the processor puts one <image> per image feature (16 here)
        expanded.extend([image_id] * 16 if token == image_id else [token])
    assert cached == expanded
    assert train.encode_answer(processor, answer) == answer_ids


def test_collate_pads_right_and_labels_answers_only():
    """Two examples (prompt 2 + answer 2, prompt 1 + answer 1), pad id 0: labels are -100 on the
    prompt and the padding, the answer ids elsewhere; pixel rows follow image_index."""
    examples = [train.Example([5, 6], [7, 8], 1), train.Example([9], [10], 0)]
    pixels = torch.arange(2.0).view(2, 1, 1, 1)
    batch = train.collate(examples, pixels, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["pixel_values"].flatten().tolist() == [1.0, 0.0]


def test_cosine_lr_warms_up_then_decays_to_a_tenth():
    """peak 1, 100 steps, warm-up 10: step 0 -> 0.1, step 9 -> 1; after warm-up the cosine
    runs from 1 (step 10) through 0.55 (halfway, step 55) to 0.1 (step 100)."""
    assert train.cosine_lr(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert train.cosine_lr(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert train.cosine_lr(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert train.cosine_lr(55, 100, 1.0, 10) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))
    )
    assert train.cosine_lr(100, 100, 1.0, 10) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("stage", "moved"), [("projector", {"projector"}), ("full", {"projector", "lm"})]
)
def test_alignment_stages_train_exactly_their_parts(tiny_llava_folder, stage, moved):
    """LLaVA's stage 1 trains the projector alone; stage 2 projector + LM; the tower never."""
    from bpo.models.load import load_model_and_processor

    model, processor = load_model_and_processor(
        str(tiny_llava_folder), dtype="float32", device="cpu"
    )
    prompt = train.PromptCache(processor)("Describe the image.", True)
    examples = [
        train.Example(prompt, train.encode_answer(processor, "a red circle ."), i) for i in range(4)
    ]
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    parts = {
        "vision": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "lm": model.model.language_model,
    }
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in parts.items()}
    train.align(model, examples, pixels, stage, steps=2, batch_size=2, lr=1e-2, seed=0)
    for name, module in parts.items():
        same = all(
            torch.equal(a, b) for a, b in zip(before[name], module.parameters(), strict=True)
        )
        assert same == (name not in moved), name


def test_trainable_parameters_come_in_one_order_whatever_the_sets_order():
    """A set of strings iterates in an order that changes with PYTHONHASHSEED; the parameters'
    order moves the optimizer's float sums, so it must follow the parts' fixed order instead:
    here a set that iterates "lm" first still gives the projector's parameters first."""

    class LmFirst(set):
        def __iter__(self):
            return iter(sorted(set.__iter__(self)))  # "lm" before "projector"

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.vision_tower = torch.nn.Linear(2, 2)
    model.model.multi_modal_projector = torch.nn.Linear(2, 3)
    model.model.language_model = torch.nn.Linear(3, 4)
    model.lm_head = torch.nn.Linear(4, 5)
    params = train._set_trainable(model, LmFirst({"projector", "lm"}))
    expected = [
        *model.model.multi_modal_projector.parameters(),
        *model.model.language_model.parameters(),
        *model.lm_head.parameters(),
    ]
    assert [id(p) for p in params] == [id(p) for p in expected]
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert all(p.requires_grad for p in expected)
