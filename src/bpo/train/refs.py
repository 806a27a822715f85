"""Reference log-probs: one pass of the frozen reference over the pairs, cached beside them.

DPO compares the policy with a frozen reference. The reference's summed answer log-probs are
computed once, stored with the pairs, and read back by training, which then runs no reference
forward (and holds no second model in memory). Training scores the starting model before any
weight is wrapped or trained. (The official code scored the reference as "policy with adapters
disabled" while its projector trained outside the adapter, so its reference drifted; scoring it
first rules that out.) The reference runs in the weights' own dtype, so with bf16 autocast over
fp32 weights the first step's rewards are near 0, not 0.

Layout, inside a pair store directory:

    refs/<fingerprint>.meta.json   what the fingerprint hashes: model identity, dtype, tokenization
    refs/<fingerprint>.jsonl       one RefEntry per line, keyed by `PreferencePair.key`
    refs/.lock                     held while a pass writes, so two passes never interleave lines

(`bpo.train.ref_files` reads and checks the files.)

The fingerprint (`bpo.train.fingerprint`) hashes everything besides the pair itself that changes
the numbers, so a different model or setting lands in another file: nothing is reused across
them. Each entry also carries a `pair_hash` over the pair's prompt, image path, image content and
both answers; an entry whose hash no longer matches the pair in the store is stale and is
recomputed, never reused. A copied image folder (new mtimes) is rehashed once, and unchanged
content keeps its entries.

Every pair is scored by `bpo.train.data.score_pairs`, through the PairDataset and Collator
training uses, so a pair is tokenized, padded and scored one way whether its reference is cached
or computed in memory. The pass is a forward only (`bpo.train.logprobs.scoring_mode`): in
inference mode, only answer positions through the LM head, and the pairs of one sample (image,
prompt, chosen answer) in one row `[prefix | chosen | rejected_1 | ... ]` (`bpo.train.groups`),
so the image and prefix run once per sample; its numbers are training's pair rows' to float
rounding, so entries written by earlier passes stay valid.

With the image-contrast term on (`loss.image_weight > 0`), each entry also holds
`ref_noised_chosen_logp`, the chosen answer on the pair's noised image (`bpo.train.image_noise`),
scored in a `[prompt | chosen]` row per pair as training scores it. The run's noise settings
extend the fingerprint and each pair's noise key its pair_hash, only then: caches made with the
term off stay valid, and changing the noise recomputes.

With a dense preference (`loss.shared_token_weight` < 1) the entries hold the weighted scores the
preference terms compare (`bpo.train.batch.shared_token_weights`), under a fingerprint that names
the weight; the pairs are scored a pair row each (a group row has one chosen block, and the
chosen answer's weights depend on the negative).

A pass appends and flushes every batch, so a killed pass resumes where it stopped (a half-written
last line is cut). The last line for a key wins; when lines were superseded or their pairs left the
store, the file is rewritten (atomically) with exactly the store's entries.

Pairs whose image is missing, corrupt or outside the image root, that cannot be encoded, or whose
log-probs are not finite get no entry: they are returned in `RefsTable.bad` with the pair key and
the reason, for the caller to report. Under multi-process training the pass runs on the main
process, and the others load its result with `load_reference_logps` (`training_pairs` does both).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image
from torch import nn

from bpo.data.files import (
    append_json_lines,
    json_line,
    lock_directory,
    truncate_partial_line,
    write_atomic,
)
from bpo.data.images import ImageError
from bpo.data.records import PreferencePair
from bpo.data.store import open_store, read_pairs
from bpo.train.config import TrainConfig, dense_weight
from bpo.train.data import (
    ALLOW_INCOMPLETE,
    BadPair,
    PairDataset,
    PairScore,
    check_store,
    image_bad_pair,
    load_store_pairs,
    run_dataset,
    score_pairs,
    select_pairs,
)
from bpo.train.fingerprint import (
    ImageDigests,
    model_identity,
    pair_hash,
    quantization_config,
    reference_fingerprint,
    scoring_dtype,
)
from bpo.train.image_noise import ImageNoise, NoiseMetaError, image_noise, pair_noise
from bpo.train.limits import resolve_max_length
from bpo.train.ref_files import (
    RefEntry,
    check_meta,
    load_reference_logps,
    read_entries,
    refs_paths,
)

__all__ = [
    "RefEntry",
    "RefsTable",
    "config_reference_logps",
    "ensure_reference_logps",
    "load_reference_logps",
    "refs_paths",
    "training_pairs",
    "with_reference_logps",
]


@dataclass
class RefsTable:
    """The outcome of a pass: valid entries for the store's pairs, and what it took.

    Args:
        pairs: the store's pairs that have an entry, in store order, with the `ref_*` and
            `*_tokens` fields filled: what training reads.
        entries: pair key -> RefEntry, for the same pairs.
        reused, computed: entries taken from the cache and entries computed now (stale included).
        stale: of `computed`, entries that existed but no longer matched their pair.
        bad: pair key -> why it has no entry (the image or encoding error, naming the pair);
            `bad_reasons` holds the same keys' short reasons ("missing_image", ...).
        truncated: entries with an answer cut to fit max_length.
        unscored: pair key -> the pair, for the keys of `bad` (a run filters them as its pairs).
    """

    fingerprint: str
    path: Path
    pairs: list[PreferencePair] = field(default_factory=list)
    entries: dict[str, RefEntry] = field(default_factory=dict)
    reused: int = 0
    computed: int = 0
    stale: int = 0
    bad: dict[str, str] = field(default_factory=dict)
    bad_reasons: dict[str, str] = field(default_factory=dict)
    truncated: int = 0
    unscored: dict[str, PreferencePair] = field(default_factory=dict)

    def add_bad(self, bad: BadPair, pair: PreferencePair) -> None:
        self.bad[bad.key] = bad.message
        self.bad_reasons[bad.key] = bad.reason
        self.unscored[bad.key] = pair

    def bad_pairs(
        self, sources: Sequence[str] | None = None, noise_steps: Sequence[int] | None = None
    ) -> list[BadPair]:
        """The pairs without an entry that a run of these filters would train on, as the trainer
        reports them (a run on "inject" pairs does not count a broken "weaken" pair)."""
        kept = {p.key for p in select_pairs(self.unscored.values(), sources, noise_steps)}
        return [
            BadPair(key, self.bad_reasons[key], message)
            for key, message in self.bad.items()
            if key in kept
        ]


def with_reference_logps(pair: PreferencePair, entry: RefEntry | PairScore) -> PreferencePair:
    """A copy of `pair` with the reference scores and token counts of `entry` filled in."""
    return replace(
        pair,
        ref_chosen_logp=entry.ref_chosen_logp,
        ref_rejected_logp=entry.ref_rejected_logp,
        chosen_tokens=entry.chosen_tokens,
        rejected_tokens=entry.rejected_tokens,
        ref_noised_chosen_logp=entry.ref_noised_chosen_logp,
    )


# --- the pass ------------------------------------------------------------------------------


@dataclass
class _Todo:
    pair: PreferencePair
    pair_hash: str
    image: dict[str, Any] | None


def _plan(
    pairs_dir: Path,
    image_root: Path,
    stored: dict[str, RefEntry],
    table: RefsTable,
    noise: ImageNoise | None,
) -> tuple[list[PreferencePair], list[_Todo], bool]:
    """Sort the store's pairs into reusable (into `table.entries`), to compute, and bad.

    Returns (the pairs, the work to do, whether a reused entry's image stamp changed).
    """
    digests = ImageDigests(image_root)
    pairs, todo, restamped = [], [], False
    for pair in read_pairs(pairs_dir):
        pairs.append(pair)
        entry = stored.get(pair.key)
        try:
            image = digests.stamp(pair.image, entry and entry.image) if pair.image else None
        except ImageError as exc:
            table.add_bad(image_bad_pair(pair, exc), pair)
            continue
        try:
            key = pair_noise(pair, noise).as_json() if noise is not None else None
        except NoiseMetaError as exc:
            table.add_bad(BadPair(pair.key, exc.reason, str(exc)), pair)
            continue
        current = pair_hash(pair, image and image["sha256"], key)
        if entry is not None and entry.pair_hash == current:
            if entry.image != image:
                # Same content, new mtime (a copied folder): keep the scores, store the new stamp.
                entry, restamped = replace(entry, image=image), True
            table.entries[pair.key] = entry
            table.reused += 1
            continue
        table.stale += entry is not None
        todo.append(_Todo(pair, current, image))
    return pairs, todo, restamped


def _compute(
    model: Any,
    dataset: PairDataset,
    todo: list[_Todo],
    batch_size: int,
    progress: bool,
    path: Path,
    table: RefsTable,
) -> None:
    """Score `todo` (the dataset's pairs) batch by batch, appending each batch's entries to `path`."""
    from bpo.utils.console import progress_bar

    planned = {item.pair.key: item for item in todo}
    with progress_bar("reference log-probs", len(todo), enabled=progress) as advance:

        def record(scores: list[PairScore], bad: list[BadPair]) -> None:
            entries = [
                RefEntry(
                    pair_hash=planned[s.key].pair_hash, image=planned[s.key].image, **asdict(s)
                )
                for s in scores
            ]
            # One write per batch, flushed: a kill loses at most the batch being scored.
            append_json_lines(path, [entry.to_json() for entry in entries])
            table.entries.update((entry.key, entry) for entry in entries)
            table.computed += len(entries)
            for item in bad:
                table.add_bad(item, planned[item.key].pair)
            for _ in range(len(scores) + len(bad)):
                advance(1)

        score_pairs(model, dataset, batch_size, on_batch=record)


def ensure_reference_logps(
    model: Any,
    processor: Any,
    pairs_dir: str | Path,
    image_root: str | Path,
    *,
    model_identity: dict[str, Any],
    max_length: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    recompute: bool = False,
    noise: ImageNoise | None = None,
    shared_weight: float | None = None,
) -> RefsTable:
    """Reference log-probs for every pair of a store: reuse valid entries, compute the rest.

    Missing entries are computed, stale ones (the pair changed) recomputed; the counts are in the
    returned RefsTable, with the pairs that could not be scored in `bad`. The model is scored by
    `score_pairs` and given back in the mode it came in.

    Args:
        model: the frozen reference (in training, the starting model before any update).
        image_root: the folder the pairs' image paths are relative to.
        model_identity: `bpo.train.fingerprint.model_identity(name_or_path, revision)` of the
            model's weights.
        max_length: tokens per answer branch, as training will use it (it is in the fingerprint).
        batch_size: pairs per forward.
        recompute: discard this fingerprint's stored entries and compute all anew.
        noise: with the image-contrast term on (`bpo.train.image_noise.image_noise`), each entry
            also holds the chosen answer's log-prob on the pair's noised image, in a file of its
            own fingerprint; None: off.
        shared_weight: a dense preference's weight of shared tokens: the entries hold weighted
            scores, in a file of their own fingerprint; None: off (plain scores).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pairs_dir, image_root = Path(pairs_dir), Path(image_root)
    check_store(pairs_dir)  # before refs/ is made: a mistyped folder must not come into being
    fingerprint, parts = reference_fingerprint(
        model_identity,
        processor,
        max_length=max_length,
        dtype=scoring_dtype(model),
        quantization=quantization_config(model),
        image_noise=noise.fingerprint_part() if noise is not None else None,
        shared_token_weight=shared_weight,
    )
    path, meta_path = refs_paths(pairs_dir, fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = RefsTable(fingerprint=fingerprint, path=path)
    with lock_directory(path.parent, busy="wait for that reference pass to finish"):
        check_meta(meta_path, fingerprint, parts)
        if recompute:
            path.unlink(missing_ok=True)
        stored, lines = {}, 0
        if path.is_file():
            truncate_partial_line(path)
            stored, lines = read_entries(path)
        pairs, todo, restamped = _plan(pairs_dir, image_root, stored, table, noise)
        if todo:
            todo_pairs = [t.pair for t in todo]
            dataset = PairDataset(
                todo_pairs, processor, image_root, None, max_length, noise, shared_weight
            )
            _compute(model, dataset, todo, batch_size, progress, path, table)
        # Keep the entries in store order, for the pairs that have one.
        table.entries = {p.key: table.entries[p.key] for p in pairs if p.key in table.entries}
        if restamped or lines + table.computed != len(table.entries) or not path.is_file():
            # Superseded lines, pairs gone from the store, or new image stamps: rewrite the file
            # so it holds exactly one line per pair (and exists, for the processes that read it).
            text = b"".join(json_line(e.to_json()) for e in table.entries.values())
            write_atomic(path, text.decode("utf-8"))
    table.pairs = [
        with_reference_logps(p, table.entries[p.key]) for p in pairs if p.key in table.entries
    ]
    table.truncated = sum(entry.truncated for entry in table.entries.values())
    return table


# --- the pairs of a run ---------------------------------------------------------------------


def config_reference_logps(
    config: TrainConfig, model: nn.Module, processor: Any, recompute: bool = False
) -> RefsTable:
    """`ensure_reference_logps` for a training config's store, model and tokenization: what
    `bpo train` reads and `bpo refs` writes. `max_length: null` is resolved from the model first,
    as `train` resolves it, so both key the cache alike. A store whose bootstrap did not finish
    is refused, before the model is used, unless `config.allow_incomplete`."""
    check_store(config.pairs)  # a mistyped run.pairs, or an empty store, named as such
    open_store(config.pairs, config.allow_incomplete, ALLOW_INCOMPLETE)
    config = resolve_max_length(config, model)
    return ensure_reference_logps(
        model,
        processor,
        config.pairs,
        config.image_root,
        model_identity=model_identity(config.model.name_or_path, config.model.revision),
        max_length=config.max_length,
        batch_size=config.reference_batch_size,
        recompute=recompute,
        noise=image_noise(config),
        shared_weight=dense_weight(config.loss),
    )


def _store_pairs_with_refs(
    config: TrainConfig, model: nn.Module, processor: Any, accelerator: Any, log: Callable
) -> tuple[list[PreferencePair], list[BadPair]]:
    """The store's pairs with reference log-probs, cached in the store.

    One pass, on the main process, which trains on the pairs it returns; the other processes read
    its file once it is done.
    """
    from accelerate.utils import broadcast_object_list

    if config.image_root is None:
        raise ValueError("run.image_root is needed to score the pairs' images")
    fingerprint, pairs, bad = [None], [], []
    if accelerator.is_main_process:
        table = config_reference_logps(config, model, processor)
        log(
            f"reference log-probs: {table.reused} reused, {table.computed} computed "
            f"({table.stale} stale) in {table.path}"
        )
        fingerprint, pairs = [table.fingerprint], table.pairs
        bad = table.bad_pairs(config.sources, config.noise_steps)
    accelerator.wait_for_everyone()
    (fingerprint,) = broadcast_object_list(fingerprint)
    if not accelerator.is_main_process:
        entries = load_reference_logps(config.pairs, fingerprint)
        pairs = [
            with_reference_logps(p, entries[p.key])
            for p in load_store_pairs(config.pairs, allow_incomplete=config.allow_incomplete)
            if p.key in entries
        ]
    return select_pairs(pairs, config.sources, config.noise_steps), bad


def training_pairs(
    config: TrainConfig,
    model: nn.Module,
    processor: Any,
    pairs: Sequence[PreferencePair] | None,
    images: Mapping[str, Image.Image] | None,
    accelerator: Any,
    log: Callable,
) -> tuple[list[PreferencePair], list[BadPair]]:
    """The pairs a run trains on (with their reference log-probs for DPO) and the unusable ones.

    Call it before any adapter or trainable weight exists: the reference is the starting model.

    In-memory pairs are scored here, unless every one already carries `ref_chosen_logp` and
    `ref_rejected_logp` (and, with the image-contrast term on, `ref_noised_chosen_logp`): the
    caller then vouches they are this model's, under this max_length, noise and
    `loss.shared_token_weight`.
    """
    from accelerate.utils import gather_object

    if pairs is None:
        if config.pairs is None:
            raise ValueError("no pairs: set run.pairs (a pair store folder) or pass pairs=")
        if config.method == "sft":
            pairs = load_store_pairs(
                config.pairs, config.sources, config.noise_steps, config.allow_incomplete
            )
            return pairs, []
        return _store_pairs_with_refs(config, model, processor, accelerator, log)
    pairs = select_pairs(pairs, config.sources, config.noise_steps)
    noise = image_noise(config)
    scored = all(
        p.ref_chosen_logp is not None
        and p.ref_rejected_logp is not None
        and (noise is None or p.ref_noised_chosen_logp is not None)
        for p in pairs
    )
    if config.method == "sft" or scored:
        return pairs, []
    dataset = run_dataset(config, pairs, processor, images)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = range(rank, len(dataset), world)
    scores, bad = score_pairs(model, dataset, config.reference_batch_size, mine)
    if world > 1:
        scores, bad = gather_object(scores), gather_object(bad)
    by_key = {score.key: score for score in scores}
    log(f"reference log-probs: {len(by_key)} pairs")
    return [with_reference_logps(p, by_key[p.key]) for p in pairs if p.key in by_key], bad
