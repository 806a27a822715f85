"""Merging the stores of a sharded run (shard i of N each) into one store."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from bpo.data.store import (
    ALLOW_INCOMPLETE,
    MANIFEST,
    ConfigMismatchError,
    DuplicateKeyError,
    PairWriter,
    StoreError,
    config_differences,
    read_bad_records,
    read_manifest,
    read_pairs,
)

# Config keys that may differ between the stores `merge_stores` combines.
SHARD_KEYS = ("shard_index", "num_shards")


def _check_mergeable(
    directories: list[Path], manifests: list[dict[str, Any]], allow_incomplete: bool
) -> dict[str, Any]:
    """The shared config of the stores, less SHARD_KEYS; errors name the store and the key."""
    bases = [{k: v for k, v in m["config"].items() if k not in SHARD_KEYS} for m in manifests]
    for directory, manifest, base in zip(directories, manifests, bases, strict=True):
        if not manifest["complete"] and not allow_incomplete:
            raise StoreError(
                f"{directory} is not complete (its run stopped early); finish it by re-running "
                f"that shard, or {ALLOW_INCOMPLETE}"
            )
        diffs = config_differences(bases[0], base)
        if diffs:
            raise ConfigMismatchError(
                f"{directory} was made with a different config than {directories[0]} "
                f"({'; '.join(d.replace('(stored)', '(first)') for d in diffs)}); only "
                f"{', '.join(SHARD_KEYS)} may differ between merged stores"
            )
    _check_shard_coverage(manifests, allow_incomplete)
    return bases[0]


def _check_shard_coverage(manifests: list[dict[str, Any]], allow_incomplete: bool) -> None:
    indexes = [m["config"].get("shard_index") for m in manifests]
    totals = {m["config"].get("num_shards") for m in manifests}
    if None in indexes or len(totals) != 1:
        return
    repeated = sorted(i for i, n in Counter(indexes).items() if n > 1)
    if repeated:
        raise ConfigMismatchError(
            f"shard_index {repeated} given more than once; merge each shard once"
        )
    missing = sorted(set(range(totals.pop())) - set(indexes))
    if missing and not allow_incomplete:
        raise StoreError(
            f"shards {missing} are missing from the merge; add them, or {ALLOW_INCOMPLETE}"
        )


def merge_stores(
    store_dirs: list[str | Path],
    out_dir: str | Path,
    shard_size: int = 1000,
    overwrite: bool = False,
    allow_incomplete: bool = False,
) -> dict[str, Any]:
    """Combine the stores of a sharded run (shard i of N each) into one; returns its manifest.

    Configs must match except for `shard_index`/`num_shards`; a pair key found in two stores
    raises DuplicateKeyError. Pairs keep the order of `store_dirs`; bad records and counters
    are summed.

    Args:
        allow_incomplete: merge stores whose run did not finish, or an incomplete set of shards.
    """
    directories = [Path(d) for d in store_dirs]
    if not directories:
        raise ValueError("merge_stores needs at least one store directory")
    out = Path(out_dir)
    if (out / MANIFEST).exists() and not overwrite:
        raise StoreError(f"{out} already holds a store; choose a new --out or pass --overwrite")
    manifests = [read_manifest(d) for d in directories]
    config = _check_mergeable(directories, manifests, allow_incomplete)
    config["merged_from"] = [str(d) for d in directories]
    origin: dict[str, Path] = {}
    with PairWriter(out, config, shard_size=shard_size, overwrite=overwrite) as writer:
        for directory, manifest in zip(directories, manifests, strict=True):
            for pair in read_pairs(directory):
                if pair.key in origin:
                    raise DuplicateKeyError(
                        f"pair {pair.key} is in both {origin[pair.key]} and {directory}; the "
                        "shards overlap: re-run them with distinct shard_index values"
                    )
                origin[pair.key] = directory
                writer.write(pair)
            for bad in read_bad_records(directory):
                writer.report_bad(bad)
            for key, n in manifest["counts"]["other"].items():
                writer.count(key, n)
    return read_manifest(out)
