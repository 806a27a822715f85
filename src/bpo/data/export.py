"""Export a pair store to other trainers' formats, so users can train elsewhere too.

Every image is resolved under an image root (the one given, else the one the store records) and
decoded before it is exported, so only images under the root that decode (within
`max_image_pixels`) are embedded: a pair whose path leaves the root, names a missing file or a
file that is no image is a bad pair, counted and named, and left out of the export.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpo.data.images import ImageError, check_image
from bpo.data.records import PreferencePair, remove_image_placeholder
from bpo.data.store import image_root_for, open_store, read_pairs


def _turn(role: str, text: str, with_image: bool = False) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
    parts.append({"type": "text", "text": text})
    return {"role": role, "content": parts}


def trl_record(pair: PreferencePair, image_root: Path | None) -> dict[str, Any]:
    """One pair in TRL's conversational vision-DPO format.

    prompt: the chat turns, the image as a `{"type": "image"}` part of the first user turn;
    chosen / rejected: one assistant turn each; images: [absolute image path] (or []).
    An image is checked first: an ImageError if it is outside `image_root` or does not decode.
    """
    has_image = pair.image is not None
    prompt, placed = [], False
    for message in pair.prompt:
        text = remove_image_placeholder(message["content"])
        first_user = message["role"] == "user" and not placed
        prompt.append(_turn(message["role"], text, with_image=has_image and first_user))
        placed = placed or first_user
    images = []
    if has_image:
        if image_root is None:
            raise ValueError(f"pair {pair.key} has an image but no image root was given")
        images = [str(check_image(image_root, pair.image))]
    return {
        "id": pair.id,
        "prompt": prompt,
        "chosen": [_turn("assistant", pair.chosen)],
        "rejected": [_turn("assistant", pair.rejected)],
        "images": images,
        "source": pair.source,
    }


@dataclass
class ExportCounts:
    """What an export wrote and what it left out."""

    rows: int = 0
    bad: Counter[str] = field(default_factory=Counter)  # reason -> pairs left out
    max_messages: int = 20  # bad pairs named to `log`; every one is counted

    def left_out(self, reason: str, message: str, log: Callable[[str], None]) -> None:
        self.bad[reason] += 1
        total = sum(self.bad.values())
        if total <= self.max_messages:
            log(message)
        elif total == self.max_messages + 1:
            log(f"(more than {self.max_messages} pairs left out; the rest are counted, not named)")

    def summary(self) -> dict[str, Any]:
        bad = sum(self.bad.values())
        return {"rows": self.rows, "bad_pairs": bad, "bad_reasons": dict(self.bad)}


def trl_records(
    pairs_dir: str | Path,
    image_root: str | Path | None,
    counts: ExportCounts | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    allow_incomplete: bool = False,
) -> Iterator[dict[str, Any]]:
    """Every usable pair of a store as a TRL record (streaming); bad pairs go to `counts`/`log`.

    Args:
        image_root: the folder the pairs' image paths are relative to; None: the store's own.
        log: told the first bad pairs' messages (see ExportCounts.max_messages).
        allow_incomplete: export a store whose run did not finish.
    """
    manifest = open_store(pairs_dir, allow_incomplete)
    counts = counts if counts is not None else ExportCounts()
    root = None
    for pair in read_pairs(pairs_dir):
        if pair.image is not None and root is None:
            root = image_root_for(pairs_dir, manifest, image_root)  # once, at the first image
        try:
            record = trl_record(pair, root)
        except ImageError as error:
            counts.left_out(error.reason, f"pair {pair.key}: {error}; left out of the export", log)
            continue
        counts.rows += 1
        yield record


def export_trl(
    pairs_dir: str | Path,
    out_dir: str | Path,
    image_root: str | Path | None = None,
    allow_incomplete: bool = False,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Write the store as a `datasets` dataset (save_to_disk) with TRL's columns.

    `images` is a sequence of `datasets.Image`, so TRL's DPOTrainer gets PIL images. Returns
    {"rows", "bad_pairs", "bad_reasons"}; ValueError when no pair is left to export.

    Args:
        image_root: the folder the pairs' image paths are relative to; None: the one the store
            records (its bootstrap's image_root, or its data file's folder).
        allow_incomplete: export a store whose run did not finish.
        log: told the first bad pairs' messages (all are counted).
    """
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "prompt": _messages_feature(),
            "chosen": _messages_feature(),
            "rejected": _messages_feature(),
            "images": datasets.Sequence(datasets.Image()),
            "source": datasets.Value("string"),
        }
    )
    counts = ExportCounts()
    records = list(trl_records(pairs_dir, image_root, counts, log, allow_incomplete))
    # datasets cannot save a dataset of no rows with these features ("Keys mismatch").
    if not records and counts.bad:
        raise ValueError(
            f"{pairs_dir}: none of its pairs could be exported ({dict(counts.bad)} left out); "
            "fix their images or --image_root"
        )
    if not records:
        raise ValueError(f"{pairs_dir} holds no pairs; nothing to export")
    dataset = datasets.Dataset.from_list(records, features=features)
    dataset.save_to_disk(str(out_dir))
    return counts.summary()


def _messages_feature():
    import datasets

    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    return [{"role": datasets.Value("string"), "content": [part]}]
