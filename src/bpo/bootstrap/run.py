"""`bpo bootstrap`: stream a LLaVA dataset, make negatives, write a resumable, shardable pair store.

For every sample (one per assistant turn) the gold answer is `chosen`, and each enabled method
makes `rejected`: `weaken` (the model's own answer from the noised image, `bpo.bootstrap.weaken`)
and `inject` (the gold rewritten to be subtly wrong, `bpo.bootstrap.inject`). Each pair records
both answers' token counts; an optional length filter drops negatives whose length strays too far
from the gold's, since DPO otherwise learns length instead of grounding.

Exactness across kills and shards comes from three things:
- a sample's randomness is keyed by its *global* index in the data file (its position among all
  samples, whatever the shard), so shard `i` of `N` and a resumed run make the same negatives;
- a pair's key is known before it is generated (`pair_key(id, source, sample_index)`), so a
  rerun skips the keys already in the store;
- rejects are written to `bad_records.jsonl` (reason `rejected_<source>_<why>`, id = the pair
  key) as they happen, so they are counted exactly once and not regenerated after a resume.
The local LLM rewriters ("self", "local") key their sampling the same way (`stream_seed(inject.seed,
global index, 0, "inject")`), so they too are exact across kills and shards. The one exception is
"endpoint" at temperature > 0: the server samples as it likes.

Backends (`backend:`): "transformers" runs everything in the loaded model; "vllm" (a GPU with
`pip install 'bpo[vllm]'`) makes weakened negatives and "self" rewrites in an offline vLLM engine
(`bpo.bootstrap.vllm_backend`), with the same noise, keys and record format. The two backends
sample the same distributions but not the same tokens, so the store records the backend and
refuses to resume one backend's store with the other.

The manifest's `counts.other` (rejects per reason) and `stats.lengths` (length distributions per
source) are rebuilt from those files when the run closes, never carried in memory across a kill.

Memory stays flat: samples are read one at a time and processed `chunk_size` at a time; only the
store's key sets and a histogram of lengths grow, by a few bytes a pair.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from bpo.bootstrap.generate import Backend, VllmConfig, check_backend
from bpo.bootstrap.inject import (
    EndpointRewriter,
    InjectionVocabulary,
    LocalRewriter,
    causal_lm_from_mllm,
    inject_errors,
    normalize,
)
from bpo.bootstrap.weaken import WeakenConfig, stream_seed, weakened_answers
from bpo.data import (
    BadRecord,
    ImageError,
    PairWriter,
    PreferencePair,
    Sample,
    load_image,
    pair_key,
    read_bad_records,
    read_llava,
    read_pairs,
    remove_image_placeholder,
    resolve_image_path,
)
from bpo.endpoint import EndpointConfig
from bpo.models.load import ModelConfig

REJECT_PREFIX = "rejected_"


@dataclass
class WeakenMethod(WeakenConfig):
    """The `weaken:` section: WeakenConfig's fields plus an on/off switch."""

    enabled: bool = True


@dataclass
class InjectMethod:
    """The `inject:` section: who rewrites the gold answer, and how rewrites are validated."""

    enabled: bool = True
    # "lexical": deterministic vocabulary edits; "self": the MLLM's own language model;
    # "local": the causal LM at `model`; "endpoint": an OpenAI-compatible server (`endpoint`).
    kind: Literal["lexical", "self", "local", "endpoint"] = "self"
    mode: Literal["description", "qa"] = "description"  # rewrite the answer alone, or given the Q
    vocabulary: Literal["coco", "shapeworld"] = "coco"  # lexical only
    num_edits: int = 1  # lexical only
    seed: int = 0  # keys the lexical edits (with the sample's global index)
    model: str | None = None  # kind "local": a causal LM folder or hub name
    max_new_tokens: int = 256  # "self"/"local"
    temperature: float = 0.7  # "self"/"local"; 0 is greedy (and then batch-independent)
    top_p: float = 0.9  # "self"/"local"
    endpoint: EndpointConfig = field(default_factory=lambda: EndpointConfig(temperature=0.7))
    min_ratio: float = 0.5  # rewrite length in words over the gold's: rejected below...
    max_ratio: float = 2.0  # ...or above


