"""The pair store: sharded JSON Lines plus manifest.json, resumable after a kill, mergeable.

Layout of a store directory:
    pairs-00000.jsonl, pairs-00001.jsonl, ...   one PreferencePair per line, `shard_size` a file
    bad_records.jsonl                           one BadRecord per line
    manifest.json                               config, counts, shards, versions (rewritten atomically)

The shards and bad_records.jsonl are the truth; the manifest is a summary rebuilt from them when a
writer opens, so a kill between manifest writes loses nothing.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from bpo.data.files import (
    json_line,
    lock_directory,
    read_json_lines,
    truncate_partial_line,
    write_atomic,
)
from bpo.data.records import SCHEMA_VERSION, BadRecord, PreferencePair
from bpo.utils.versions import versions

MANIFEST = "manifest.json"
BAD_RECORDS = "bad_records.jsonl"
SHARD_RE = re.compile(r"^pairs-(\d{5,})\.jsonl$")
# How a user reads (or merges) a store whose run did not finish, from the CLI or from Python.
ALLOW_INCOMPLETE = "pass --allow_incomplete true (allow_incomplete=True in Python)"


class ConfigMismatchError(ValueError):
    """A store was written with a different config than the one given now."""


class StoreError(ValueError):
    """A store directory is damaged or is not a pair store."""


class DuplicateKeyError(ValueError):
    """The same pair key would be written twice."""


def shard_name(index: int) -> str:
    return f"pairs-{index:05d}.jsonl"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _normalize_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as it reads back from JSON (tuples become lists), so comparisons are fair."""
    try:
        return json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"store config must be JSON-serializable: {exc}") from exc


def config_differences(stored: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs, with both values, sorted."""
    if isinstance(stored, dict) and isinstance(now, dict):
        diffs = []
        for key in sorted(set(stored) | set(now)):
            name = f"{prefix}{key}"
            if key not in stored:
                diffs.append(f"{name}: absent (stored) vs {now[key]!r} (now)")
            elif key not in now:
                diffs.append(f"{name}: {stored[key]!r} (stored) vs absent (now)")
            else:
                diffs.extend(config_differences(stored[key], now[key], f"{name}."))
        return diffs
    if stored != now:
        return [f"{prefix.rstrip('.')}: {stored!r} (stored) vs {now!r} (now)"]
    return []


def _shard_paths(directory: Path) -> list[Path]:
    """The shard files in order; a gap in the numbering is damage, not something to skip."""
    indexed = []
    for path in directory.iterdir():
        match = SHARD_RE.match(path.name)
        if match:
            indexed.append((int(match.group(1)), path))
    indexed.sort()
    for expected, (index, path) in enumerate(indexed):
        if index != expected:
            raise StoreError(
                f"{directory}: shard {shard_name(expected)} is missing but {path.name} exists; "
                "restore the missing shard or start over with --overwrite"
            )
    return [path for _, path in indexed]


def _json_lines(path: Path, appended: bool) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed JSON) for each line; a bad line raises StoreError naming it."""
    return read_json_lines(
        path, appended=appended, fix="delete the line and resume", error=StoreError
    )


def _pair_from_line(path: Path, number: int, data: Any) -> PreferencePair:
    try:
        return PreferencePair.from_json(data)
    except (ValueError, TypeError) as exc:
        pair_id = data.get("id") if isinstance(data, dict) else None
        raise StoreError(f"{path} line {number} (id={pair_id}): {exc}") from exc


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a pair store; FileNotFoundError if the directory holds none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {directory} a pair store written by bpo?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path} is not valid JSON ({exc}); start over with --overwrite") from exc
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema_version {version!r}; this bpo reads version {SCHEMA_VERSION}"
        )
    return manifest


def _finish_hint(config: dict[str, Any]) -> str:
    if "merged_from" in config:
        return "rerun the same `bpo merge` command with --overwrite true"
    return "rerun the same `bpo bootstrap` command to finish it (it resumes)"


