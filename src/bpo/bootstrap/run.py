"""`bpo bootstrap`: stream a LLaVA dataset, make negatives, write a resumable, shardable pair store.

For every sample (one per assistant turn) the gold answer is `chosen`, and each enabled method
makes `rejected`: `weaken` (the model's own answers from the image noised at each noise step,
`bpo.bootstrap.weaken`) and `inject` (the gold rewritten to be subtly wrong by the configured
rewriter, `bpo.bootstrap.inject`). Each pair records both answers' token counts; weakened
negatives whose length strays too far from the gold's can be filtered out (`weaken.*_ratio`).

Exactness across kills and shards comes from three things:
- a sample's randomness is keyed by its *global* index in the data file (its position among all
  samples, whatever the shard), so shard `i` of `N` and a resumed run make the same negatives;
- a pair's key is known before it is generated (`pair_key(id, source, sample_index)`), so a
  rerun skips the keys already in the store;
- rejects are written to `bad_records.jsonl` (reason `rejected_<source>_<why>`, id = the pair
  key) as they happen, so they are counted exactly once and not regenerated after a resume.
The one exception is an endpoint rewriter at temperature > 0: the server samples as it likes.

Backends (`backend:`): "transformers" runs everything in the loaded model; "vllm" (a GPU with
`pip install 'bpo[vllm]'`) makes weakened negatives and "self" rewrites in an offline vLLM engine,
with the same noise, keys and record format. The two backends sample the same distributions but
not the same tokens, so the store records the backend and refuses to resume one backend's store
with the other.

Memory stays flat: samples are read one at a time and processed `chunk_size` at a time, their
images decoded `batch_size` at a time (each batch's let go before the next is decoded, so a chunk
of large images never sits in memory at once); only the store's key sets, the reader's ids and a
histogram of lengths grow, by a few bytes a pair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bpo.bootstrap.config import BootstrapConfig, check_config, store_config, weaken_steps
from bpo.bootstrap.inject.rewriters import Rewriter, make_rewriter
from bpo.bootstrap.inject.validate import normalize
from bpo.bootstrap.stats import REJECT_PREFIX, finalize_stats
from bpo.bootstrap.weaken import weakened_answers
from bpo.data import (
    BadRecord,
    ImageError,
    PairWriter,
    PreferencePair,
    Sample,
    load_image,
    merge_stores,
    pair_key,
    read_bad_records,
    read_llava,
    read_manifest,
    remove_image_placeholder,
    resolve_image_path,
)
from bpo.generate import Generator, TransformersGenerator, VllmGenerator
from bpo.generate.vllm_backend import EngineFactory
from bpo.models.load import check_family, load_from_config
from bpo.models.prompts import tokenize_prompt_and_answer
from bpo.models.vision import load_image_encoder
from bpo.utils.console import progress_bar

Work = tuple[str, int]  # (source, sample index): one pair still to make for a sample
# What a rejected candidate's reason means, by source (a rewrite's reasons are its validation's).
REJECT_DETAILS = {
    ("weaken", "empty"): "the answer from the noised image says nothing",
    ("weaken", "identical"): "the answer from the noised image is the gold answer",
}


@dataclass
class _Item:
    """A sample of this shard with work left, and what it needs."""

    sample: Sample
    index: int  # global index among the file's samples
    pending: set[Work]
    image: Any = None

    def key(self, source: str, sample_index: int) -> str:
        return pair_key(self.sample.id, source, sample_index)


@dataclass
class _Candidate:
    item: _Item
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


def _work(sample: Sample, config: BootstrapConfig) -> list[Work]:
    """Every pair the sample should give: its weakened samples (if it has an image), its rewrite."""
    work: list[Work] = []
    if config.weaken is not None and sample.image is not None:
        work += [("weaken", k) for k in range(len(weaken_steps(config.weaken)))]
    if config.inject is not None:
        work.append(("inject", 0))
    return work


def _shard_samples(
    records: Iterator[Sample | BadRecord], config: BootstrapConfig, report: Callable
) -> Iterator[tuple[int, Sample]]:
    """(global index, sample) for this shard's samples; bad records go to `report`."""
    index = -1
    for record in records:
        if isinstance(record, BadRecord):
            report(record)
            continue
        index += 1
        if config.limit is not None and index >= config.limit:
            return
        if index % config.num_shards == config.shard_index:
            yield index, record


def _record_id(sample: Sample) -> str:
    """The id of the record a sample came from (a multi-turn record's samples add `#turn{k}`)."""
    if sample.record_id is not None:
        return sample.record_id  # set by the readers: a record's own id may end in `#turn0`
    suffix = f"#turn{sample.meta.get('turn')}"
    return sample.id[: -len(suffix)] if sample.id.endswith(suffix) else sample.id


