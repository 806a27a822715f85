"""What reference log-probs depend on, hashed: the model, the settings, each pair and its image.

The fingerprint (16 hex digits, the name of a refs file) hashes everything besides the pair
itself that changes the numbers:
  - the model: for a local folder, the SHA-256 of every `*.safetensors` file and of config.json
    (a 14 GB model is hashed once; digests are cached per (path, size, mtime_ns) in
    `$BPO_CACHE_DIR/file_digests.json`, default `~/.cache/bpo`); for a hub id, the resolved commit;
  - the weights' dtype (bf16 and fp32 log-probs differ), and the quantization if any;
  - tokenization: `max_length`, the tokenizer (its full serialization and special tokens), the chat
    template, the processor's image settings, and REFS_FORMAT, bumped when `bpo.train.batch` changes
    how pairs become tokens;
  - with the image-contrast term on (only then), the run's noise settings.

`pair_hash` covers the pair: prompt, image path, image content (SHA-256) and both answers (and,
with the image-contrast term on, the key of the pair's noise). An image's SHA-256 is trusted from
a stored stamp while the file's size and mtime_ns are unchanged (`ImageDigests`), so checking a
large store reads no image twice.

`pairs_fingerprint` covers the pairs a training run steps through, in order: a checkpoint's data
position means something only on the same list, so a resume on a rebuilt store is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from bpo.data.files import write_atomic
from bpo.data.images import check_image
from bpo.data.records import PreferencePair

# Bump when the way pairs become tokens (bpo.train.batch) or the entry format changes: every
# fingerprint changes with it, so old refs are recomputed rather than reused.
REFS_FORMAT = 1
_CHUNK = 1 << 20


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


def file_stamp(path: Path) -> tuple[int, int]:
    """(size, mtime_ns): what says a file is unchanged, as make and rsync trust it."""
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


def cached_file_sha256(path: Path, cache_path: Path | None = None) -> str:
    """`file_sha256`, remembered per (resolved path, size, mtime_ns) in the digest cache."""
    cache_path = cache_path or default_digest_cache()
    resolved = path.resolve()
    size, mtime_ns = file_stamp(resolved)
    cache = _read_digest_cache(cache_path)
    known = cache.get(str(resolved))
    if isinstance(known, dict) and known.get("size") == size and known.get("mtime_ns") == mtime_ns:
        return known["sha256"]
    sha = file_sha256(resolved)
    # Re-read: another process may have added entries while this one hashed.
    cache = _read_digest_cache(cache_path)
    cache[str(resolved)] = {"size": size, "mtime_ns": mtime_ns, "sha256": sha}
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    # write_atomic's temporary name is per process: several ranks may hash the same model at once.
    write_atomic(cache_path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    return sha


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import try_to_load_from_cache

    # The model was loaded before refs run, so its config is in the hub cache, under
    # snapshots/<commit>/: that folder name is the commit `revision` resolved to.
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(cached).parent.name if isinstance(cached, str) else None


# config.json keys that do not change what the weights compute: the version that saved the file,
# and the dtype a loader defaults to (a model saved fresh writes none in its sub-configs, one
# loaded and saved again writes its dtype; the weights' bytes and the scoring dtype, both in the
# fingerprint, already say it).
NOT_MODEL_DEFINING = ("transformers_version", "dtype", "torch_dtype")


def _model_defining(config: Any) -> Any:
    """The config without NOT_MODEL_DEFINING keys, at every level (sub-configs have them too)."""
    if isinstance(config, dict):
        return {k: _model_defining(v) for k, v in config.items() if k not in NOT_MODEL_DEFINING}
    return config


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
        return {
            "kind": "local",
            "config_sha256": _canonical_sha256(_model_defining(config_data)),
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
    image_noise: dict[str, Any] | None = None,
    shared_token_weight: float | None = None,
) -> tuple[str, dict[str, Any]]:
    """(fingerprint, its parts): the name of the refs file for this model and these settings.

    Args:
        identity: `model_identity(...)` of the reference model.
        dtype: the dtype the reference's language model runs in.
        quantization: the model's quantization config (QLoRA's 4-bit reference scores differently
            from the same weights unquantized), None for none.
        image_noise: with the image-contrast term on, the run's noise settings
            (`bpo.train.image_noise.ImageNoise.fingerprint_part`): its entries also hold the
            chosen answer's log-prob on the noised image. None: the term is off.
        shared_token_weight: a dense preference's weight of shared tokens (the entries are
            weighted scores). None: off.
    """
    parts = {
        "refs_format": REFS_FORMAT,
        "model": identity,
        "dtype": str(dtype).removeprefix("torch."),
        **tokenization_settings(processor, max_length),
    }
    if quantization is not None:  # only then: fingerprints of unquantized models stay as they were
        parts["quantization"] = quantization
    if image_noise is not None:  # likewise: caches made with the term off stay valid without it
        parts["image_noise"] = image_noise
    if shared_token_weight is not None:  # likewise for plain scores
        parts["shared_token_weight"] = shared_token_weight
    return _canonical_sha256(parts)[:16], parts


def scoring_dtype(model: Any) -> torch.dtype:
    """The dtype of the language model's weights (k-bit training upcasts other parts to fp32)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "weight"):
        return embeddings.weight.dtype
    return next(model.parameters()).dtype


def quantization_config(model: Any) -> dict[str, Any] | None:
    """The model's quantization config as plain JSON (None when it is not quantized)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(as_dict, sort_keys=True, default=str))


def pair_hash(
    pair: PreferencePair, image_sha256: str | None, noise: dict[str, Any] | None = None
) -> str:
    """The hash of what a pair's reference scores depend on (the model and settings aside).

    noise: the pair's noise key (`bpo.train.image_noise.NoiseKey.as_json`) when the image-contrast
        term is on: a weakened pair's own noise comes from its meta, which the rest omits.
    """
    content = {
        "prompt": pair.prompt,
        "image": pair.image,
        "image_sha256": image_sha256,
        "chosen": pair.chosen,
        "rejected": pair.rejected,
    }
    if noise is not None:
        content["image_noise"] = noise
    return _canonical_sha256(content)[:32]


def pairs_fingerprint(pairs: Iterable[PreferencePair]) -> dict[str, Any]:
    """{"count", "sha256"} of a run's training pairs: keys, prompts, image paths and answers, in
    order (the order is what a data position indexes). Image bytes are not read: a resume would
    otherwise reread every image; the reference pass already rescores changed ones."""
    digest, count = hashlib.sha256(), 0
    for pair in pairs:
        content = [pair.key, pair.prompt, pair.image, pair.chosen, pair.rejected]
        digest.update(json.dumps(content, sort_keys=True, separators=(",", ":")).encode("utf-8"))
        digest.update(b"\n")
        count += 1
    return {"count": count, "sha256": digest.hexdigest()[:32]}


class ImageDigests:
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
        size, mtime_ns = file_stamp(path)
        if stored and stored.get("size") == size and stored.get("mtime_ns") == mtime_ns:
            stamp = stored
        else:
            stamp = {"size": size, "mtime_ns": mtime_ns, "sha256": file_sha256(path)}
        self._memo[path] = stamp
        return stamp