def open_store(
    directory: str | Path,
    allow_incomplete: bool = False,
    how: str = ALLOW_INCOMPLETE,
) -> dict[str, Any]:
    """The manifest of a store a stage is about to read; StoreError if its run did not finish.

    A store whose writer was killed, or is still writing, says `complete: false`: reading it
    silently would train on, export or show part of the data.

    Args:
        allow_incomplete: read such a store anyway (the pairs written so far).
        how: how the caller's user asks for that ("pass --allow_incomplete true", a config field).
    """
    manifest = read_manifest(directory)
    if not manifest.get("complete") and not allow_incomplete:
        pairs = manifest.get("counts", {}).get("pairs", "its")
        raise StoreError(
            f"{directory} is not complete (its manifest.json says complete: false): the run "
            f"writing it stopped early or is still going; {_finish_hint(manifest['config'])}, "
            f"or {how} to use the {pairs} pairs it holds"
        )
    return manifest


def store_image_root(manifest: dict[str, Any]) -> Path | None:
    """The folder a store's image paths are relative to, as the run that wrote it recorded it.

    A bootstrap store records `image_root`, or null for the data file's folder; a relative path
    is taken from the working directory, as that run took it. None when neither is recorded.
    """
    config = manifest.get("config", {})
    if config.get("image_root"):
        return Path(config["image_root"])
    if config.get("data"):
        return Path(config["data"]).parent
    return None


def image_root_for(
    directory: str | Path, manifest: dict[str, Any], image_root: str | Path | None
) -> Path:
    """The folder to read a store's images under: `image_root`, else the one the store records.

    Stages that read a store's images call it at the first pair with an image, so a store of
    text-only pairs needs no root. StoreError, saying what to pass, when there is no such folder.
    """
    if image_root is not None:
        root, what = Path(image_root), "--image_root"
    else:
        root, what = store_image_root(manifest), f"the image root {directory}'s manifest records"
    if root is None:
        raise StoreError(
            f"{directory} records no image root (its manifest config has no image_root or data); "
            "pass --image_root with the folder the pairs' image paths are relative to"
        )
    if not root.is_dir():
        raise StoreError(
            f"{root} ({what}) is not a folder; pass --image_root with the folder the pairs' "
            "image paths are relative to"
        )
    return root


def read_pairs(directory: str | Path) -> Iterator[PreferencePair]:
    """Stream every pair of a store, shard by shard, in write order.

    A half-written last line (a writer running now, or killed) is skipped; damage anywhere else
    raises StoreError naming the file and line.
    """
    shards = _shard_paths(Path(directory))
    for position, path in enumerate(shards):
        is_last = position == len(shards) - 1
        for number, data in _json_lines(path, appended=is_last):
            yield _pair_from_line(path, number, data)


def read_bad_records(directory: str | Path) -> Iterator[BadRecord]:
    """Stream the bad records a store holds (a half-written last line is skipped)."""
    path = Path(directory) / BAD_RECORDS
    if not path.is_file():
        return
    for _, data in _json_lines(path, appended=True):
        yield BadRecord.from_json(data)


def _remove_store_files(directory: Path) -> None:
    # Only files a store consists of: --overwrite must not delete anything else in the folder.
    for path in directory.iterdir():
        temporary = path.name.startswith(MANIFEST + ".") and path.name.endswith(".tmp")
        if SHARD_RE.match(path.name) or path.name in (MANIFEST, BAD_RECORDS) or temporary:
            path.unlink()


def _encode(record: dict[str, Any], what: str) -> bytes:
    try:
        return json_line(record)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serializable: {exc}") from exc