def _load_images(items: list[_Item], image_root: Path, report: Callable) -> list[_Item]:
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


class _Bootstrapper:
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

    def _weakened(self, items: list[_Item]) -> list[_Candidate]:
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

    def _injected(self, items: list[_Item]) -> list[_Candidate]:
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
        self, items: list[_Item], load: Callable[[list[_Item]], list[_Item]]
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


def _backend(
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


def _count_shard_samples(config: BootstrapConfig) -> int:
    records = read_llava(config.data, check_images=False)
    return sum(1 for _ in _shard_samples(records, config, lambda _bad: None))


def _check_data(data: Path, image_root: Path) -> None:
    """Fail before the store exists on a missing data file or image root, or on a file without
    one usable sample (it made a store of 0 pairs marked complete); reads to the first sample.

    A shard that gets none of a file's samples is not refused: the merge of all the shards
    needs its empty store.
    """
    bad, first = 0, None
    for record in read_llava(data, image_root, check_images=False):
        if not isinstance(record, BadRecord):
            return
        bad, first = bad + 1, first or record
    if first is None:
        raise ValueError(f"{data} holds no samples to bootstrap from; check the file")
    raise ValueError(
        f"{data} has no usable sample: all {bad} records are bad, e.g. {first.message}"
    )


def run_bootstrap(
    config: BootstrapConfig,
    overwrite: bool = False,
    model_and_processor: tuple[Any, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda _msg: None,
    engine_factory: EngineFactory | None = None,
) -> dict[str, Any]:
    """Make the pairs of `config` (or of the samples a previous run left); returns the manifest.

    Rerunning with the same config resumes: pairs and rejects already in `config.out` are
    skipped. A different config raises ConfigMismatchError (pass overwrite=True to replace).

    Args:
        model_and_processor: an already loaded (model, processor) to use instead of loading
            `config.model` (its settings are still what the store records). With backend "vllm"
            the model only encodes noised images (its language model is not used).
        progress: show a progress bar (samples of this shard, with rate and ETA).
        engine_factory: backend "vllm": makes the engine from (config.model, config.vllm)
            instead of `vllm.LLM` (tests hand in a stand-in).
    """
    check_config(config)
    if model_and_processor is None:
        # A family no stage serves stops here, before the store is created.
        check_family(
            config.model.name_or_path, config.model.trust_remote_code, config.model.revision
        )
    data = Path(config.data)
    image_root = Path(config.image_root) if config.image_root else data.parent
    _check_data(data, image_root)
    total = _count_shard_samples(config) if progress else 0
    with PairWriter(
        config.out, store_config(config), shard_size=config.shard_size, overwrite=overwrite
    ) as writer:
        rejected = {
            bad.id
            for bad in read_bad_records(writer.out_dir)
            if bad.reason.startswith(REJECT_PREFIX)
        }
        done = writer.done_keys | rejected
        if done:
            log(
                f"resuming {writer.out_dir}: {len(writer.done_keys)} pairs, {len(rejected)} rejects"
            )
        bootstrapper = _Bootstrapper(config, *_backend(config, model_and_processor, engine_factory))
        # Images are decoded here, a batch at a time, not by the reader: each is decoded once.
        records = read_llava(data, image_root, check_images=False)
        try:
            with progress_bar("bootstrap", total, enabled=progress) as advance:
                chunk: list[_Item] = []

                load = partial(_load_images, image_root=image_root, report=writer.report_bad)

                def flush() -> None:
                    for out in bootstrapper.process(chunk, load):
                        if isinstance(out, BadRecord):
                            writer.report_bad(out)
                        else:
                            writer.write(out)
                    for _ in chunk:
                        advance(0)
                    chunk.clear()

                for index, sample in _shard_samples(records, config, writer.report_bad):
                    pending = {
                        (source, k)
                        for source, k in _work(sample, config)
                        if pair_key(sample.id, source, k) not in done
                    }
                    if not pending:
                        advance(0)
                        continue
                    chunk.append(_Item(sample, index, pending))
                    if len(chunk) >= config.chunk_size:
                        flush()
                flush()
        finally:
            bootstrapper.close()
        finalize_stats(writer)
    return read_manifest(writer.out_dir)


def merge_bootstrap_stores(
    shard_dirs: list[str | Path],
    out: str | Path,
    overwrite: bool = False,
    allow_incomplete: bool = False,
) -> dict[str, Any]:
    """`merge_stores` over the shards of a bootstrap run, then the merged length distributions.

    Args:
        allow_incomplete: merge shards whose run did not finish, or an incomplete set of shards.
    """
    manifest = merge_stores(shard_dirs, out, overwrite=overwrite, allow_incomplete=allow_incomplete)
    with PairWriter(out, manifest["config"], shard_size=manifest["shard_size"]) as writer:
        finalize_stats(writer)
    return read_manifest(out)
