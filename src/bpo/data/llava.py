"""Read LLaVA conversation data (`.json` list or JSON Lines) into Samples, streaming."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

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
from bpo.data.files import BadLine, iter_json_lines
from bpo.data.images import ImageError, check_image, resolve_image_path
from bpo.data.records import BadRecord, Sample


def _first_char(path: Path) -> str:
    with path.open("r", encoding="utf-8-sig", errors="replace") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]
    return ""


def _json_list_records(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with path.open("r", encoding="utf-8-sig") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); fix the file, or write one record per line "
            "(JSON Lines) so a bad record can be skipped"
        ) from exc
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return enumerate(records, 1)


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    # Decoded line by line: a stray invalid byte spoils one record, not the file. Input data has
    # no writer, so a bad line anywhere (the last one included) is a record reported as bad.
    for number, value in iter_json_lines(path, appended=False):
        if isinstance(value, BadLine):
            value = RecordError("malformed_json", f"{value.message}; fix or drop the line")
        yield number, value


def _raw_records(path: Path) -> tuple[str, Iterator[tuple[int, Any]]]:
    """The unit line numbers count in, and (number, record or RecordError) pairs."""
    # Sniffed rather than taken from the suffix: JSON Lines files named `.json` are common.
    if _first_char(path) == "[":
        return "record", _json_list_records(path)
    return "line", _jsonl_records(path)


def _image_field(record: dict[str, Any]) -> str | None:
    image = record.get("image")
    if image is None:
        return None
    if not isinstance(image, str) or not image:
        raise RecordError(
            "bad_image_field",
            f"'image' must be one non-empty path, got {image!r} (multi-image records are not supported)",
        )
    return image


def _check_record_image(image: str, image_root: Path, check_images: bool) -> None:
    if check_images:
        check_image(image_root, image)
    else:
        resolve_image_path(image_root, image)


def _record_samples(
    record: Any,
    file: str,
    number: int,
    unit: str,
    image_root: Path | None,
    check_images: bool,
    require_placeholder: bool,
    seen_ids: SeenIds,
) -> list[Sample] | list[BadRecord]:
    sample_id = None
    try:
        if isinstance(record, RecordError):
            raise record
        if not isinstance(record, dict):
            raise RecordError(
                "not_an_object", f"a record must be a JSON object, got {type(record).__name__}"
            )
        sample_id = record_id(record.get("id"))
        seen_ids.claim_record(sample_id, number)
        image = _image_field(record)
        messages = parse_conversation(record.get("conversations", record.get("messages")))
        check_placeholders(messages, image is not None, require_placeholder)
        if image is not None and image_root is not None:
            _check_record_image(image, image_root, check_images)
        seen_ids.claim_samples(sample_ids(sample_id, messages), number)
    except (RecordError, ImageError) as error:
        return [bad_record(file, number, unit, sample_id, error)]
    return to_samples(sample_id, messages, image, {"file": file, "line": number})


def read_llava(
    path: str | Path,
    image_root: str | Path | None = None,
    check_images: bool = True,
    require_placeholder: bool = False,
) -> Iterator[Sample | BadRecord]:
    """Stream Samples (one per assistant turn) and BadRecords from a LLaVA conversation file.

    The file is a JSON list (loaded whole, yielded one record at a time; BadRecord.line is the
    1-based record index) or JSON Lines (read line by line in constant memory, apart from the
    record and sample ids kept to catch duplicates; BadRecord.line is the physical 1-based line).
    A bad record yields one BadRecord and no Samples, and reading goes on; a record whose samples
    would have the id of an earlier record's samples (`x#turn0` beside a two-turn `x`) is one,
    as pairs are keyed by sample id.

    Args:
        image_root: directory the `image` paths are relative to. When given, paths that are
            absolute, leave it (`..`, symlinks) or are no valid file name are bad records.
        check_images: with `image_root`, also check every image exists and decodes in full.
        require_placeholder: make an image without an `<image>` placeholder a bad record
            (by default it is kept with `has_image_placeholder=False`).

    Raises:
        FileNotFoundError: the file or the image root does not exist.
        ValueError: a JSON-list file that does not parse as a whole.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA data file {path} not found; check the path")
    root = None if image_root is None else Path(image_root)
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"--image-root {root} is not a directory; check the path")
    # Opened here, outside the generator, so a bad path or an unparsable JSON list fails at the
    # call, not at first use.
    unit, records = _raw_records(path)
    return _iterate(str(path), unit, records, root, check_images, require_placeholder)


def _iterate(
    file: str,
    unit: str,
    records: Iterator[tuple[int, Any]],
    root: Path | None,
    check_images: bool,
    require_placeholder: bool,
) -> Iterator[Sample | BadRecord]:
    seen_ids = SeenIds(unit)
    for number, record in records:
        yield from _record_samples(
            record, file, number, unit, root, check_images, require_placeholder, seen_ids
        )


def split_records(records: Iterable[Sample | BadRecord]) -> tuple[list[Sample], list[BadRecord]]:
    """Separate a reader's output into (samples, bad records), keeping order; for small data."""
    samples: list[Sample] = []
    bad: list[BadRecord] = []
    for record in records:
        (bad if isinstance(record, BadRecord) else samples).append(record)
    return samples, bad
