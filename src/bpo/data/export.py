"""Export a pair store to other trainers' formats, so users can train elsewhere too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bpo.data.images import resolve_image_path
from bpo.data.records import PreferencePair, remove_image_placeholder
from bpo.data.store import read_pairs


def _turn(role: str, text: str, with_image: bool = False) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
    parts.append({"type": "text", "text": text})
    return {"role": role, "content": parts}


def trl_record(pair: PreferencePair, image_root: Path | None) -> dict[str, Any]:
    """One pair in TRL's conversational vision-DPO format.

    prompt: the chat turns, the image as a `{"type": "image"}` part of the first user turn;
    chosen / rejected: one assistant turn each; images: [absolute image path] (or []).
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
        path = resolve_image_path(image_root, pair.image) if image_root else Path(pair.image)
        images = [str(path)]
    return {
        "id": pair.id,
        "prompt": prompt,
        "chosen": [_turn("assistant", pair.chosen)],
        "rejected": [_turn("assistant", pair.rejected)],
        "images": images,
        "source": pair.source,
    }


def trl_records(pairs_dir: str | Path, image_root: str | Path | None) -> Iterator[dict[str, Any]]:
    """Every pair of a store as a TRL record (streaming)."""
    root = Path(image_root) if image_root is not None else None
    for pair in read_pairs(pairs_dir):
        yield trl_record(pair, root)


def export_trl(pairs_dir: str | Path, out_dir: str | Path, image_root: str | Path | None) -> int:
    """Write the store as a `datasets` dataset (save_to_disk) with TRL's columns; returns rows.

    `images` is a sequence of `datasets.Image`, so TRL's DPOTrainer gets PIL images.
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
    records = list(trl_records(pairs_dir, image_root))
    dataset = datasets.Dataset.from_list(records, features=features)
    dataset.save_to_disk(str(out_dir))
    return len(dataset)


def _messages_feature():
    import datasets

    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    return [{"role": datasets.Value("string"), "content": [part]}]
