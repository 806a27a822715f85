"""The refs files of a pair store: entries keyed by pair, and the meta file of a fingerprint.

    refs/<fingerprint>.meta.json   what the fingerprint hashes (`bpo.train.fingerprint`)
    refs/<fingerprint>.jsonl       one RefEntry per line, keyed by `PreferencePair.key`

`bpo.train.refs` runs the pass that writes them; this module reads, checks and names them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bpo.data.files import read_json_lines, write_atomic
from bpo.data.store import StoreError
from bpo.utils.versions import versions

REFS_DIR = "refs"
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{16}$")
_DAMAGED_FIX = "delete the line (it is recomputed) or the whole file"


@dataclass
class RefEntry:
    """The reference's scores of one pair, and the hash of the pair they were computed from.

    Args:
        image: {"size", "mtime_ns", "sha256"} of the image file when scored; None without image.
        truncated: an answer was cut to fit max_length (its log-prob covers the kept tokens).
        ref_noised_chosen_logp: the chosen answer on the pair's noised image, in the files of a
            fingerprint made with the image-contrast term on; None (and not written) otherwise.
    """

    key: str
    pair_hash: str
    ref_chosen_logp: float
    ref_rejected_logp: float
    chosen_tokens: int
    rejected_tokens: int
    truncated: bool = False
    image: dict[str, Any] | None = None
    ref_noised_chosen_logp: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RefEntry:
        entry = cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})
        noised = ("ref_noised_chosen_logp",) if entry.ref_noised_chosen_logp is not None else ()
        for name in ("ref_chosen_logp", "ref_rejected_logp", *noised):
            value = getattr(entry, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"field '{name}' must be a number")
            if not math.isfinite(value):
                raise ValueError(f"field '{name}' must be finite, got {value!r}")
        return entry

    def to_json(self) -> dict[str, Any]:
        """The entry's line; without `ref_noised_chosen_logp` when it is None (the term off), so
        those files are written as before the field existed."""
        data = asdict(self)
        if data["ref_noised_chosen_logp"] is None:
            del data["ref_noised_chosen_logp"]
        return data


def refs_paths(pairs_dir: str | Path, fingerprint: str) -> tuple[Path, Path]:
    """(entries file, meta file) of a fingerprint in a pair store."""
    if not FINGERPRINT_RE.match(fingerprint):
        raise ValueError(f"fingerprint {fingerprint!r} is not 16 hex digits")
    base = Path(pairs_dir) / REFS_DIR
    return base / f"{fingerprint}.jsonl", base / f"{fingerprint}.meta.json"


def read_entries(path: Path) -> tuple[dict[str, RefEntry], int]:
    """(key -> last entry, number of entry lines); a damaged line raises StoreError naming it."""
    entries: dict[str, RefEntry] = {}
    lines = 0
    for number, data in read_json_lines(path, appended=True, fix=_DAMAGED_FIX, error=StoreError):
        try:
            entry = RefEntry.from_json(data)
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreError(
                f"{path} line {number}: not a reference entry ({exc}); {_DAMAGED_FIX}"
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
    return read_entries(path)[0]


def check_meta(meta_path: Path, fingerprint: str, parts: dict[str, Any]) -> None:
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
        "bpo": versions()["bpo"],
    }
    write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