class PairWriter:
    """Write PreferencePairs to a sharded, resumable store; use as a context manager.

    Opening an existing store with the same config resumes it: a half-written last line is cut
    off, and `done_keys` holds the key (`PreferencePair.key`, i.e. `pair_key(id, source,
    sample_index)`) of every pair already written, so the caller skips that work. Writing the rest
    then gives the same shard files an uninterrupted run would. A clean exit from the `with`
    block marks the store `complete`; an exception leaves it incomplete (and resumable).

    Args:
        config: what produced the pairs (model, seeds, noise step...); JSON-serializable. A store
            with a different config raises ConfigMismatchError instead of mixing runs.
        shard_size: pairs per shard file.
        overwrite: delete an existing store's files in `out_dir` first, instead of resuming.
        max_bad_messages: how many bad-record messages the manifest quotes (all are counted).
        fsync_interval_s: at most this long between fsyncs, bounding what a power cut loses
            (a killed process loses at most the line being written: every line is flushed).
        manifest_interval_s: at most this long between manifest rewrites while writing.
    """

    def __init__(
        self,
        out_dir: str | Path,
        config: dict[str, Any],
        shard_size: int = 1000,
        overwrite: bool = False,
        max_bad_messages: int = 20,
        fsync_interval_s: float = 10.0,
        manifest_interval_s: float = 30.0,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.config = _normalize_config(config)
        self.shard_size = shard_size
        self.max_bad_messages = max_bad_messages
        self.fsync_interval_s = fsync_interval_s
        self.manifest_interval_s = manifest_interval_s
        self.complete = False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock_handle = lock_directory(self.out_dir, error=StoreError)
        try:
            self._open(overwrite)
        except BaseException:
            self._lock_handle.close()
            raise

    def _open(self, overwrite: bool) -> None:
        if overwrite:
            _remove_store_files(self.out_dir)
        manifest = self._existing_manifest()
        self.created = manifest["created"] if manifest else _now()
        self.other_counts: Counter[str] = Counter(manifest["counts"]["other"] if manifest else {})
        # Summaries a stage computes from the shards (e.g. length distributions); shown under
        # "stats" in the manifest. Not restored on resume: recompute them from the shards.
        self.stats: dict[str, Any] = {}
        self.done_keys: set[str] = set()
        self.source_counts: Counter[str] = Counter()
        self.shard_lines: list[int] = []
        self._scan_shards()
        self.bad_keys: set[str] = set()
        self.bad_reasons: Counter[str] = Counter()
        self.bad_messages: list[str] = []
        self._scan_bad_records()
        self._shard: BinaryIO | None = None
        self._bad_file = (self.out_dir / BAD_RECORDS).open("ab")
        self._last_fsync = self._last_manifest = time.monotonic()
        self.write_manifest()

    def _existing_manifest(self) -> dict[str, Any] | None:
        if not (self.out_dir / MANIFEST).is_file():
            if _shard_paths(self.out_dir) or (self.out_dir / BAD_RECORDS).exists():
                raise StoreError(
                    f"{self.out_dir} has pair files but no {MANIFEST}, so it was not written by "
                    "PairWriter; choose a new --out or pass --overwrite"
                )
            return None
        manifest = read_manifest(self.out_dir)
        diffs = config_differences(manifest["config"], self.config)
        if diffs:
            raise ConfigMismatchError(
                f"{self.out_dir} holds pairs made with a different config ({'; '.join(diffs)}); "
                "choose a new --out to keep both, or pass --overwrite to replace it"
            )
        return manifest

    def _scan_shards(self) -> None:
        shards = _shard_paths(self.out_dir)
        if shards:
            truncate_partial_line(shards[-1])
        for path in shards:
            lines = 0
            for number, data in _json_lines(path, appended=False):
                pair = _pair_from_line(path, number, data)
                if pair.key in self.done_keys:
                    raise StoreError(
                        f"{path} line {number} (id={pair.id}): key {pair.key} appears twice; "
                        "delete one of the lines"
                    )
                self.done_keys.add(pair.key)
                self.source_counts[pair.source] += 1
                lines += 1
            self.shard_lines.append(lines)

    def _scan_bad_records(self) -> None:
        path = self.out_dir / BAD_RECORDS
        if path.is_file():
            truncate_partial_line(path)
        for bad in read_bad_records(self.out_dir):
            self._count_bad(bad)

    def _count_bad(self, bad: BadRecord) -> bool:
        if bad.key in self.bad_keys:
            return False
        self.bad_keys.add(bad.key)
        self.bad_reasons[bad.reason] += 1
        if len(self.bad_messages) < self.max_bad_messages:
            self.bad_messages.append(bad.message)
        return True

    @property
    def num_pairs(self) -> int:
        return sum(self.shard_lines)

    def _shard_for_next_line(self) -> BinaryIO:
        if self.shard_lines and self.shard_lines[-1] >= self.shard_size:
            self._close_shard()
            self.shard_lines.append(0)
        if not self.shard_lines:
            self.shard_lines.append(0)
        if self._shard is None:
            self._shard = (self.out_dir / shard_name(len(self.shard_lines) - 1)).open("ab")
        return self._shard

    def _close_shard(self) -> None:
        if self._shard is not None:
            self._shard.flush()
            os.fsync(self._shard.fileno())
            self._shard.close()
            self._shard = None
            self.write_manifest()

    def write(self, pair: PreferencePair) -> None:
        """Append a pair; DuplicateKeyError if its key is already in the store."""
        if pair.key in self.done_keys:
            raise DuplicateKeyError(
                f"pair {pair.key} is already in {self.out_dir}; skip keys in writer.done_keys"
            )
        line = _encode(pair.to_json(), f"pair {pair.key}")
        shard = self._shard_for_next_line()
        # One write of a whole line, flushed now: a kill can only cut the line being written.
        shard.write(line)
        shard.flush()
        self.done_keys.add(pair.key)
        self.source_counts[pair.source] += 1
        self.shard_lines[-1] += 1
        self._maybe_sync()

    def report_bad(self, bad: BadRecord) -> bool:
        """Record a bad record once; False if it was already reported (e.g. before a resume)."""
        if not self._count_bad(bad):
            return False
        self._bad_file.write(_encode(bad.to_json(), f"bad record {bad.key}"))
        self._bad_file.flush()
        self._maybe_sync()
        return True

    def count(self, key: str, n: int = 1) -> None:
        """Add to a named counter shown in the manifest under counts.other.

        These live only in the manifest, so after a kill they can lag behind the pairs by up to
        `manifest_interval_s` of work; pair and bad-record counts are always exact.
        """
        self.other_counts[key] += n

    def _maybe_sync(self) -> None:
        now = time.monotonic()
        if now - self._last_fsync >= self.fsync_interval_s:
            self._fsync()
        if now - self._last_manifest >= self.manifest_interval_s:
            self.write_manifest()

    def _fsync(self) -> None:
        for handle in (self._shard, self._bad_file):
            if handle is not None and not handle.closed:
                handle.flush()
                os.fsync(handle.fileno())
        self._last_fsync = time.monotonic()

    def manifest(self) -> dict[str, Any]:
        """The manifest as it would be written now."""
        return {
            "schema_version": SCHEMA_VERSION,
            "complete": self.complete,
            "created": self.created,
            "updated": _now(),
            "config": self.config,
            "shard_size": self.shard_size,
            "counts": {
                "pairs": self.num_pairs,
                "by_source": dict(sorted(self.source_counts.items())),
                "other": dict(sorted(self.other_counts.items())),
            },
            "bad_records": {
                "total": sum(self.bad_reasons.values()),
                "by_reason": dict(sorted(self.bad_reasons.items())),
                "first": list(self.bad_messages),
            },
            "shards": [{"file": shard_name(i), "pairs": n} for i, n in enumerate(self.shard_lines)],
            "versions": versions(),
            **({"stats": self.stats} if self.stats else {}),
        }

    def write_manifest(self) -> None:
        write_atomic(self.out_dir / MANIFEST, json.dumps(self.manifest(), indent=2) + "\n")
        self._last_manifest = time.monotonic()

    def close(self, complete: bool = False) -> None:
        """Flush, fsync, write the final manifest and release the directory."""
        if self._lock_handle.closed:
            return
        self._fsync()
        self._close_shard()
        self._bad_file.close()
        self.complete = complete
        self.write_manifest()
        self._lock_handle.close()

    def __enter__(self) -> PairWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(complete=exc_type is None)
