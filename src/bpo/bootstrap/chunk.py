"""One chunk of a bootstrap run: a chunk's samples in, its pairs and rejects out, in order.

`Bootstrapper.process` is the one place pairs are made: the local run calls it in the process
that writes the store, and the Ray run (`bpo.bootstrap.ray_run`) calls it in each model replica,
on the same chunks, so both make the same records in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bpo.bootstrap.config import BootstrapConfig
from bpo.bootstrap.inject.rewriters import Rewriter, make_rewriter
from bpo.bootstrap.inject.validate import normalize
from bpo.bootstrap.stats import REJECT_PREFIX
from bpo.bootstrap.weaken import weakened_answers
from bpo.data import (
    BadRecord,
    ImageError,
    PreferencePair,
    Sample,
    load_image,
    pair_key,
    remove_image_placeholder,
    resolve_image_path,
)
from bpo.generate import Generator, TransformersGenerator, VllmGenerator
from bpo.generate.vllm_backend import EngineFactory
from bpo.models.load import load_from_config
from bpo.models.prompts import tokenize_prompt_and_answer
from bpo.models.vision import load_image_encoder

Work = tuple[str, int]  # (source, sample index): one pair still to make for a sample
# What a rejected candidate's reason means, by source (a rewrite's reasons are its validation's).
REJECT_DETAILS = {
    ("weaken", "empty"): "the answer from the noised image says nothing",
    ("weaken", "identical"): "the answer from the noised image is the gold answer",
}


@dataclass
class Item:
    """A sample of this shard with work left, and what it needs."""

    sample: Sample
    index: int  # global index among the file's samples
    pending: set[Work]
    image: Any = None

    def key(self, source: str, sample_index: int) -> str:
        return pair_key(self.sample.id, source, sample_index)


@dataclass
class Unit:
    """One chunk as the writer takes it: the reader's bad records met since the last chunk, then
    the chunk's items (samples with work left), written in that order by either route."""

    bad: list[BadRecord] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    skipped: int = 0  # samples whose pairs were all made before a resume


@dataclass
class _Candidate:
    item: Item
    source: str
    sample_index: int
    text: str | None
    reason: str | None  # why `text` is None
    meta: dict[str, Any]


def _where(sample: Sample) -> str:
    return f"{sample.meta.get('file')} line {sample.meta.get('line')}"


def _reject_record(candidate: _Candidate, reason: str, detail: str) -> BadRecord:
    sample = candidate.item.sample
    key = candidate.item.key(candidate.source, candidate.sample_index)
    return BadRecord(
        file=str(sample.meta.get("file")),
        line=sample.meta.get("line"),
        id=key,
        reason=f"{REJECT_PREFIX}{candidate.source}_{reason}",
        message=f"{_where(sample)} (id={sample.id}): {candidate.source} negative {key} "
        f"rejected ({reason}): {detail}",
    )


def _record_id(sample: Sample) -> str:
    """The id of the record a sample came from (a multi-turn record's samples add `#turn{k}`)."""
    if sample.record_id is not None:
        return sample.record_id  # set by the readers: a record's own id may end in `#turn0`
    suffix = f"#turn{sample.meta.get('turn')}"
    return sample.id[: -len(suffix)] if sample.id.endswith(suffix) else sample.id


def load_images(items: list[Item], image_root: Path, report: Callable) -> list[Item]:
    """The items whose image loads (or that have none); a bad image is reported and dropped.

    The turns of one record share its image: it is decoded once per call, and reported by record
    (a record whose turns straddle two batches is decoded twice, and counted once by the store).
    """
    kept, cache = [], {}
    for item in items:
        sample = item.sample
        if sample.image is not None:
            if sample.image not in cache:
                try:
                    cache[sample.image] = load_image(resolve_image_path(image_root, sample.image))
                except ImageError as error:
                    cache[sample.image] = error
            item.image = cache[sample.image]
        if isinstance(item.image, ImageError):
            where = f"{_where(sample)} (id={_record_id(sample)})"
            report(
                BadRecord(
                    file=str(sample.meta.get("file")),
                    line=sample.meta.get("line"),
                    id=_record_id(sample),
                    reason=item.image.reason,
                    message=f"{where}: {item.image}",
                )
            )
            continue
        kept.append(item)
    return kept


