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

Where the chunks are made: in this process (one model), or, with a `ray:` section, in model
replicas on a Ray cluster (`bpo.bootstrap.ray_run`); either way this process reads, skips and cuts
the chunks, and writes their records in order, so both make the same store and each resumes the
other's. A chunk's pairs are made by `bpo.bootstrap.chunk`.

Memory stays flat in a local run: samples are read one at a time and processed `chunk_size` at a
time, their images decoded `batch_size` at a time (each batch's let go before the next is
decoded, so a chunk of large images never sits in memory at once); only the store's key sets, the
reader's ids and a histogram of lengths grow, by a few bytes a pair. A Ray run also holds the
pending samples' text (not their images) while the cluster works through them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from bpo.bootstrap.chunk import Bootstrapper, Item, Unit, Work, chunk_outputs, make_backend
from bpo.bootstrap.config import BootstrapConfig, check_config, store_config, weaken_steps
from bpo.bootstrap.stats import REJECT_PREFIX, finalize_stats
from bpo.data import (
    BadRecord,
    PairWriter,
    PreferencePair,
    Sample,
    merge_stores,
    pair_key,
    read_bad_records,
    read_llava,
    read_manifest,
)
from bpo.generate.vllm_backend import EngineFactory
from bpo.models.load import check_family
from bpo.utils.console import progress_bar

Outputs = list[PreferencePair | BadRecord]


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


def _units(
    records: Iterator[Sample | BadRecord], config: BootstrapConfig, done: set[str]
) -> Iterator[Unit]:
    """This shard's samples with work left, `chunk_size` a unit, as the reader yields them."""
    unit, bad = Unit(), []  # `bad` collects the reader's bad records until the next unit goes
    for index, sample in _shard_samples(records, config, bad.append):
        pending = {
            (source, k)
            for source, k in _work(sample, config)
            if pair_key(sample.id, source, k) not in done
        }
        if not pending:
            unit.skipped += 1
            continue
        unit.items.append(Item(sample, index, pending))
        if len(unit.items) >= config.chunk_size:
            unit.bad = bad.copy()  # `bad` itself stays the reader's callback's list
            bad.clear()
            yield unit
            unit = Unit()
    unit.bad = bad
    yield unit


def _local_outputs(
    config: BootstrapConfig,
    units: Iterable[Unit],
    image_root: Path,
    model_and_processor: tuple[Any, Any] | None,
    engine_factory: EngineFactory | None,
) -> Iterator[tuple[Unit, Outputs]]:
    """Each unit with its records, made in this process by one model."""
    bootstrapper = Bootstrapper(config, *make_backend(config, model_and_processor, engine_factory))
    try:
        for unit in units:
            yield unit, chunk_outputs(bootstrapper, unit.items, image_root) if unit.items else []
    finally:
        bootstrapper.close()


def _outputs(
    config: BootstrapConfig,
    units: Iterator[Unit],
    image_root: Path,
    model_and_processor: tuple[Any, Any] | None,
    engine_factory: EngineFactory | None,
) -> Iterator[tuple[Unit, Outputs]]:
    """Each unit with its records, in the units' order: made here, or by the Ray replicas."""
    if config.ray is None:
        return _local_outputs(config, units, image_root, model_and_processor, engine_factory)
    if model_and_processor is not None or engine_factory is not None:
        raise ValueError(
            "a Ray run loads its model in every replica from `model:`; pass neither "
            "model_and_processor nor engine_factory with a `ray:` section"
        )
    from bpo.bootstrap.ray_run import ray_outputs  # ray: only for a Ray run

    return ray_outputs(config, units, image_root)


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
    With a `ray:` section the chunks are made by model replicas on a Ray cluster and written
    here, in the order this process would make them: the same store, and resumable the same way
    (a Ray run resumes a local run's store and the other way round).

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
        # Images are decoded where the chunk is made, a batch at a time, not by the reader.
        units = _units(read_llava(data, image_root, check_images=False), config, done)
        outputs = _outputs(config, units, image_root, model_and_processor, engine_factory)
        # closing: a failed write stops the replicas (or frees the model) now, not when the
        # traceback that holds this frame is dropped.
        with closing(outputs), progress_bar("bootstrap", total, enabled=progress) as advance:
            for unit, records in outputs:
                for bad in unit.bad:
                    writer.report_bad(bad)
                for record in records:
                    if isinstance(record, BadRecord):
                        writer.report_bad(record)
                    else:
                        writer.write(record)
                for _ in range(unit.skipped + len(unit.items)):
                    advance(0)
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
