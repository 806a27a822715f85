"""Reference log-probs: one pass of the frozen reference over the pairs, cached beside them.

DPO compares the policy with a frozen reference. The reference's summed answer log-probs are
computed once, stored with the pairs, and read back by training, which then runs no reference
forward (and holds no second model in memory).

Layout, inside a pair store directory:

    refs/<fingerprint>.meta.json   what the fingerprint hashes: model identity, dtype, tokenization
    refs/<fingerprint>.jsonl       one RefEntry per line, keyed by `PreferencePair.key`
    refs/.lock                     held while a pass writes, so two passes never interleave lines

The fingerprint is a hash of everything besides the pair itself that changes the numbers:
  - the model: for a local folder, the SHA-256 of every `*.safetensors` file and of config.json
    (a 14 GB model is hashed once; digests are cached per (path, size, mtime_ns) in
    `$BPO_CACHE_DIR/file_digests.json`, default `~/.cache/bpo`); for a hub id, the resolved commit;
  - the weights' dtype (bf16 and fp32 log-probs differ);
  - tokenization: `max_length`, the tokenizer (its full serialization and special tokens), the chat
    template, the processor's image settings, and REFS_FORMAT, bumped when `bpo.train.batch` changes
    how pairs become tokens.
So a different model or setting lands in another file: nothing is reused across them.

Each entry also carries a `pair_hash` over the pair's prompt, image path, image content (SHA-256)
and both answers. An entry whose hash no longer matches the pair in the store is stale and is
recomputed, never reused. The image's SHA-256 is trusted from the entry while the file's size and
mtime_ns are unchanged (as make and rsync do), so checking a large store reads no image twice; a
copied image folder (new mtimes) is rehashed once, and unchanged content keeps its entries.

A pass appends and flushes every batch, so a killed pass resumes where it stopped (a half-written
last line is cut). The last line for a key wins; when lines were superseded or their pairs left the
store, the file is rewritten (atomically) with exactly the store's entries.

Pairs whose image is missing, corrupt or outside the image root, or that cannot be encoded, get no
entry: they are returned in `RefsTable.bad` with the pair key and the reason, for the caller to
report. Under multi-process training, run the pass on the main process, then let the others load
the result with `load_reference_logps`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import torch

import bpo
from bpo.data.images import ImageError, check_image, load_image, resolve_image_path
from bpo.data.records import PreferencePair
from bpo.data.store import (
    StoreError,
    lock_directory,
    read_pairs,
    truncate_partial_line,
    write_atomic,
)

# Bump when the way pairs become tokens (bpo.train.batch) or the entry format changes: every
# fingerprint changes with it, so old refs are recomputed rather than reused.
REFS_FORMAT = 1
REFS_DIR = "refs"
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{16}$")
_CHUNK = 1 << 20


@dataclass
class RefEntry:
    """The reference's scores of one pair, and the hash of the pair they were computed from.

    Args:
        image: {"size", "mtime_ns", "sha256"} of the image file when scored; None without image.
        truncated: an answer was cut to fit max_length (its log-prob covers the kept tokens).
    """

    key: str
    pair_hash: str
    ref_chosen_logp: float
    ref_rejected_logp: float
    chosen_tokens: int
    rejected_tokens: int
    truncated: bool = False
    image: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RefEntry:
        entry = cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})
        for name in ("ref_chosen_logp", "ref_rejected_logp"):
            value = getattr(entry, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"field '{name}' must be a number")
            if not math.isfinite(value):
                raise ValueError(f"field '{name}' must be finite, got {value!r}")
        return entry


@dataclass
class RefsTable:
    """The outcome of a pass: valid entries for the store's pairs, and what it took.

    Args:
        pairs: the store's pairs that have an entry, in store order, with the `ref_*` and
            `*_tokens` fields filled: what training reads.
        entries: pair key -> RefEntry, for the same pairs.
        reused, computed: entries taken from the cache and entries computed now (stale included).
        stale: of `computed`, entries that existed but no longer matched their pair.
        bad: pair key -> why it has no entry (the image or encoding error, naming the pair).
        truncated: entries with an answer cut to fit max_length.
    """

    fingerprint: str
    path: Path
    pairs: list[PreferencePair] = field(default_factory=list)
    entries: dict[str, RefEntry] = field(default_factory=dict)
    reused: int = 0
    computed: int = 0
    stale: int = 0
    bad: dict[str, str] = field(default_factory=dict)
    truncated: int = 0


# --- hashing -------------------------------------------------------------------------------


def _canonical_sha256(value: Any) -> str:
    """SHA-256 of a JSON value written canonically (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=_type_name)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _type_name(value: Any) -> str:
    # Never str(value): an object's repr may hold its memory address, making the hash unstable.
    return f"<{type(value).__name__}>"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (weights files do not fit in memory twice)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def default_digest_cache() -> Path:
    """Where file digests are cached: $BPO_CACHE_DIR, else $XDG_CACHE_HOME/bpo, else ~/.cache/bpo."""
    if os.environ.get("BPO_CACHE_DIR"):
        base = Path(os.environ["BPO_CACHE_DIR"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bpo"
    return base / "file_digests.json"


def _read_digest_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        # A missing or damaged cache only costs a rehash.
        return {}
    return data if isinstance(data, dict) else {}


def _write_digest_cache(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A per-process temporary name: several ranks may hash the same model at once.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def cached_file_sha256(path: Path, cache_path: Path | None = None) -> str:
    """`file_sha256`, remembered per (resolved path, size, mtime_ns) in the digest cache."""
    cache_path = cache_path or default_digest_cache()
    resolved = path.resolve()
    size, mtime_ns = _stamp(resolved)
    cache = _read_digest_cache(cache_path)
    known = cache.get(str(resolved))
    if isinstance(known, dict) and known.get("size") == size and known.get("mtime_ns") == mtime_ns:
        return known["sha256"]
    sha = file_sha256(resolved)
    # Re-read: another process may have added entries while this one hashed.
    cache = _read_digest_cache(cache_path)
    cache[str(resolved)] = {"size": size, "mtime_ns": mtime_ns, "sha256": sha}
    _write_digest_cache(cache_path, cache)
    return sha


# --- fingerprint ---------------------------------------------------------------------------


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import try_to_load_from_cache

    # The model was loaded before refs run, so its config is in the hub cache, under
    # snapshots/<commit>/: that folder name is the commit `revision` resolved to.
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(cached).parent.name if isinstance(cached, str) else None


def model_identity(
    name_or_path: str, revision: str | None = None, cache_path: Path | None = None
) -> dict[str, Any]:
    """What identifies a model's weights: content hashes for a local folder, a commit for a hub id.

    Args:
        cache_path: the digest cache file (default `default_digest_cache()`).
    """
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            raise ValueError(f"{folder} holds no *.safetensors weights to fingerprint")
        config = folder / "config.json"
        config_data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
        # Re-saving with another transformers version changes only this line, not the model.
        config_data.pop("transformers_version", None)
        return {
            "kind": "local",
            "config_sha256": _canonical_sha256(config_data),
            "weights_sha256": {p.name: cached_file_sha256(p, cache_path) for p in weights},
        }
    commit = _hub_commit(name_or_path, revision)
    if commit is None:
        raise ValueError(
            f"cannot tell which commit of hub model {name_or_path!r} (revision {revision!r}) is "
            "loaded, so its reference log-probs cannot be keyed; load it once so it is in the "
            "hub cache, pass a commit hash as revision, or use a local folder"
        )
    return {"kind": "hub", "repo": name_or_path, "commit": commit}


def _tokenizer_sha256(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # A fast tokenizer's serialization holds vocab, merges, normalizer, added tokens and the
    # post-processor (the BOS it adds); a slow one is known by its vocabulary.
    body = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    specials = {
        name: getattr(tokenizer, name, None)
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    return _canonical_sha256({"tokenizer": body, "specials": specials})


def tokenization_settings(processor: Any, max_length: int | None) -> dict[str, Any]:
    """The encoding settings that change reference log-probs, hashed where they are large."""
    tokenizer = getattr(processor, "tokenizer", processor)
    template = getattr(processor, "chat_template", None)
    image_settings = processor.to_dict() if hasattr(processor, "image_processor") else None
    return {
        "max_length": max_length,
        "tokenizer_sha256": _tokenizer_sha256(tokenizer),
        # None: no template, so bpo.models.prompts' built-in LLaVA-1.5 format (REFS_FORMAT).
        "chat_template_sha256": _canonical_sha256(template) if template else None,
        "processor_sha256": _canonical_sha256(image_settings),
    }


def reference_fingerprint(
    identity: dict[str, Any],
    processor: Any,
    *,
    max_length: int | None,
    dtype: torch.dtype,
    quantization: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """(fingerprint, its parts): the name of the refs file for this model and these settings.

    Args:
        identity: `model_identity(...)` of the reference model.
        dtype: the dtype the reference's language model runs in.
        quantization: the model's quantization config (QLoRA's 4-bit reference scores differently
            from the same weights unquantized), None for none.
    """
    parts = {
        "refs_format": REFS_FORMAT,
        "model": identity,
        "dtype": str(dtype).removeprefix("torch."),
        **tokenization_settings(processor, max_length),
    }
    if quantization is not None:  # only then: fingerprints of unquantized models stay as they were
        parts["quantization"] = quantization
    return _canonical_sha256(parts)[:16], parts


def _scoring_dtype(model: Any) -> torch.dtype:
    """The dtype of the language model's weights (k-bit training upcasts other parts to fp32)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "weight"):
        return embeddings.weight.dtype
    return next(model.parameters()).dtype


def _quantization(model: Any) -> dict[str, Any] | None:
    """The model's quantization config as plain JSON (None when it is not quantized)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(as_dict, sort_keys=True, default=str))


def pair_hash(pair: PreferencePair, image_sha256: str | None) -> str:
    """The hash of what a pair's reference scores depend on (the model and settings aside)."""
    content = {
        "prompt": pair.prompt,
        "image": pair.image,
        "image_sha256": image_sha256,
        "chosen": pair.chosen,
        "rejected": pair.rejected,
    }
    return _canonical_sha256(content)[:32]


# --- the refs files ------------------------------------------------------------------------


def refs_paths(pairs_dir: str | Path, fingerprint: str) -> tuple[Path, Path]:
    """(entries file, meta file) of a fingerprint in a pair store."""
    if not FINGERPRINT_RE.match(fingerprint):
        raise ValueError(f"fingerprint {fingerprint!r} is not 16 hex digits")
    base = Path(pairs_dir) / REFS_DIR
    return base / f"{fingerprint}.jsonl", base / f"{fingerprint}.meta.json"


def _read_entries(path: Path) -> tuple[dict[str, RefEntry], int]:
    """(key -> last entry, number of lines); a damaged line raises StoreError naming it."""
    entries: dict[str, RefEntry] = {}
    lines = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break  # a pass running now, or killed mid-line; the writer cuts it on resume
            try:
                entry = RefEntry.from_json(json.loads(raw))
            except (ValueError, TypeError, KeyError) as exc:
                raise StoreError(
                    f"{path} line {number}: not a reference entry ({exc}); delete the line (it "
                    "is recomputed) or the whole file"
                ) from exc
            entries[entry.key] = entry
            lines += 1
    return entries, lines


def load_reference_logps(pairs_dir: str | Path, fingerprint: str) -> dict[str, RefEntry]:
    """Every stored entry of a fingerprint, key -> RefEntry (not checked against the pairs).

    Training on these without `ensure_reference_logps` is only safe when that ran on the same
    store since the pairs last changed; it is what checks each entry's pair_hash.
    """
    path, _ = refs_paths(pairs_dir, fingerprint)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: no reference log-probs for fingerprint {fingerprint} in "
            f"{pairs_dir}; compute them with ensure_reference_logps (bpo train does)"
        )
    return _read_entries(path)[0]


def _entry_line(entry: RefEntry) -> bytes:
    return (json.dumps(asdict(entry), allow_nan=False) + "\n").encode("utf-8")


def _check_meta(meta_path: Path, fingerprint: str, parts: dict[str, Any]) -> None:
    """Write the meta file, or check the one there describes the same settings."""
    if meta_path.is_file():
        try:
            stored = json.loads(meta_path.read_text(encoding="utf-8")).get("parts")
        except (ValueError, AttributeError) as exc:
            raise StoreError(f"{meta_path} is not valid JSON ({exc}); delete it") from exc
        if json.loads(json.dumps(parts)) != stored:
            raise StoreError(
                f"{meta_path} describes other settings than fingerprint {fingerprint} hashes "
                "(a damaged or hand-edited file); delete it and its .jsonl to recompute"
            )
        return
    meta = {
        "fingerprint": fingerprint,
        "parts": parts,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bpo": bpo.__version__,
    }
    write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    handle = lock_directory(directory, busy="wait for that reference pass to finish")
    try:
        yield
    finally:
        handle.close()


# --- the pass ------------------------------------------------------------------------------


class _ImageDigests:
    """Image content hashes, trusting a stored stamp while size and mtime_ns are unchanged."""

    def __init__(self, image_root: Path) -> None:
        self.image_root = Path(image_root)
        self._memo: dict[Path, dict[str, Any]] = {}

    def stamp(self, relative: str, stored: dict[str, Any] | None) -> dict[str, Any]:
        """{"size", "mtime_ns", "sha256"} of the image; an ImageError if it cannot be used."""
        # Resolved (and refused outside the root) before anything reads it; not decoded here,
        # as reused pairs never need the pixels.
        path = check_image(self.image_root, relative, decode=False)
        if path in self._memo:
            return self._memo[path]
        size, mtime_ns = _stamp(path)
        if stored and stored.get("size") == size and stored.get("mtime_ns") == mtime_ns:
            stamp = stored
        else:
            stamp = {"size": size, "mtime_ns": mtime_ns, "sha256": file_sha256(path)}
        self._memo[path] = stamp
        return stamp


@dataclass
class _Todo:
    pair: PreferencePair
    pair_hash: str
    image: dict[str, Any] | None


def _bad_message(pair: PreferencePair, exc: Exception) -> str:
    return f"pair {pair.key} (image {pair.image!r}): {exc}"


def _score_batch(
    model: Any,
    processor: Any,
    todo: list[_Todo],
    image_root: Path,
    max_length: int | None,
    bad: dict[str, str],
) -> list[RefEntry]:
    """Encode, collate and score one batch; pairs that fail to load or encode go to `bad`."""
    from bpo.train.batch import collate_pairs, encode_pair
    from bpo.train.logprobs import pair_logps

    encoded, kept = [], []
    for item in todo:
        pair = item.pair
        try:
            image = load_image(resolve_image_path(image_root, pair.image)) if pair.image else None
            item_encoded = encode_pair(pair, processor, image, max_length=max_length)
            if not item_encoded.chosen_ids or not item_encoded.rejected_ids:
                # Caught here, per pair: collate_pairs would fail the whole batch.
                raise ValueError("an answer encodes to no tokens; fix or drop the pair")
        except (ImageError, ValueError) as exc:
            bad[pair.key] = _bad_message(pair, exc)
            continue
        encoded.append(item_encoded)
        kept.append(item)
    if not encoded:
        return []
    tokenizer = getattr(processor, "tokenizer", processor)
    # Padding is masked out of attention and scoring, so any id serves when there is no pad token.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    batch = collate_pairs(encoded, pad_id).to(device)
    scores = pair_logps(model, batch)
    columns = [
        scores.chosen.float().tolist(),
        scores.rejected.float().tolist(),
        scores.chosen_tokens.tolist(),
        scores.rejected_tokens.tolist(),
    ]
    entries = []
    for item, enc, (chosen, rejected, n_chosen, n_rejected) in zip(
        kept, encoded, zip(*columns, strict=True), strict=True
    ):
        if not (math.isfinite(chosen) and math.isfinite(rejected)):
            bad[item.pair.key] = _bad_message(
                item.pair, ValueError(f"reference log-probs are not finite ({chosen}, {rejected})")
            )
            continue
        entries.append(
            RefEntry(
                key=item.pair.key,
                pair_hash=item.pair_hash,
                ref_chosen_logp=chosen,
                ref_rejected_logp=rejected,
                chosen_tokens=int(n_chosen),
                rejected_tokens=int(n_rejected),
                truncated=enc.truncated,
                image=item.image,
            )
        )
    return entries


def with_reference_logps(pair: PreferencePair, entry: RefEntry) -> PreferencePair:
    """A copy of `pair` with the reference scores and token counts of `entry` filled in."""
    return replace(
        pair,
        ref_chosen_logp=entry.ref_chosen_logp,
        ref_rejected_logp=entry.ref_rejected_logp,
        chosen_tokens=entry.chosen_tokens,
        rejected_tokens=entry.rejected_tokens,
    )


def _plan(
    pairs_dir: Path, image_root: Path, stored: dict[str, RefEntry], table: RefsTable
) -> tuple[list[PreferencePair], list[_Todo], bool]:
    """Sort the store's pairs into reusable (into `table.entries`), to compute, and bad.

    Returns (the pairs, the work to do, whether a reused entry's image stamp changed).
    """
    digests = _ImageDigests(image_root)
    pairs, todo, restamped = [], [], False
    for pair in read_pairs(pairs_dir):
        pairs.append(pair)
        entry = stored.get(pair.key)
        try:
            image = digests.stamp(pair.image, entry and entry.image) if pair.image else None
        except ImageError as exc:
            table.bad[pair.key] = _bad_message(pair, exc)
            continue
        current = pair_hash(pair, image and image["sha256"])
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
    processor: Any,
    todo: list[_Todo],
    image_root: Path,
    max_length: int | None,
    batch_size: int,
    progress: bool,
    out: BinaryIO,
    table: RefsTable,
) -> None:
    """Score `todo` batch by batch, appending each batch's entries to `out` as it finishes."""
    from bpo.utils.console import progress_bar

    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            progress_bar("reference log-probs", len(todo), enabled=progress) as advance,
        ):
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                entries = _score_batch(model, processor, chunk, image_root, max_length, table.bad)
                # One write per batch, flushed: a kill loses at most the batch being scored.
                out.write(b"".join(_entry_line(entry) for entry in entries))
                out.flush()
                for entry in entries:
                    table.entries[entry.key] = entry
                table.computed += len(entries)
                for _ in chunk:
                    advance(1)
    finally:
        model.train(was_training)


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
) -> RefsTable:
    """Reference log-probs for every pair of a store: reuse valid entries, compute the rest.

    Missing entries are computed, stale ones (the pair changed) recomputed; the counts are in the
    returned RefsTable, with the pairs that could not be scored in `bad`. The model runs in eval
    mode under inference_mode and is given back in the mode it came in.

    Args:
        model: the frozen reference (in training, the starting model before any update).
        image_root: the folder the pairs' image paths are relative to.
        model_identity: `model_identity(name_or_path, revision)` of the model's weights.
        max_length: tokens per answer branch, as training will use it (it is in the fingerprint).
        batch_size: pairs per forward.
        recompute: discard this fingerprint's stored entries and compute all anew.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pairs_dir, image_root = Path(pairs_dir), Path(image_root)
    fingerprint, parts = reference_fingerprint(
        model_identity,
        processor,
        max_length=max_length,
        dtype=_scoring_dtype(model),
        quantization=_quantization(model),
    )
    path, meta_path = refs_paths(pairs_dir, fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = RefsTable(fingerprint=fingerprint, path=path)
    with _locked(path.parent):
        _check_meta(meta_path, fingerprint, parts)
        if recompute:
            path.unlink(missing_ok=True)
        stored, lines = {}, 0
        if path.is_file():
            truncate_partial_line(path)
            stored, lines = _read_entries(path)
        pairs, todo, restamped = _plan(pairs_dir, image_root, stored, table)
        if todo:
            with path.open("ab") as out:
                _compute(
                    model, processor, todo, image_root, max_length, batch_size, progress, out, table
                )
        # Keep the entries in store order, for the pairs that have one.
        table.entries = {p.key: table.entries[p.key] for p in pairs if p.key in table.entries}
        if restamped or lines + table.computed != len(table.entries):
            # Superseded lines, pairs gone from the store, or new image stamps: rewrite the file
            # so it holds exactly one line per pair.
            write_atomic(
                path, "".join(_entry_line(e).decode("utf-8") for e in table.entries.values())
            )
    table.pairs = [
        with_reference_logps(p, table.entries[p.key]) for p in pairs if p.key in table.entries
    ]
    table.truncated = sum(entry.truncated for entry in table.entries.values())
    return table


def compute_reference_logps(
    model: Any,
    processor: Any,
    pairs_dir: str | Path,
    image_root: str | Path,
    *,
    model_identity: dict[str, Any],
    max_length: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> RefsTable:
    """`ensure_reference_logps` that recomputes every entry, reusing nothing."""
    return ensure_reference_logps(
        model,
        processor,
        pairs_dir,
        image_root,
        model_identity=model_identity,
        max_length=max_length,
        batch_size=batch_size,
        progress=progress,
        recompute=True,
    )