class Bootstrapper:
    """The backend, rewriter and settings of one run; `process(items)` makes one chunk's pairs."""

    def __init__(self, config: BootstrapConfig, generator: Generator, encoder: Any, model: Any):
        """encoder: with backend "vllm", the encoder of noised images (None otherwise).

        model: the loaded MLLM with backend "transformers" (the "self" rewriter's LM).
        """
        self.config, self.generator, self.encoder = config, generator, encoder
        self.processor = generator.processor
        self.rewriter: Rewriter | None = None
        if config.inject is not None:
            self.rewriter = make_rewriter(
                config.inject,
                config.model,
                model,
                self.processor,
                generator,
                config.batch_size,
            )

    def close(self) -> None:
        if self.rewriter is not None:
            self.rewriter.close()

    def _weakened(self, items: list[Item]) -> list[_Candidate]:
        todo = [i for i in items if any(source == "weaken" for source, _ in i.pending)]
        if not todo:
            return []
        answers = weakened_answers(
            self.generator,
            [{"messages": i.sample.messages, "image": i.image} for i in todo],
            self.config.weaken,
            indices=[i.index for i in todo],
            encoder=self.encoder,
            batch_size=self.config.batch_size,
        )
        candidates = []
        for item, samples in zip(todo, answers, strict=True):
            for k, answer in enumerate(samples):
                reason = None
                if not normalize(answer.text):
                    reason = "empty"
                elif normalize(answer.text) == normalize(item.sample.answer):
                    reason = "identical"
                meta = {**answer.meta, "generator": self.config.model.name_or_path}
                candidates.append(_Candidate(item, "weaken", k, answer.text or None, reason, meta))
        return candidates

    def _injected(self, items: list[Item]) -> list[_Candidate]:
        inject = self.config.inject
        todo = [i for i in items if ("inject", 0) in i.pending]
        if not todo:
            return []
        results = self.rewriter.rewrite_all(
            [i.sample.answer for i in todo],
            [remove_image_placeholder(i.sample.messages[-1]["content"]) for i in todo],
            [i.index for i in todo],
        )
        meta = {
            "kind": inject.kind,
            "mode": inject.mode,
            "generator": self.rewriter.generator,
            "seed": inject.seed,
        }
        return [
            _Candidate(
                item, "inject", 0, result.text, result.reason, {**meta, "edits": result.edits}
            )
            for item, result in zip(todo, results, strict=True)
        ]

    def _answer_tokens(self, sample: Sample, answer: str) -> int:
        has_image = sample.image is not None
        return len(
            tokenize_prompt_and_answer(self.processor, sample.messages, answer, has_image)[1]
        )

    def _length_reject(self, c: _Candidate, rejected: int, chosen: int) -> str | None:
        """Why a weakened negative's length is out of bounds, or None when it is not."""
        weaken = self.config.weaken
        if c.source != "weaken":
            return None
        ratio = rejected / chosen
        length = f"{rejected} tokens, {ratio:.2f}x the gold answer's {chosen}"
        if weaken.max_length_ratio is not None and ratio > weaken.max_length_ratio:
            return f"{length}: above weaken.max_length_ratio {weaken.max_length_ratio}"
        if weaken.min_length_ratio is not None and ratio < weaken.min_length_ratio:
            return f"{length}: below weaken.min_length_ratio {weaken.min_length_ratio}"
        return None

    def process(
        self, items: list[Item], load: Callable[[list[Item]], list[Item]]
    ) -> Iterator[PreferencePair | BadRecord]:
        """This chunk's pairs and rejects, in (global index, source, sample index) order.

        load: decodes a batch's images into its items, dropping (and reporting) those whose image
            fails. The chunk is loaded and weakened `batch_size` items at a time and each batch's
            images are let go before the next batch is decoded: the decoded images in memory are
            one batch's, not the chunk's.
        """
        kept, candidates = [], []
        for start in range(0, len(items), self.config.batch_size):
            batch = load(items[start : start + self.config.batch_size])
            candidates += self._weakened(batch)
            for item in batch:
                item.image = None  # the candidates keep their item; they need no pixels
            kept += batch
        candidates += self._injected(kept)
        candidates.sort(key=lambda c: (c.item.index, c.source, c.sample_index))
        chosen_tokens: dict[int, int] = {}
        for c in candidates:
            sample = c.item.sample
            if (c.source, c.sample_index) not in c.item.pending:
                continue  # written before a kill; the rest of the sample's pairs still go out
            if c.text is None or c.reason is not None:
                reason = c.reason or "empty"
                detail = REJECT_DETAILS.get((c.source, reason), "the rewrite failed validation")
                yield _reject_record(c, reason, detail)
                continue
            if c.item.index not in chosen_tokens:
                chosen_tokens[c.item.index] = self._answer_tokens(sample, sample.answer)
            chosen = chosen_tokens[c.item.index]
            rejected = self._answer_tokens(sample, c.text)
            detail = self._length_reject(c, rejected, chosen)
            if detail is not None:
                yield _reject_record(c, "length_ratio", detail)
                continue
            yield PreferencePair(
                id=sample.id,
                image=sample.image,
                prompt=sample.messages,
                chosen=sample.answer,
                rejected=c.text,
                source=c.source,
                meta={**c.meta, "sample_index": c.sample_index, "global_index": c.item.index},
                chosen_tokens=chosen,
                rejected_tokens=rejected,
            )


def make_backend(
    config: BootstrapConfig,
    model_and_processor: tuple[Any, Any] | None,
    engine_factory: EngineFactory | None,
) -> tuple[Generator, Any, Any]:
    """(generator, encoder of noised images or None, the loaded MLLM or None) of a run.

    With backend "vllm", a given (model, processor) is the encoder of noised images and its
    processor; otherwise the encoder is loaded (vision tower and projector only) when weakening.
    """
    if config.backend == "transformers":
        model, processor = model_and_processor or load_from_config(config.model)
        return TransformersGenerator(model, processor, config.batch_size), None, model
    if model_and_processor is not None:
        encoder, processor = model_and_processor
    elif config.weaken is not None:
        encoder, processor = load_image_encoder(config.model)
    else:
        encoder, processor = None, None  # "self" rewrites in the engine: no encoder needed
    generator = VllmGenerator.from_config(config.model, config.vllm, engine_factory, processor)
    return generator, encoder, encoder


def chunk_outputs(
    bootstrapper: Bootstrapper, items: list[Item], image_root: Path
) -> list[PreferencePair | BadRecord]:
    """A chunk's records in the order the writer takes them: each bad image as its batch loads,
    then the chunk's pairs and rejects in (global index, source, sample index) order."""
    outputs: list[PreferencePair | BadRecord] = []
    load = partial(load_images, image_root=image_root, report=outputs.append)
    for record in bootstrapper.process(items, load):  # `load` reports as `process` calls it
        outputs.append(record)
    return outputs
