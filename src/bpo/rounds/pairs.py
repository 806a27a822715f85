"""A round's pair store joining its own weakened negatives with round 1's injected ones.

With `inject_model: base`, round k >= 2 bootstraps only weakened negatives from its policy
(OUT/round-k/weaken/), and OUT/round-k/pairs/ holds them followed by round 1's injected pairs and
injection rejects: what `bpo bootstrap` with both methods would give if the base model rewrote
the answers again, without loading or running it. The join is made from the two complete stores,
so it is remade whole when a kill left it incomplete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bpo.bootstrap.stats import REJECT_PREFIX, finalize_stats
from bpo.data.store import (
    MANIFEST,
    PairWriter,
    open_store,
    read_bad_records,
    read_manifest,
    read_pairs,
)

INJECT = "inject"


def joined_config(weaken_store: Path, inject_store: Path, k: int) -> dict[str, Any]:
    """What the joined store records: both stores' configs and where they are.

    `data` and `image_root` are repeated at the top, where readers of a store find its images.
    """
    weaken = read_manifest(weaken_store)["config"]
    injected = read_manifest(inject_store)["config"]
    return {
        "stage": "rounds",
        "round": k,
        "data": weaken.get("data"),
        "image_root": weaken.get("image_root"),
        "weaken_from": str(weaken_store),
        "weaken": weaken,
        "inject_from": str(inject_store),
        "inject": injected.get("inject"),
        "inject_model": injected.get("model"),
    }


def _is_done(out: Path, config: dict[str, Any]) -> bool:
    if not (out / MANIFEST).is_file():
        return False
    manifest = read_manifest(out)
    return bool(manifest["complete"]) and manifest["config"] == json.loads(json.dumps(config))


def join_injected(weaken_store: Path, inject_store: Path, out: Path, k: int) -> dict[str, Any]:
    """Write OUT: the weakened pairs and bad records of `weaken_store`, then the injected pairs
    and injection rejects of `inject_store`; returns its manifest (reused when complete)."""
    weaken = open_store(weaken_store)
    open_store(inject_store)
    config = joined_config(weaken_store, inject_store, k)
    if _is_done(out, config):
        return read_manifest(out)
    with PairWriter(out, config, shard_size=weaken["shard_size"], overwrite=True) as writer:
        for pair in read_pairs(weaken_store):
            writer.write(pair)
        for bad in read_bad_records(weaken_store):
            writer.report_bad(bad)
        for pair in read_pairs(inject_store):
            if pair.source == INJECT:
                writer.write(pair)
        for bad in read_bad_records(inject_store):
            if bad.reason.startswith(f"{REJECT_PREFIX}{INJECT}_"):
                writer.report_bad(bad)
        finalize_stats(writer)
    return read_manifest(out)