@dataclass
class BootstrapConfig:
    """A `bpo bootstrap` run: the `run:` section of configs/bootstrap/*.yaml."""

    model: ModelConfig
    data: str  # LLaVA conversation file (.json list or JSON Lines)
    image_root: str | None = None  # the data's image paths are relative to it (default: data's dir)
    out: str = "runs/bootstrap"
    weaken: WeakenMethod = field(default_factory=WeakenMethod)
    inject: InjectMethod = field(default_factory=InjectMethod)
    batch_size: int = 8  # rows per model.generate call
    chunk_size: int = 64  # samples read, processed and written together
    num_shards: int = 1
    shard_index: int = 0  # this run makes the pairs of samples with global index % N == i
    # Keep a negative only if rejected/chosen tokens is within [1/r, r]; null keeps all.
    max_length_ratio: float | None = None
    limit: int | None = None  # only the first `limit` samples of the file (smoke runs)
    shard_size: int = 1000  # pairs per output file
    # "transformers": generate in the loaded model; "vllm": weakened negatives and "self"
    # rewrites in an offline vLLM engine (a CUDA GPU and `pip install 'bpo[vllm]'`).
    backend: Backend = "transformers"
    vllm: VllmConfig = field(default_factory=VllmConfig)  # the engine's options (backend "vllm")


# Fields that change where or how fast output is written, never what it holds.
NOT_IN_STORE_CONFIG = ("out", "chunk_size", "shard_size")


def store_config(config: BootstrapConfig) -> dict[str, Any]:
    """What the store records: everything that changes the pairs, and the shard position.

    The backend is recorded only when it is "vllm", so stores made before it existed still resume.
    """
    recorded = {k: v for k, v in asdict(config).items() if k not in NOT_IN_STORE_CONFIG}
    if config.inject.kind != "endpoint":
        del recorded["inject"]["endpoint"]
    if config.backend == "transformers":
        del recorded["backend"], recorded["vllm"]
    else:
        del recorded["vllm"]["gpu_memory_utilization"]  # changes speed, not the pairs
    return {"stage": "bootstrap", **recorded}


def _check(config: BootstrapConfig, engine_given: bool = False) -> None:
    if config.num_shards < 1 or not 0 <= config.shard_index < config.num_shards:
        raise ValueError(
            f"shard_index must be in [0, num_shards); got shard_index={config.shard_index}, "
            f"num_shards={config.num_shards}"
        )
    if config.max_length_ratio is not None and config.max_length_ratio < 1:
        raise ValueError(f"max_length_ratio must be >= 1, got {config.max_length_ratio}")
    if config.batch_size < 1 or config.chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be at least 1")
    if not (config.weaken.enabled or config.inject.enabled):
        raise ValueError("both methods are disabled; enable weaken or inject")
    if config.inject.enabled and config.inject.kind == "local" and not config.inject.model:
        raise ValueError("inject.kind 'local' needs inject.model (a causal LM folder or name)")
    if not engine_given:
        check_backend(config.backend)  # a missing vllm fails here, before the store is opened


# --- Length distributions -----------------------------------------------------------------------


def _quantile(histogram: Counter, q: float) -> float:
    """Nearest-rank quantile of the values counted in `histogram`."""
    total, rank, seen = sum(histogram.values()), 0, 0
    rank = max(1, math.ceil(q * total))
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return value
    raise ValueError("empty histogram")


def _summary(histogram: Counter) -> dict[str, float]:
    total = sum(histogram.values())
    mean = sum(v * n for v, n in histogram.items()) / total
    return {
        "mean": round(mean, 4),
        "p50": _quantile(histogram, 0.5),
        "p90": _quantile(histogram, 0.9),
        "max": max(histogram),
    }


def length_stats(pairs: Iterable[PreferencePair]) -> dict[str, dict[str, Any]]:
    """Per source: pairs, and mean/p50/p90/max of chosen and rejected tokens and of their ratio.

    The ratio is rejected over chosen tokens, rounded to 0.01 (histograms keep memory flat).
    """
    hists: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for pair in pairs:
        if pair.chosen_tokens is None or pair.rejected_tokens is None:
            continue
        h = hists[pair.source]
        h["chosen_tokens"][pair.chosen_tokens] += 1
        h["rejected_tokens"][pair.rejected_tokens] += 1
        h["ratio"][round(pair.rejected_tokens / max(1, pair.chosen_tokens), 2)] += 1
    return {
        source: {"pairs": sum(h["ratio"].values()), **{k: _summary(v) for k, v in h.items()}}
        for source, h in sorted(hists.items())
    }


