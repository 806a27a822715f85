"""The training recipes that make ShapeWorld's base model: a small LLaVA with a strong text prior.

Stages, as in LLaVA-1.5 (each a small function over a real `LlavaForConditionalGeneration`):
1. `pretrain_language_model`: the LM alone on the biased text corpus (the "LLM pretraining");
2. `pretrain_vision_tower`: the CLIP tower on the world's images with per-cell shape/colour heads
   (stands in for CLIP's own pretraining);
3. `align(stage="projector")`: only the projector trains, LM and tower frozen (LLaVA stage 1);
4. `align(stage="full")`: projector + LM on the unbiased image set, briefly, replaying the text
   corpus so the LM keeps its prior (LLaVA stage 2 is short and mixes in text-only chat data).
Losses are on answer tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bpo.models.prompts import build_prompt


@dataclass
class Example:
    """A tokenized training example: prompt ids (image tokens expanded), answer ids (+eos)."""

    prompt_ids: list[int]
    answer_ids: list[int]
    image_index: int | None = None  # row of the pixel tensor, None for text-only


def encode_prompt(processor, messages: list[dict], has_image: bool) -> list[int]:
    """Token ids of the chat prompt up to 'ASSISTANT:', image placeholders expanded."""
    text = build_prompt(processor, messages, add_generation_prompt=True, has_image=has_image)
    if not has_image:
        return processor.tokenizer(text, add_special_tokens=True)["input_ids"]
    # The processor expands <image> to one token per image feature; the count does not depend on
    # the pixels, so any image of the right size serves.
    size = processor.image_processor.crop_size["height"]
    dummy = np.zeros((size, size, 3), np.uint8)
    return processor(images=[dummy], text=[text], return_tensors=None)["input_ids"][0]


def encode_answer(processor, answer: str) -> list[int]:
    """Answer token ids as they follow 'ASSISTANT:' (a leading space), closed by eos."""
    tokenizer = processor.tokenizer
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


class PromptCache:
    """Tokenized prompts, computed once per distinct (question, has_image)."""

    def __init__(self, processor):
        self.processor = processor
        self._cache: dict[tuple[str, bool], list[int]] = {}

    def __call__(self, question: str, has_image: bool) -> list[int]:
        key = (question, has_image)
        if key not in self._cache:
            content = f"<image>\n{question}" if has_image else question
            messages = [{"role": "user", "content": content}]
            self._cache[key] = encode_prompt(self.processor, messages, has_image)
        return self._cache[key]


def collate(
    examples: Sequence[Example], pixels: torch.Tensor | None, pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded batch with answer-only labels; pixel rows for examples that have an image."""
    length = max(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        ids = e.prompt_ids + e.answer_ids
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(e.prompt_ids) : len(ids)] = torch.tensor(e.answer_ids)
        attention[i, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    rows = [e.image_index for e in examples if e.image_index is not None]
    if rows:
        assert pixels is not None and len(rows) == len(examples), (
            "mix text/image in separate batches"
        )
        batch["pixel_values"] = pixels[rows]
    return batch


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    """Endless shuffled index batches."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def train_loop(
    params: list[nn.Parameter],
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    progress=None,
    weight_decay: float = 0.0,
) -> list[float]:
    """AdamW with warm-up + cosine over `steps`; `loss_fn(step)` builds and scores one batch."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    losses = []
    warmup = max(1, steps // 20)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, loss.item())
    return losses


def _set_trainable(model, parts: set[str]) -> list[nn.Parameter]:
    """Freeze everything except the named parts: 'vision', 'projector', 'lm'."""
    modules = {
        "vision": [model.model.vision_tower],
        "projector": [model.model.multi_modal_projector],
        "lm": [model.model.language_model, model.lm_head],
    }
    model.requires_grad_(False)
    params = []
    # In the dict's order, not the set's: a set of strings iterates in an order that changes
    # with PYTHONHASHSEED, and the parameters' order moves the optimizer's and the gradient
    # clipping's float sums, so the trained weights would differ from one process to the next.
    for name, group in modules.items():
        if name not in parts:
            continue
        for module in group:
            module.requires_grad_(True)
            params.extend(module.parameters())
    return params


def pretrain_language_model(
    model,
    texts: Sequence[Example],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress=None,
) -> list[float]:
    """Train the LM (embeddings, layers, head) on text-only examples."""
    params = _set_trainable(model, {"lm"})
    model.train()
    rng = np.random.default_rng(seed)
    batches = _batches(len(texts), batch_size, rng)
    pad = model.config.text_config.pad_token_id

    def loss_fn(_step):
        batch = collate([texts[i] for i in next(batches)], None, pad)
        return model(**batch).loss

    losses = train_loop(params, loss_fn, steps, lr, progress)
    model.eval()
    return losses


class CellHeads(nn.Module):
    """Per-patch classifiers (shape or empty, colour or empty) used only to pretrain the tower."""

    def __init__(self, hidden: int, num_shapes: int, num_colours: int):
        super().__init__()
        self.shape = nn.Linear(hidden, num_shapes + 1)
        self.colour = nn.Linear(hidden, num_colours + 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shape(features), self.colour(features)  # (B, P, S+1), (B, P, C+1)


def pretrain_vision_tower(
    model,
    pixels: torch.Tensor,
    shape_labels: torch.Tensor,
    colour_labels: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress=None,
) -> float:
    """Train the CLIP tower so each patch feature names its cell's shape and colour.

    Returns the shape accuracy per cell on the last batches, a sanity figure for the caller.
    """
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    hidden = tower.config.hidden_size
    torch.manual_seed(seed)
    heads = CellHeads(hidden, int(shape_labels.max()), int(colour_labels.max()))
    params = _set_trainable(model, {"vision"}) + list(heads.parameters())
    tower.train()
    rng = np.random.default_rng(seed)
    batches = _batches(len(pixels), batch_size, rng)
    accuracy: list[float] = []

    def loss_fn(_step):
        rows = next(batches)
        out = tower(pixels[rows], output_hidden_states=True)
        features = out.hidden_states[layer][:, 1:]  # (B, P, H): patches, CLS dropped
        shape_logits, colour_logits = heads(features)
        shape_target, colour_target = shape_labels[rows], colour_labels[rows]
        loss = nn.functional.cross_entropy(shape_logits.flatten(0, 1), shape_target.flatten())
        loss = loss + nn.functional.cross_entropy(
            colour_logits.flatten(0, 1), colour_target.flatten()
        )
        accuracy.append((shape_logits.argmax(-1) == shape_target).float().mean().item())
        return loss

    train_loop(params, loss_fn, steps, lr, progress)
    tower.eval()
    return float(np.mean(accuracy[-20:]))


def align(
    model,
    examples: Sequence[Example],
    pixels: torch.Tensor,
    stage: str,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    replay: Sequence[Example] = (),
    replay_weight: float = 0.0,
    progress=None,
) -> list[float]:
    """LLaVA alignment: stage 'projector' (LM frozen) or 'full' (projector + LM, tower frozen).

    With `replay`, each step also scores a batch of text-only examples, weighted by
    `replay_weight`, so the LM keeps what its pretraining taught it.
    """
    parts = {"projector"} if stage == "projector" else {"projector", "lm"}
    params = _set_trainable(model, parts)
    model.train()
    model.model.vision_tower.eval()  # frozen, and no dropout noise in its features
    rng = np.random.default_rng(seed)
    batches = _batches(len(examples), batch_size, rng)
    replay_batches = _batches(len(replay), batch_size, rng) if replay else None
    pad = model.config.text_config.pad_token_id

    def loss_fn(_step):
        batch = collate([examples[i] for i in next(batches)], pixels, pad)
        loss = model(**batch).loss
        if replay_batches is not None and replay_weight > 0:
            text_batch = collate([replay[i] for i in next(replay_batches)], None, pad)
            loss = loss + replay_weight * model(**text_batch).loss
        return loss

    losses = train_loop(params, loss_fn, steps, lr, progress)
    model.eval()
    return losses
