"""The pairs a run reads: selection, per-pair loading and encoding, collation, epoch order, and
their scores under the frozen reference.

Training and the reference pass (`bpo.train.refs`) read pairs the same way: a PairDataset loads
each pair's image and encodes it on access, and a Collator packs the good ones into a PairBatch.
A pair that cannot be used (missing or broken image, empty answer, prompt too long) comes back as
a BadPair with its key and reason, so one bad pair never stops a batch. `score_pairs` is the one
path every reference log-prob comes from, cached in a store or computed in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bpo.data.images import ImageError, check_image, load_image
from bpo.data.records import PreferencePair
from bpo.models.family import packing_refusal
from bpo.train.batch import (
    EncodedPair,
    EncodeError,
    PairBatch,
    collate_pairs,
    encode_pair,
    pad_token_id,
    shared_token_weights,
)
from bpo.train.config import TrainConfig, dense_weight
from bpo.train.groups import collate_groups, group_pairs, group_scores
from bpo.train.image_noise import (
    ImageNoise,
    NoiseMetaError,
    image_noise,
    noised_vision,
    pair_noise,
)
from bpo.train.limits import naming_out_of_memory
from bpo.train.logprobs import noised_chosen_logps, pair_logps, scoring_mode


@dataclass
class BadPair:
    """A pair that cannot be used: its image is missing or broken, or it cannot be encoded.

    Args:
        reason: a short class for counting ("missing_image", "empty_answer", ...).
        message: what to tell the user, naming the pair.
    """

    key: str
    reason: str
    message: str


def image_bad_pair(pair: PreferencePair, exc: ImageError) -> BadPair:
    """The BadPair of a pair whose image cannot be used."""
    return BadPair(pair.key, exc.reason, f"pair {pair.key}: {exc}")


def select_pairs(
    pairs: Iterable[PreferencePair],
    sources: Sequence[str] | None,
    noise_steps: Sequence[int] | None,
) -> list[PreferencePair]:
    """The pairs of the given sources and made at the given noise steps (None: no filter)."""
    return [
        p
        for p in pairs
        if (sources is None or p.source in sources)
        and (noise_steps is None or p.meta.get("noise_step") in noise_steps)
    ]


def check_store(directory: str | Path) -> None:
    """Refuse a folder that is not a pair store, or a store with no pairs, before a stage writes
    anything into it (a typo in run.pairs must not become a new folder)."""
    from bpo.data.store import read_manifest, read_pairs

    if not Path(directory).is_dir():
        raise FileNotFoundError(
            f"run.pairs {str(directory)!r} is not a folder; give the output folder of "
            "`bpo bootstrap` (or `bpo merge`)"
        )
    read_manifest(directory)  # a clear error when the folder is not a store
    if next(iter(read_pairs(directory)), None) is None:
        raise ValueError(
            f"{directory} is a pair store with no pairs; check run.pairs, or rerun `bpo bootstrap` "
            "(its manifest.json counts what was rejected and why)"
        )


# How a training config asks to read a store whose bootstrap did not finish.
ALLOW_INCOMPLETE = "set run.allow_incomplete: true (--run.allow_incomplete true)"


def load_store_pairs(
    directory: str | Path,
    sources: Sequence[str] | None = None,
    noise_steps: Sequence[int] | None = None,
    allow_incomplete: bool = False,
) -> list[PreferencePair]:
    """The pairs of a store that `select_pairs` keeps; ValueError when none is left.

    Args:
        allow_incomplete: read a store whose run did not finish (else: StoreError).
    """
    from bpo.data.store import open_store, read_pairs

    # A clear error when the folder is not a store, or its bootstrap stopped early.
    open_store(directory, allow_incomplete, ALLOW_INCOMPLETE)
    pairs = select_pairs(read_pairs(directory), sources, noise_steps)
    if not pairs:
        filters = [f"sources {list(sources)}"] if sources else []
        filters += [f"noise steps {list(noise_steps)}"] if noise_steps else []
        raise ValueError(
            f"{directory} holds no pairs{' of ' + ' and '.join(filters) if filters else ''}; "
            "check run.pairs, run.sources and run.noise_steps"
        )
    return pairs


class PairDataset(torch.utils.data.Dataset):
    """Pairs, each loaded (image) and encoded on access; a bad pair comes back as a BadPair.

    Args:
        images: the pairs' images by their `image` path (the in-memory API); else `image_root`.
        noise: with the image-contrast term on, each pair also carries its vision tensors with the
            pixels noised (`bpo.train.image_noise`); None: off.
        shared_weight: a dense preference's weight of the tokens both answers share: each pair
            carries its answers' token weights (`bpo.train.batch.shared_token_weights`), and
            every score of the preference terms is weighted by them. None: off.
        keep_encoded: keep each pair's encoding (or its BadPair) after its first access, so
            later epochs skip image loading and tokenization; memory grows with the pairs. An
            encoding is a pure function of its pair (its noise is keyed by the pair) and
            collation copies what it reads, so a kept one is reused as is.
    """

    def __init__(
        self,
        pairs: Sequence[PreferencePair],
        processor: Any,
        image_root: str | Path | None = None,
        images: Mapping[str, Image.Image] | None = None,
        max_length: int | None = None,
        noise: ImageNoise | None = None,
        shared_weight: float | None = None,
        keep_encoded: bool = False,
    ) -> None:
        self.pairs = list(pairs)
        self.encoded: dict[int, EncodedPair | BadPair] | None = {} if keep_encoded else None
        self.shared_weight = shared_weight
        self.processor = processor
        self.image_root = Path(image_root) if image_root is not None else None
        self.images = images
        self.max_length = max_length
        self.noise = noise

    def __len__(self) -> int:
        return len(self.pairs)

    def _image(self, pair: PreferencePair) -> Image.Image | None:
        if pair.image is None:
            return None
        if self.images is not None:
            if pair.image not in self.images:
                raise ImageError(f"image '{pair.image}' is not among the images given to train()")
            return self.images[pair.image]
        if self.image_root is None:
            raise ImageError(f"image '{pair.image}' but no image_root; set run.image_root")
        # check_image first: its messages name the path as written and the root to fix.
        return load_image(check_image(self.image_root, pair.image, decode=False))

    def __getitem__(self, index: int) -> EncodedPair | BadPair:
        if self.encoded is None:
            return self._encode(index)
        if index not in self.encoded:
            self.encoded[index] = self._encode(index)
        return self.encoded[index]

    def _encode(self, index: int) -> EncodedPair | BadPair:
        pair = self.pairs[index]
        try:
            item = encode_pair(pair, self.processor, self._image(pair), self.max_length)
        except ImageError as exc:
            return image_bad_pair(pair, exc)
        except EncodeError as exc:
            return BadPair(pair.key, exc.reason, str(exc))
        if self.noise is not None:
            try:
                key = pair_noise(pair, self.noise)
            except NoiseMetaError as exc:
                return BadPair(pair.key, exc.reason, str(exc))
            item.noised_vision = noised_vision(item.vision, key)
        if self.shared_weight is not None:
            item.answer_weights = shared_token_weights(
                item.chosen_ids, item.rejected_ids, self.shared_weight
            )
        return item


def run_dataset(
    config: TrainConfig,
    pairs: Sequence[PreferencePair],
    processor: Any,
    images: Mapping[str, Image.Image] | None = None,
) -> PairDataset:
    """The pairs encoded as a run encodes them: its image root, max_length, image noise,
    dense-preference weight and whether encodings are kept between epochs."""
    noise, weight, keep = image_noise(config), dense_weight(config.loss), config.keep_encoded_pairs
    return PairDataset(
        pairs, processor, config.image_root, images, config.max_length, noise, weight, keep
    )


@dataclass
class Collated:
    """One micro-batch: the good pairs collated (None if there are none) and the bad ones."""

    batch: PairBatch | None
    bad: list[BadPair]


# The batch tensors of a pair's reference log-probs, in the order of the Collator's tuples; the
# third only with the image-contrast term on.
REF_TENSORS = ("ref_chosen_logps", "ref_rejected_logps", "ref_noised_chosen_logps")


class Collator:
    """collate_pairs over the good items, plus each pair's reference log-probs when known.

    Args:
        refs: pair key -> (chosen, rejected) reference log-probs, or (chosen, rejected, chosen on
            the noised image) with the image-contrast term on; in the order of REF_TENSORS.
    """

    def __init__(self, pad_token_id: int, refs: Mapping[str, tuple[float, ...]] | None = None):
        self.pad_token_id = pad_token_id
        self.refs = refs

    def __call__(self, items: list[EncodedPair | BadPair]) -> Collated:
        good = [item for item in items if isinstance(item, EncodedPair)]
        bad = [item for item in items if isinstance(item, BadPair)]
        if not good:
            return Collated(None, bad)
        batch = collate_pairs(good, self.pad_token_id)
        if self.refs is not None:
            columns = list(zip(*(self.refs[key] for key in batch.keys), strict=True))
            for name, values in zip(REF_TENSORS, columns, strict=False):  # 2 or 3 columns
                batch.tensors[name] = torch.tensor(values, dtype=torch.float32)
        return Collated(batch, bad)


# Batches per mega-batch when grouping by length, at most: transformers' LengthGroupedSampler
# uses the same 50, or fewer so that an epoch has at least 4 mega-batches (below).
LENGTH_GROUP_BATCHES = 50


def row_lengths(pairs: Sequence[PreferencePair], processor: Any) -> list[int]:
    """Each pair's packed-row length in tokens, estimated from its text alone.

    The prompt's message texts plus both answers, tokenized in one batched call without the chat
    template, the image, or any image loading. What this leaves out (the template's tokens, the
    image's) is the same for every image pair of a model family, so it moves all rows alike and
    never changes which rows are similar; text is what varies between pairs.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    prompts = ["\n".join(message["content"] for message in p.prompt) for p in pairs]
    texts = prompts + [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    n = len(pairs)
    return [len(ids[i]) + len(ids[n + i]) + len(ids[2 * n + i]) for i in range(n)]


def _length_grouped(
    order: list[int], lengths: Sequence[int], chunk: int, step: int, seed: int, epoch: int
) -> list[list[int]]:
    """Global batches of `chunk` pairs of similar length from a shuffled epoch `order`.

    The order is cut into mega-batches of up to LENGTH_GROUP_BATCHES steps of `step` pairs (a
    multiple of `chunk`), each sorted by row length (longest first; ties keep the shuffled order)
    and cut into steps; the full steps are shuffled, the full step holding the longest row goes
    first (a batch too large for memory fails at the first step), a short last step stays last. Each
    step is then cut into global batches. Grouping whole steps keeps one process accumulating N
    micro-batches on the pairs that N processes take per step.
    """
    per_mega = max(1, min(LENGTH_GROUP_BATCHES, len(order) // (step * 4)))
    size = step * per_mega
    steps = []
    for start in range(0, len(order), size):
        mega = sorted(order[start : start + size], key=lambda i: -lengths[i])
        steps += [mega[at : at + step] for at in range(0, len(mega), step)]
    short = [steps.pop()] if steps and len(steps[-1]) < step else []
    # Its own stream (a third key): the pair shuffle stays the one the plain order draws.
    shuffled = np.random.default_rng([seed, epoch, 1]).permutation(len(steps))
    steps = [steps[k] for k in shuffled]
    if steps:
        longest = max(range(len(steps)), key=lambda k: lengths[steps[k][0]])
        steps.insert(0, steps.pop(longest))
    return [s[at : at + chunk] for s in steps + short for at in range(0, len(s), chunk)]


def epoch_batches(
    num_pairs: int,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    lengths: Sequence[int] | None = None,
    grad_accum: int = 1,
) -> list[list[int]]:
    """This process's micro-batches (pair indices) for an epoch: a seeded shuffle, recomputable.

    With several processes the order is cut into global batches of `batch_size * world` pairs,
    the last one filled by wrapping around (as DistributedSampler does), so every process runs the
    same number of forward passes. Each process takes its slice of every global batch.

    Args:
        lengths: each pair's row length (`row_lengths`); given, the batches group pairs of
            similar length (`_length_grouped`), so little of a batch is padding. Same count of
            batches of the same sizes either way, and the same for the same (seed, epoch).
        grad_accum: micro-batches per optimizer step; with `lengths`, whole steps are grouped.
    """
    if lengths is not None and len(lengths) != num_pairs:
        raise ValueError(f"lengths holds {len(lengths)} row lengths for {num_pairs} pairs")
    order = np.random.default_rng([seed, epoch]).permutation(num_pairs).tolist()
    chunk = batch_size * world
    if world > 1 and len(order) % chunk:
        order += order[: chunk - len(order) % chunk]
    if lengths is None:
        batches = [order[start : start + chunk] for start in range(0, len(order), chunk)]
    else:
        batches = _length_grouped(order, lengths, chunk, chunk * grad_accum, seed, epoch)
    return [batch[rank * batch_size : (rank + 1) * batch_size] for batch in batches]


def padded_share(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Padding tokens / all tokens of the right-padded (B, longest row) tensors of `batches`."""
    total = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    real = sum(lengths[i] for batch in batches for i in batch)
    return (total - real) / total if total else 0.0


# --- reference scores ----------------------------------------------------------------------


@dataclass
class PairScore:
    """The reference's scores of one pair, as `score_pairs` computes them.

    Args:
        truncated: an answer was cut to fit max_length (its log-prob covers the kept tokens).
        ref_noised_chosen_logp: the chosen answer on the pair's noised image (the image-contrast
            term); None when the term is off.
    """

    key: str
    ref_chosen_logp: float
    ref_rejected_logp: float
    chosen_tokens: int
    rejected_tokens: int
    truncated: bool = False
    ref_noised_chosen_logp: float | None = None


def _pair_rows(model: Any, batch: PairBatch, grouped: bool) -> list:
    """(key, chosen, rejected, chosen tokens, rejected tokens, truncated) of every pair."""
    if grouped:  # a sample's pairs in one row (bpo.train.groups)
        return group_scores(model, batch)
    logps = pair_logps(model, batch)
    return list(
        zip(
            batch.keys,
            logps.preference_chosen.float().tolist(),  # weighted ones with a dense preference
            logps.preference_rejected.float().tolist(),
            logps.chosen_tokens.tolist(),
            logps.rejected_tokens.tolist(),
            batch.extra["truncated"],
            strict=True,
        )
    )


def _score_batch(
    model: Any,
    items: list[EncodedPair | BadPair],
    pad: int,
    device: Any,
    max_length: int | None = None,
    grouped: bool = False,
) -> tuple[list[PairScore], list[BadPair]]:
    """Score one batch of items; pairs whose log-probs are not finite join its bad pairs."""
    good = [item for item in items if isinstance(item, EncodedPair)]
    bad = [item for item in items if isinstance(item, BadPair)]
    if not good:
        return [], bad
    fix = (
        "lower run.max_length (longer answers are cut and counted as truncated) or "
        "run.reference_batch_size"
    )
    batch = collate_groups(group_pairs(good), pad) if grouped else collate_pairs(good, pad)
    with naming_out_of_memory(batch, "the reference pass", max_length, fix):
        rows = _pair_rows(model, batch.to(device), grouped)
    noised = _noised_chosen(model, good, pad, device, max_length, fix)
    scores = []
    for key, chosen, rejected, n_chosen, n_rejected, truncated in rows:
        values = [chosen, rejected] + ([noised[key]] if noised else [])
        if not all(math.isfinite(v) for v in values):
            shown = ", ".join(map(str, values))
            message = f"pair {key}: reference log-probs are not finite ({shown})"
            bad.append(BadPair(key, "non_finite_logps", message))
            continue
        scores.append(
            PairScore(
                key, chosen, rejected, int(n_chosen), int(n_rejected), truncated, noised.get(key)
            )
        )
    return scores, bad


def _noised_chosen(
    model: Any, good: list[EncodedPair], pad: int, device: Any, max_length: int | None, fix: str
) -> dict[str, float]:
    """Key -> the chosen answer's log-prob on the pair's noised image ({} with the term off).

    One `[prompt | chosen]` row per pair, as training scores it (`noised_chosen_logps`): each pair
    has its own noise, so the rows of a sample are not shared as its clean pairs' are.
    """
    if good[0].noised_vision is None:
        return {}
    batch = collate_pairs(good, pad)
    with naming_out_of_memory(batch, "the reference pass (noised images)", max_length, fix):
        logps = noised_chosen_logps(model, batch.to(device))
    return dict(zip(batch.keys, logps.preference_chosen.float().tolist(), strict=True))


def by_sample(pairs: Sequence[PreferencePair], order: Sequence[int]) -> list[int]:
    """`order` with the pairs of one sample (image, prompt, chosen answer) next to each other,
    samples in first-seen order: a batch then holds whole samples, scored a row each."""
    samples: dict[tuple[str | None, str, str], list[int]] = {}
    for index in order:
        pair = pairs[index]
        key = (pair.image, json.dumps(pair.prompt, sort_keys=True), pair.chosen)
        samples.setdefault(key, []).append(index)
    return [index for indices in samples.values() for index in indices]


def score_pairs(
    model: Any,
    dataset: PairDataset,
    batch_size: int,
    indices: Sequence[int] | None = None,
    on_batch: Callable[[list[PairScore], list[BadPair]], None] | None = None,
) -> tuple[list[PairScore], list[BadPair]]:
    """The frozen model's scores of the dataset's pairs: every reference log-prob comes from here.

    Runs under `bpo.train.logprobs.scoring_mode` (eval and inference mode), in the weights' own
    dtype (call it outside autocast), on the device of the model's first parameter; the model is
    given back in the mode it came in.

    Args:
        indices: the pairs to score (a process's share); default all, in order.
        on_batch: called with each batch's (scores, bad pairs) as soon as it is scored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = list(range(len(dataset))) if indices is None else list(indices)
    # A model packed rows cannot score exactly (packing_refusal) gets the naive pair path. A
    # dense preference weighs a sample's chosen tokens by the negative each pair has, which one
    # group row's single chosen block cannot hold: its pairs are scored a pair row each.
    grouped = packing_refusal(model) is None and dataset.shared_weight is None
    if grouped:
        order = by_sample(dataset.pairs, order)
    pad = pad_token_id(dataset.processor)
    device = next(model.parameters()).device
    scores: list[PairScore] = []
    bad: list[BadPair] = []
    # Eval and inference mode; the model comes back as it came, fit for training.
    with scoring_mode(model):
        for start in range(0, len(order), batch_size):
            items = [dataset[i] for i in order[start : start + batch_size]]
            batch_scores, batch_bad = _score_batch(
                model, items, pad, device, dataset.max_length, grouped
            )
            if on_batch is not None:
                on_batch(batch_scores, batch_bad)
            scores += batch_scores
            bad += batch_bad
    return scores, bad