def finalize_stats(writer: PairWriter) -> None:
    """Rebuild the manifest's reject counts and length distributions from the store's files."""
    rejects = Counter(
        bad.reason
        for bad in read_bad_records(writer.out_dir)
        if bad.reason.startswith(REJECT_PREFIX)
    )
    for reason, n in rejects.items():
        writer.count(reason, n - writer.other_counts[reason])
    writer.stats["lengths"] = length_stats(read_pairs(writer.out_dir))


# --- The run ------------------------------------------------------------------------------------


@dataclass
class _Item:
    """A sample of this shard with work left, and what it needs."""

    sample: Sample
    index: int  # global index among the file's samples
    pending: set[str]  # pair keys still to make
    image: Any = None


@dataclass
class _Candidate:
    item: _Item
    source: str
    sample_index: int
    text: str | None
    reason: str | None  # why `text` is None
    meta: dict[str, Any]


def _where(sample: Sample) -> str:
    return f"{sample.meta.get('file')} line {sample.meta.get('line')} (id={sample.id})"


def _reject_record(candidate: _Candidate, reason: str, detail: str) -> BadRecord:
    sample = candidate.item.sample
    key = pair_key(sample.id, candidate.source, candidate.sample_index)
    return BadRecord(
        file=str(sample.meta.get("file")),
        line=sample.meta.get("line"),
        id=key,
        reason=f"{REJECT_PREFIX}{candidate.source}_{reason}",
        message=f"{_where(sample)}: {candidate.source} negative {key} rejected ({reason}): {detail}",
    )


def _keys(sample: Sample, config: BootstrapConfig) -> list[str]:
    keys = []
    if config.weaken.enabled and (sample.image is not None or sample.pil_image is not None):
        keys += [pair_key(sample.id, "weaken", j) for j in range(config.weaken.samples_per_prompt)]
    if config.inject.enabled:
        keys.append(pair_key(sample.id, "inject", 0))
    return keys


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
    suffix = f"#turn{sample.meta.get('turn')}"
    return sample.id[: -len(suffix)] if sample.id.endswith(suffix) else sample.id


def _load_images(items: list[_Item], image_root: Path, report: Callable) -> list[_Item]:
    """The items whose image loads (or that have none); a bad image is reported and dropped.

    The turns of one record share its image: it is decoded once, and reported once, by record.
    """
    kept, cache = [], {}
    for item in items:
        sample = item.sample
        if sample.pil_image is not None:
            item.image = sample.pil_image
        elif sample.image is not None:
            if sample.image not in cache:
                try:
                    cache[sample.image] = load_image(resolve_image_path(image_root, sample.image))
                except ImageError as error:
                    cache[sample.image] = error
            item.image = cache[sample.image]
        if isinstance(item.image, ImageError):
            report(
                BadRecord(
                    file=str(sample.meta.get("file")),
                    line=sample.meta.get("line"),
                    id=_record_id(sample),
                    reason=item.image.reason,
                    message=f"{sample.meta.get('file')} line {sample.meta.get('line')} "
                    f"(id={_record_id(sample)}): {item.image}",
                )
            )
            continue
        kept.append(item)
    return kept


