"""Read a Hugging Face `datasets.Dataset` of images and chats into Samples."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from bpo.data.conversation import (
    RecordError,
    SeenIds,
    bad_record,
    check_placeholders,
    parse_conversation,
    record_id,
    sample_ids,
    to_samples,
)
from bpo.data.images import (
    ImageError,
    check_image,
    check_image_size,
    load_image_bytes,
    resolve_image_path,
)
from bpo.data.records import BadRecord, Sample


def _undecoded(dataset: Any, column: str) -> Any:
    """The dataset with `column`'s images left as bytes/paths, so we decode them one by one.

    With datasets' own decoding, one corrupt image raises inside the row iterator and ends the
    whole read; decoding here turns it into a BadRecord for that row.
    """
    from datasets import Image as ImageFeature

    features = getattr(dataset, "features", None) or {}
    feature = features.get(column)
    if isinstance(feature, ImageFeature) and feature.decode:
        return dataset.cast_column(column, ImageFeature(decode=False))
    inner = getattr(feature, "feature", None)
    if isinstance(inner, ImageFeature) and inner.decode and dataclasses.is_dataclass(feature):
        return dataset.cast_column(
            column, dataclasses.replace(feature, feature=ImageFeature(decode=False))
        )
    return dataset


def _path_image(path: str, image_root: Path | None, check_images: bool) -> str:
    if image_root is not None:
        if check_images:
            check_image(image_root, path)
        else:
            resolve_image_path(image_root, path)
    return path


def _row_image(value: Any, image_root: Path | None, check_images: bool) -> tuple[str | None, Any]:
    """(path relative to the image root, decoded PIL image): one of them set, or neither."""
    if value is None:
        return None, None
    if isinstance(value, (list, tuple)):
        if len(value) > 1:
            raise RecordError(
                "bad_image_field", f"{len(value)} images; multi-image rows are not supported"
            )
        return _row_image(value[0] if value else None, image_root, check_images)
    if isinstance(value, Image.Image):
        check_image_size(value.size, "<embedded image>")  # already decoded; bound its RGB copy
        return None, value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes"):
        return None, load_image_bytes(value["bytes"], f"'{value.get('path') or '<bytes>'}'")
    if isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"]:
        return _path_image(value["path"], image_root, check_images), None
    if isinstance(value, str) and value:
        return _path_image(value, image_root, check_images), None
    raise RecordError(
        "bad_image_field", f"image must be a PIL image, bytes or a path, got {value!r}"
    )


def _row_samples(
    row: dict[str, Any],
    index: int,
    name: str,
    columns: tuple[str, str, str],
    image_root: Path | None,
    check_images: bool,
    require_placeholder: bool,
    seen_ids: SeenIds,
) -> list[Sample] | list[BadRecord]:
    image_column, messages_column, id_column = columns
    sample_id = None
    try:
        # A dataset without an id column gets row numbers, which are stable for a fixed dataset.
        sample_id = record_id(row[id_column]) if id_column in row else str(index)
        seen_ids.claim_record(sample_id, index)
        messages = parse_conversation(row.get(messages_column))
        path, pil_image = _row_image(row.get(image_column), image_root, check_images)
        check_placeholders(messages, path is not None or pil_image is not None, require_placeholder)
        seen_ids.claim_samples(sample_ids(sample_id, messages), index)
    except (RecordError, ImageError) as error:
        return [bad_record(name, index, "row", sample_id, error)]
    return to_samples(sample_id, messages, path, {"dataset": name, "row": index}, pil_image)


def _messages_column(columns: list[str] | None, requested: str) -> str:
    if columns is None or requested in columns:
        return requested
    if "conversations" in columns:
        return "conversations"
    raise ValueError(
        f"dataset has no column '{requested}' (columns: {', '.join(columns)}); "
        "pass messages_column= naming the chat column"
    )


def read_hf_dataset(
    dataset: Any,
    image_column: str = "image",
    messages_column: str = "messages",
    id_column: str = "id",
    image_root: str | Path | None = None,
    check_images: bool = True,
    require_placeholder: bool = False,
    name: str | None = None,
) -> Iterator[Sample | BadRecord]:
    """Stream Samples (one per assistant turn) and BadRecords from a loaded `datasets` dataset.

    Messages may be chat-style (`{"role", "content"}`, content a string or a list of
    `{"type": "text"|"image", ...}` parts, image parts becoming `<image>`) or LLaVA-style
    (`{"from", "value"}`); a `conversations` column is used when `messages_column` is absent.
    Embedded images (a `datasets.Image` column, PIL images, bytes) are decoded here and put in
    `Sample.pil_image` with `Sample.image = None`; string paths stay in `Sample.image` and are
    checked like LLaVA paths. BadRecord.line is the 0-based row index. Ids are checked as
    `read_llava` checks them: a repeated record id, or a sample id another row's samples have, is
    a bad row.

    Args:
        image_column: a column of one image per row (a list of length 0 or 1 also works).
        id_column: when the dataset has no such column, the row index is the id.
        image_root: directory that string image paths are relative to.
        check_images: with `image_root`, check that path images exist and decode in full.
        name: how messages name the dataset; defaults to its `info.dataset_name`.
    """
    columns = getattr(dataset, "column_names", None)
    columns_used = (image_column, _messages_column(columns, messages_column), id_column)
    info = getattr(dataset, "info", None)
    label = name or getattr(info, "dataset_name", None) or "dataset"
    root = None if image_root is None else Path(image_root)
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"--image-root {root} is not a directory; check the path")
    return _iterate(
        _undecoded(dataset, image_column),
        label,
        columns_used,
        root,
        check_images,
        require_placeholder,
    )


def _iterate(
    dataset: Any,
    name: str,
    columns: tuple[str, str, str],
    image_root: Path | None,
    check_images: bool,
    require_placeholder: bool,
) -> Iterator[Sample | BadRecord]:
    seen_ids = SeenIds("row")
    for index, row in enumerate(dataset):
        yield from _row_samples(
            row, index, name, columns, image_root, check_images, require_placeholder, seen_ids
        )
