"""Keyed sampling: every (request, sample) draws from its own seeded generator.

Randomness is keyed, not sequential: a request's tokens are drawn from a generator seeded by
`stream_seed(seed, request key, sample index, stream)` (`bpo.utils.seeds`, re-exported here), so
an answer does not depend on the batch size, the batch it lands in, or which other requests run
(what a resumed or sharded run needs).
`KeyedSampler` does it inside `model.generate` as a logits processor; the vLLM backend hands the
same seeds to its own sampler (same distribution, not the same tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bpo.utils.seeds import stream_seed

__all__ = ["KeyedSampler", "eos_ids", "nucleus", "stream_seed", "until_eos"]


def nucleus(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """Logits (B, V) scaled by 1 / temperature with tokens outside the top-p nucleus at -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (as in
    transformers' TopPLogitsWarper); the most likely token is always kept.
    """
    scaled = logits / temperature
    if top_p >= 1.0:
        return scaled
    ascending, order = torch.sort(scaled, dim=-1)  # (B, V)
    mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)  # (B, V): mass of tokens up to each
    drop = mass_below <= 1.0 - top_p
    drop[:, -1] = False
    return scaled.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


class KeyedSampler:
    """A logits processor that samples each row from its own generator and forces that token.

    `model.generate` then decodes greedily: the forced token is the only one with finite score.
    Sampling this way, rather than with generate's `do_sample` (one global generator for the whole
    batch), makes a row's tokens independent of the other rows in its batch. At temperature 0 it
    takes the argmax.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.seeds = seeds
        self.temperature = temperature
        self.top_p = top_p
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.temperature == 0:
            chosen = scores.argmax(dim=-1)  # (B,)
        else:
            if self.generators is None:
                self.generators = [
                    torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds
                ]
            probs = nucleus(scores.float(), self.temperature, self.top_p).softmax(dim=-1)  # (B, V)
            chosen = torch.cat(
                [
                    torch.multinomial(row, 1, generator=g)
                    for row, g in zip(probs, self.generators, strict=True)
                ]
            )  # (B,)
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(-1, chosen[:, None], 0.0)


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end an answer: the model's generation config's, else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


def until_eos(ids: list[int], eos: set[int]) -> list[int]:
    """Generated ids up to and including the first end-of-sequence id (later ones are padding)."""
    for k, token in enumerate(ids):
        if token in eos:
            return ids[: k + 1]
    return ids