class _Bootstrapper:
    """The models and settings of one run; `process(items)` makes one chunk's pairs."""

    def __init__(self, config: BootstrapConfig, model: Any, processor: Any, generator: Any = None):
        """model: the MLLM (transformers), or with backend "vllm" the encoder of noised images.

        generator: with backend "vllm", the `VllmGenerator` that generates.
        """
        self.config, self.model, self.processor = config, model, processor
        self.generator = generator
        self.weaken = WeakenConfig(
            **{f.name: getattr(config.weaken, f.name) for f in fields(WeakenConfig)}
        )
        self.rewriter: Any = None
        self.vocabulary = None
        inject = config.inject
        if not inject.enabled:
            return
        if inject.kind == "lexical":
            self.vocabulary = getattr(InjectionVocabulary, inject.vocabulary)()
        elif inject.kind == "endpoint":
            self.rewriter = EndpointRewriter(inject.endpoint, inject.min_ratio, inject.max_ratio)
        else:
            options = {
                "max_new_tokens": inject.max_new_tokens,
                "temperature": inject.temperature,
                "top_p": inject.top_p,
                "batch_size": config.batch_size,
                "min_ratio": inject.min_ratio,
                "max_ratio": inject.max_ratio,
                "seed": inject.seed,
            }
            if inject.kind == "self" and generator is not None:
                from bpo.bootstrap.vllm_backend import VllmRewriter

                tokenizer, template = self._own_tokenizer()
                self.rewriter = VllmRewriter(
                    generator, tokenizer, chat_template=template, **options
                )
            else:
                lm, tokenizer, template = self._rewriting_lm()
                self.rewriter = LocalRewriter(lm, tokenizer, chat_template=template, **options)

    def _own_tokenizer(self) -> tuple[Any, str | None]:
        """The MLLM's tokenizer and chat template (what "self" rewriting prompts with)."""
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        template = tokenizer.chat_template or getattr(self.processor, "chat_template", None)
        return tokenizer, template

    def _rewriting_lm(self) -> tuple[Any, Any, str | None]:
        inject = self.config.inject
        if inject.kind == "self":
            tokenizer, template = self._own_tokenizer()
            return causal_lm_from_mllm(self.model), tokenizer, template
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from bpo.models.load import resolve_device, resolve_dtype

        device = resolve_device(self.config.model.device)
        lm = AutoModelForCausalLM.from_pretrained(
            inject.model, dtype=resolve_dtype(self.config.model.dtype, device)
        ).to(device)
        return lm.eval(), AutoTokenizer.from_pretrained(inject.model), None

    def close(self) -> None:
        if isinstance(self.rewriter, EndpointRewriter):
            self.rewriter.close()

    def _weakened(self, items: list[_Item]) -> list[_Candidate]:
        todo = [i for i in items if any(k.split(":")[-2] == "weaken" for k in i.pending)]
        if not todo:
            return []
        requests = [{"messages": i.sample.messages, "image": i.image} for i in todo]
        indices = [i.index for i in todo]
        if self.generator is not None:
            answers = self.generator.weakened(requests, self.weaken, indices=indices)
        else:
            answers = weakened_answers(
                self.model,
                self.processor,
                requests,
                self.weaken,
                batch_size=self.config.batch_size,
                indices=indices,
            )
        candidates = []
        for item, samples in zip(todo, answers, strict=True):
            for j, answer in enumerate(samples):
                reason = None
                if not normalize(answer.text):
                    reason = "empty"
                elif normalize(answer.text) == normalize(item.sample.answer):
                    reason = "identical"
                meta = {**answer.meta, "generator": self.config.model.name_or_path}
                candidates.append(_Candidate(item, "weaken", j, answer.text or None, reason, meta))
        return candidates

    def _injected(self, items: list[_Item]) -> list[_Candidate]:
        inject = self.config.inject
        todo = [i for i in items if pair_key(i.sample.id, "inject", 0) in i.pending]
        if not todo:
            return []
        golds = [i.sample.answer for i in todo]
        questions = [remove_image_placeholder(i.sample.messages[-1]["content"]) for i in todo]
        if inject.kind == "lexical":
            results = [
                inject_errors(
                    gold,
                    self.vocabulary,
                    seed=stream_seed(inject.seed, item.index, 0, "inject"),
                    num_edits=inject.num_edits,
                    min_ratio=inject.min_ratio,
                    max_ratio=inject.max_ratio,
                )
                for gold, item in zip(golds, todo, strict=True)
            ]
            generator = f"lexical:{inject.vocabulary}"
        elif inject.kind == "endpoint":
            qs = questions if inject.mode == "qa" else [None] * len(todo)
            results = [
                self.rewriter.rewrite(g, inject.mode, q) for g, q in zip(golds, qs, strict=True)
            ]
            generator = f"endpoint:{inject.endpoint.model}"
        else:
            qs = questions if inject.mode == "qa" else None
            indices = [i.index for i in todo]
            results = self.rewriter.rewrite_all(golds, inject.mode, qs, indices=indices)
            generator = inject.model if inject.kind == "local" else self.config.model.name_or_path
        candidates = []
        for item, result in zip(todo, results, strict=True):
            meta = {
                "kind": inject.kind,
                "mode": inject.mode,
                "generator": generator,
                "seed": inject.seed,
                "edits": result.edits,
            }
            candidates.append(_Candidate(item, "inject", 0, result.text, result.reason, meta))
        return candidates

    def _answer_tokens(self, sample: Sample, answer: str) -> int:
        from bpo.models.prompts import tokenize_prompt_and_answer

        has_image = sample.image is not None or sample.pil_image is not None
        return len(
            tokenize_prompt_and_answer(self.processor, sample.messages, answer, has_image)[1]
        )

    def process(self, items: list[_Item]) -> Iterator[PreferencePair | BadRecord]:
        """This chunk's pairs and rejects, in (global index, source, sample index) order."""
        candidates = self._weakened(items) + self._injected(items)
        candidates.sort(key=lambda c: (c.item.index, c.source, c.sample_index))
        chosen_tokens: dict[int, int] = {}
        for c in candidates:
            sample = c.item.sample
            if pair_key(sample.id, c.source, c.sample_index) not in c.item.pending:
                continue  # written before a kill; the rest of the sample's pairs still go out
            if c.text is None:
                yield _reject_record(c, c.reason or "empty", "the rewrite failed validation")
                continue
            if c.item.index not in chosen_tokens:
                chosen_tokens[c.item.index] = self._answer_tokens(sample, sample.answer)
            chosen = chosen_tokens[c.item.index]
            rejected = self._answer_tokens(sample, c.text)
            ratio = self.config.max_length_ratio
            if ratio is not None and not 1 / ratio <= rejected / chosen <= ratio:
                detail = f"{rejected} tokens vs the gold's {chosen}, outside ratio {ratio}"
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


