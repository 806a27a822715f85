"""The data layer: readers for SFT data, the pair schema, the sharded resumable pair store and
its merge, safe image loading (`images`), the shared file handling (`files`: JSON Lines, atomic
writes, locks) and the object vocabularies (`vocab`)."""

from bpo.data.hf import read_hf_dataset
from bpo.data.images import (
    CorruptImageError,
    ImageError,
    ImagePathError,
    ImageTooLargeError,
    InvalidImagePathError,
    MissingImageError,
    check_image,
    load_image,
    load_image_bytes,
    max_image_pixels,
    resolve_image_path,
)
from bpo.data.llava import read_llava, split_records
from bpo.data.merge import merge_stores
from bpo.data.records import (
    IMAGE_PLACEHOLDER,
    REASONS,
    SCHEMA_VERSION,
    BadRecord,
    PreferencePair,
    Sample,
    pair_key,
    remove_image_placeholder,
)
from bpo.data.store import (
    ConfigMismatchError,
    DuplicateKeyError,
    PairWriter,
    StoreError,
    image_root_for,
    open_store,
    read_bad_records,
    read_manifest,
    read_pairs,
)

__all__ = [
    "IMAGE_PLACEHOLDER",
    "REASONS",
    "SCHEMA_VERSION",
    "BadRecord",
    "ConfigMismatchError",
    "CorruptImageError",
    "DuplicateKeyError",
    "ImageError",
    "ImagePathError",
    "ImageTooLargeError",
    "InvalidImagePathError",
    "MissingImageError",
    "PairWriter",
    "PreferencePair",
    "Sample",
    "StoreError",
    "check_image",
    "image_root_for",
    "load_image",
    "load_image_bytes",
    "max_image_pixels",
    "merge_stores",
    "open_store",
    "pair_key",
    "read_bad_records",
    "read_hf_dataset",
    "read_llava",
    "read_manifest",
    "read_pairs",
    "remove_image_placeholder",
    "resolve_image_path",
    "split_records",
]
