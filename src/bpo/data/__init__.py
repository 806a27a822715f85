"""The data layer: readers for SFT data, the pair schema, the sharded resumable pair store and
its merge, safe image loading (`images`), the shared file handling (`files`: JSON Lines, atomic
writes, locks) and the object vocabularies (`vocab`)."""

from bpo.utils.lazy import lazy_exports

_EXPORTS = {
    "IMAGE_PLACEHOLDER": "records",
    "REASONS": "records",
    "SCHEMA_VERSION": "records",
    "BadRecord": "records",
    "ConfigMismatchError": "store",
    "CorruptImageError": "images",
    "DuplicateKeyError": "store",
    "ImageError": "images",
    "ImagePathError": "images",
    "ImageTooLargeError": "images",
    "InvalidImagePathError": "images",
    "MissingImageError": "images",
    "PairWriter": "store",
    "PreferencePair": "records",
    "Sample": "records",
    "StoreError": "store",
    "check_image": "images",
    "image_root_for": "store",
    "load_image": "images",
    "load_image_bytes": "images",
    "max_image_pixels": "images",
    "merge_stores": "merge",
    "open_store": "store",
    "pair_key": "records",
    "read_bad_records": "store",
    "read_hf_dataset": "hf",
    "read_llava": "llava",
    "read_manifest": "store",
    "read_pairs": "store",
    "remove_image_placeholder": "records",
    "resolve_image_path": "images",
    "split_records": "llava",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