def _count_shard_samples(config: BootstrapConfig) -> int:
    records = read_llava(config.data, check_images=False)
    return sum(1 for _ in _shard_samples(records, config, lambda _bad: None))


def run_bootstrap(
    config: BootstrapConfig,
    overwrite: bool = False,
    model_and_processor: tuple[Any, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda _msg: None,
    engine_factory: Callable[[ModelConfig, VllmConfig], Any] | None = None,
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
    from bpo.data import read_manifest
    from bpo.utils.console import progress_bar

    _check(config, engine_given=engine_factory is not None)
    data = Path(config.data)
    image_root = Path(config.image_root) if config.image_root else data.parent
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
        generator = None
        if config.backend == "vllm":
            generator = _vllm_generator(config, model_and_processor, engine_factory)
            model_and_processor = (generator.encoder, generator.processor)
        elif model_and_processor is None:
            from bpo.models.load import load_from_config

            model_and_processor = load_from_config(config.model)
        bootstrapper = _Bootstrapper(config, *model_and_processor, generator=generator)
        # Images are loaded here, in the chunk, not by the reader: each is decoded once.
        records = read_llava(data, image_root, check_images=False)
        try:
            with progress_bar("bootstrap", total, enabled=progress) as advance:
                chunk: list[_Item] = []

                def flush() -> None:
                    for out in bootstrapper.process(
                        _load_images(chunk, image_root, writer.report_bad)
                    ):
                        if isinstance(out, BadRecord):
                            writer.report_bad(out)
                        else:
                            writer.write(out)
                    for _ in chunk:
                        advance(0)
                    chunk.clear()

                for index, sample in _shard_samples(records, config, writer.report_bad):
                    pending = {k for k in _keys(sample, config) if k not in done}
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


def _vllm_generator(
    config: BootstrapConfig,
    model_and_processor: tuple[Any, Any] | None,
    engine_factory: Callable[[ModelConfig, VllmConfig], Any] | None,
) -> Any:
    """The VllmGenerator of a run: the encoder of noised images (if weakening), then the engine."""
    from bpo.bootstrap.vllm_backend import VllmGenerator, make_engine

    if model_and_processor is None:
        return VllmGenerator.from_config(
            config.model,
            config.vllm,
            batch_size=config.batch_size,
            with_encoder=config.weaken.enabled,
            engine_factory=engine_factory,
        )
    encoder, processor = model_and_processor
    engine = (engine_factory or make_engine)(config.model, config.vllm)
    return VllmGenerator(engine, processor, encoder, batch_size=config.batch_size)


def merge_bootstrap_stores(
    shard_dirs: list[str | Path], out: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """`merge_stores` over the shards of a bootstrap run, then the merged length distributions."""
    from bpo.data import merge_stores, read_manifest

    manifest = merge_stores(shard_dirs, out, overwrite=overwrite)
    with PairWriter(out, manifest["config"], shard_size=manifest["shard_size"]) as writer:
        finalize_stats(writer)
    return read_manifest(out)
