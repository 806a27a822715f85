"""The data layer: readers for SFT data, the pair schema, the sharded resumable pair store, the
shared file handling (`files`: JSON Lines, atomic writes, locks) and the object vocabularies
(`vocab`)."""

from bpo.data.hf import read_hf_dataset
from bpo.data.images import (
    CorruptImageError,
    ImageError,
    ImagePathError,
    MissingImageError,
    check_image,
    load_image,
    load_image_bytes,
    resolve_image_path,
)
from bpo.data.llava import read_llava, split_records
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
    merge_stores,
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
    "MissingImageError",
    "PairWriter",
    "PreferencePair",
    "Sample",
    "StoreError",
    "check_image",
    "load_image",
    "load_image_bytes",
    "merge_stores",
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
