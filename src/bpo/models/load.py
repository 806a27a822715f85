"""Load any image-text-to-text model and its processor, the one way every stage does it.

Weights are read from safetensors only (never pickle), remote code runs only when asked for, and
the tokenizer pads on the left so batched generation works.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from PIL import Image
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING, processor_class_from_name
from transformers.utils import PushToHubMixin, is_torchvision_available

from bpo.models.config import ModelConfig
from bpo.models.devices import resolve_device, resolve_dtype

_PICKLE_MESSAGE = (
    "bpo loads safetensors only. Convert once with `model.save_pretrained(folder, "
    "safe_serialization=True)` from a trusted environment."
)


def _read_json(name_or_path: str, filename: str, revision: str | None) -> dict[str, Any]:
    """A JSON file of a local folder or hub repo ({} when absent or not a JSON object)."""
    from transformers.utils import cached_file

    found = cached_file(
        name_or_path,
        filename,
        revision=revision,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        _raise_exceptions_for_gated_repo=False,
    )
    try:
        value = json.loads(Path(found).read_text(encoding="utf-8")) if found else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # from_pretrained reports a damaged file in its own words
    return value if isinstance(value, dict) else {}


def _named_pickles(name_or_path: str, revision: str | None) -> list[str]:
    """The non-safetensors weight files a model's own files point from_pretrained at.

    `use_safetensors=True` does not cover these: transformers follows config.json's
    `transformers_weights` (which may name `adapter_model.bin`) and the shards a
    `*.safetensors.index.json` lists, whatever their format, before it looks at use_safetensors.
    """
    explicit = _read_json(name_or_path, "config.json", revision).get("transformers_weights")
    named, indexes = [], ["model.safetensors.index.json"]
    if isinstance(explicit, str):
        named.append(explicit)
        if explicit.endswith(".index.json"):
            indexes.append(explicit)
    for index in indexes:
        weight_map = _read_json(name_or_path, index, revision).get("weight_map")
        if isinstance(weight_map, dict):
            named += [str(shard) for shard in weight_map.values()]
    safe = (".safetensors", ".safetensors.index.json")
    return sorted({name for name in named if not name.endswith(safe)})


def _check_source(name_or_path: str, revision: str | None = None) -> None:
    """Fail early and clearly on a missing local folder or on weights that are not safetensors.

    Without this, a mistyped local path falls through to a hub lookup whose error talks about
    repo ids, and a folder holding only pytorch_model.bin fails deep inside from_pretrained.
    Pickle weights are refused however they are reached: a folder holding only them, or a
    folder or hub repo whose config or safetensors index names them (see `_named_pickles`),
    or the base model a PEFT adapter names.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir() and not any(path.glob("*.safetensors")):
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(
                p.name for p in path.glob("*.pt")
            )
            if pickles:
                raise OSError(
                    f"{path} holds only PyTorch pickle weights ({', '.join(pickles)}); "
                    + _PICKLE_MESSAGE
                )
        if not path.is_dir():
            return
    else:
        _check_hub_id(name_or_path, path)
    pickles = _named_pickles(name_or_path, revision)
    if pickles:
        raise OSError(
            f"{name_or_path} points its weights at PyTorch pickle files ({', '.join(pickles)}); "
            + _PICKLE_MESSAGE
        )
    base = _read_json(name_or_path, "adapter_config.json", revision).get("base_model_name_or_path")
    if isinstance(base, str) and base and base != name_or_path:
        _check_source(base)  # from_pretrained loads an adapter's base model too


def _check_hub_id(name_or_path: str, path: Path) -> None:
    """Refuse a name that is no existing path and no valid hub id (a mistyped local folder)."""
    looks_local = name_or_path.startswith((".", "/", "~", "\\")) or Path(name_or_path).is_absolute()
    if not looks_local:
        try:
            validate_repo_id(name_or_path)
        except HFValidationError:
            looks_local = True
    if looks_local:
        raise FileNotFoundError(
            f"model folder {name_or_path!r} not found (resolved to {path.resolve()}); pass an "
            "existing local folder or a hub id like 'llava-hf/llava-1.5-7b-hf'"
        )


def load_processor(
    name_or_path: str, trust_remote_code: bool = False, revision: str | None = None
) -> ProcessorMixin:
    """The model's processor (image processor + tokenizer + chat template), padding on the left.

    With torchvision installed this is `AutoProcessor.from_pretrained`, nothing more. Without it,
    transformers cannot build any processor that has a video processor (Qwen2/2.5/3-VL,
    LLaVA-OneVision, InternVL, SmolVLM, GLM-4.1V, ...): video processors exist only as
    torchvision classes, and `ProcessorMixin.__init__` rejects a missing one (None fails its type
    check, and the check itself cannot even look up `VideoProcessorMixin` without torchvision).
    The images of such a model need no torchvision at all, so the processor is then built from
    its parts: the tokenizer, the PIL image processor (what `AutoImageProcessor` picks without
    torchvision) and a `VideoProcessorUnavailable` holding the saved video settings, so that
    `save_pretrained` writes the folder back whole and a user with torchvision still loads the
    real video processor from it. Only videos are refused. Mistral 3's PixtralProcessor, which
    transformers marks as needing torchvision for one helper function whose PIL twin it ships,
    is built from its parts the same way (see `torchvision_free_processor_class`). Every other
    processor, and remote code, goes through `AutoProcessor` (which already picks the PIL image
    processor when torchvision is missing).
    """
    _check_source(name_or_path, revision)
    processor = None
    if not is_torchvision_available():
        processor = _load_without_torchvision(name_or_path, trust_remote_code, revision)
    if processor is None:
        processor = AutoProcessor.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, revision=revision
        )
    # Decoder-only generation appends new tokens at the end of every row; with right padding a
    # short prompt's next token would follow pad tokens, so batched generation must pad on the left.
    # Training stages that want right padding set it themselves on their own copy.
    processor.tokenizer.padding_side = "left"
    return processor


class VideoProcessorUnavailable(PushToHubMixin):
    """Stands in for a video processor where torchvision (which every one needs) is missing.

    It keeps the video processor's saved settings (`video_processor_type` and the rest), so a
    processor holding it saves exactly what it was loaded from; processing a video raises.
    """

    # ProcessorMixin.save_pretrained asks every part whether it is remote code.
    _auto_class = None
    # It produces no model inputs (ProcessorMixin.model_input_names collects every part's).
    model_input_names: ClassVar[list[str]] = []

    def __init__(self, settings: dict[str, Any] | None = None):
        self.settings = dict(settings or {})

    def __getattr__(self, name: str) -> Any:
        # Some processors read video settings even for image-only prompts (SmolVLM's
        # apply_chat_template reads num_frames and fps): the saved value, or None when unset.
        if name.startswith("_") or name == "settings":
            raise AttributeError(name)
        return self.settings.get(name)

    def to_dict(self) -> dict[str, Any]:
        """The saved settings, written back as the processor config's `video_processor` entry."""
        return dict(self.settings)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kind = self.settings.get("video_processor_type", "the video processor")
        raise ImportError(
            f"{kind} needs torchvision, which is not installed; images work without it, videos "
            "do not (install a torchvision build that matches your torch to process videos)"
        )

    def __repr__(self) -> str:
        return f"VideoProcessorUnavailable({self.settings.get('video_processor_type', '?')})"


def processor_from_parts(processor_class: type[ProcessorMixin], **parts: Any) -> ProcessorMixin:
    """`processor_class(**parts)`, where a part may be a `VideoProcessorUnavailable`.

    parts: the sub-processors (tokenizer, image_processor, video_processor, ...) and settings
    (chat_template, image_seq_length, ...) of the processor's `__init__`.
    """
    processor = processor_class.__new__(processor_class)
    check = processor.check_argument_for_proper_class

    def check_unless_stand_in(name: str, argument: Any) -> Any:
        if isinstance(argument, VideoProcessorUnavailable):
            return VideoProcessorUnavailable
        return check(name, argument)

    # Shadows the type check for this one instance while its own __init__ runs (the family's
    # __init__ sets its image tokens, then calls ProcessorMixin.__init__, which checks each part).
    processor.check_argument_for_proper_class = check_unless_stand_in
    try:
        processor_class.__init__(processor, **parts)
    finally:
        del processor.check_argument_for_proper_class
    return processor


# Processors transformers marks as needing torchvision although they use none: their module
# imports one helper from the torchvision image processor's module, whose PIL twin has the same.
# name -> (package, processor module, torchvision image processor module, its PIL twin)
_TORCHVISION_GATED = {
    "PixtralProcessor": (
        "pixtral",
        "processing_pixtral",
        "image_processing_pixtral",
        "image_processing_pil_pixtral",
    ),
}


def torchvision_free_processor_class(name: str) -> type[ProcessorMixin]:
    """The transformers processor class `name` (a `_TORCHVISION_GATED` one, e.g. Mistral 3's
    PixtralProcessor) importable with or without torchvision.

    Without torchvision its module is imported once with the torchvision image processor module
    standing aliased to its PIL twin, for that import only; the class is transformers' own.
    """
    package, module, torchvision_module, pil_module = _TORCHVISION_GATED[name]
    prefix = f"transformers.models.{package}."
    if is_torchvision_available() or prefix + module in sys.modules:
        return getattr(importlib.import_module(prefix + module), name)
    alias = prefix + torchvision_module
    sys.modules[alias] = importlib.import_module(prefix + pil_module)
    try:
        return getattr(importlib.import_module(prefix + module), name)
    finally:
        del sys.modules[alias]


def _load_without_torchvision(
    name_or_path: str, trust_remote_code: bool, revision: str | None
) -> ProcessorMixin | None:
    """The saved processor built from its parts when it has a video processor, else None."""
    try:
        saved, _ = ProcessorMixin.get_processor_dict(name_or_path, revision=revision)
    except (OSError, ValueError):
        return None  # AutoProcessor reports what is missing in its own words
    processor_class = _native_processor_class(saved, name_or_path, revision)
    if processor_class is None or not (
        "video_processor" in processor_class.get_attributes()
        or processor_class.__name__ in _TORCHVISION_GATED
    ):
        return None
    loaders = {
        "tokenizer": AutoTokenizer,
        "image_processor": AutoImageProcessor,
        "feature_extractor": AutoFeatureExtractor,
    }
    parts: dict[str, Any] = {}
    for attribute in processor_class.get_attributes():
        if attribute == "video_processor":
            parts[attribute] = VideoProcessorUnavailable(saved.get("video_processor"))
        elif attribute in loaders:
            parts[attribute] = loaders[attribute].from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code, revision=revision
            )
        else:
            return None  # a part we do not know how to load: let AutoProcessor report it
    accepted = set(inspect.signature(processor_class.__init__).parameters) - {"self", "kwargs"}
    settings = {k: v for k, v in saved.items() if k in accepted and k not in parts}
    return processor_from_parts(processor_class, **parts, **settings)


def _native_processor_class(
    saved: dict[str, Any], name_or_path: str, revision: str | None
) -> type[ProcessorMixin] | None:
    """The transformers processor class the saved processor config names, or its model type's.

    None for remote code (an `auto_map`) and for anything transformers does not know, which then
    goes to AutoProcessor and its own rules and errors.
    """
    if "auto_map" in saved:
        return None
    if saved.get("processor_class") in _TORCHVISION_GATED:
        return torchvision_free_processor_class(saved["processor_class"])
    if saved.get("processor_class"):
        found = processor_class_from_name(saved["processor_class"])
        return found if isinstance(found, type) and issubclass(found, ProcessorMixin) else None
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError):
        return None
    return PROCESSOR_MAPPING.get(type(config), None)


def load_model_and_processor(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    revision: str | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load an AutoModelForImageTextToText (eval mode, on `device`) and its processor.

    name_or_path: a local folder or a hub id; weights must be safetensors.
    dtype: "auto", a name ("bf16", "fp16", "fp32", ...) or a torch.dtype; see `resolve_dtype`.
    attn_implementation: "eager", "sdpa", "flash_attention_2", or None for transformers' default.
    """
    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    check_family(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = _load_weights(AutoModelForImageTextToText, name_or_path, dtype, device, **kwargs)
    processor = load_processor(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    return model, processor


def check_family(
    name_or_path: str, trust_remote_code: bool = False, revision: str | None = None
) -> None:
    """Stop before loading any weights when the model's family cannot be served (its config
    alone says which family it is); see `bpo.models.family.check_supported`."""
    from transformers import AutoConfig
    from transformers.utils import find_adapter_config_file

    from bpo.models.family import check_supported

    _check_source(name_or_path, revision)
    adapter = find_adapter_config_file(name_or_path, revision=revision)
    if adapter is not None:  # a PEFT adapter folder: the family is its base model's
        name_or_path = json.loads(Path(adapter).read_text())["base_model_name_or_path"]
        revision = None
    config = AutoConfig.from_pretrained(
        name_or_path, trust_remote_code=trust_remote_code, revision=revision
    )
    check_supported(config)


def _load_weights(auto_class: Any, name_or_path: str, dtype: Any, device: Any, **kwargs: Any):
    """`auto_class.from_pretrained` from safetensors only, in eval mode, on `device`."""
    _check_source(name_or_path, kwargs.get("revision"))
    device = resolve_device(device)
    model = auto_class.from_pretrained(
        name_or_path,
        dtype=resolve_dtype(dtype, device),
        # Loads straight onto the device: a 7B model never sits in CPU memory in full.
        device_map=device,
        use_safetensors=True,
        **kwargs,
    )
    return model.eval()


def load_causal_lm(
    name_or_path: str,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    revision: str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """A text-only causal LM (eval mode, on `device`) and its tokenizer; safetensors only, no
    remote code (a rewriter is never trusted to run its own code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # False, not transformers' default None: None asks on a terminal whether to run the code.
    options = {"revision": revision, "trust_remote_code": False}
    model = _load_weights(AutoModelForCausalLM, name_or_path, dtype, device, **options)
    return model, AutoTokenizer.from_pretrained(name_or_path, **options)


def count_image_tokens(processor: ProcessorMixin, image: Image.Image | None = None) -> int:
    """How many image tokens the processor puts in the text for one image.

    image: the image to count for (models such as LLaVA-NeXT tile by size); default a black
    square at the processor's crop size, or 336 px when it has none.
    """
    if image is None:
        crop = getattr(processor.image_processor, "crop_size", None) or {}
        height, width = crop.get("height", 336), crop.get("width", 336)
        image = Image.new("RGB", (width, height))
    encoded = processor(images=image, text=processor.image_token, return_tensors="pt")
    # The token the image's features fill is the one the expansion repeats most: the placeholder
    # itself for LLaVA, `<image_soft_token>` for Gemma 3 (whose placeholder is
    # `<start_of_image>`), `<|IMG_PATCH|>` for Aya Vision; wrapper tokens appear once or twice.
    counts = Counter(encoded["input_ids"][0].tolist())
    return max(counts.values())


def load_from_config(config: ModelConfig) -> tuple[PreTrainedModel, ProcessorMixin]:
    """`load_model_and_processor` with the settings of a ModelConfig."""
    return load_model_and_processor(
        config.name_or_path,
        dtype=config.dtype,
        device=config.device,
        trust_remote_code=config.trust_remote_code,
        attn_implementation=config.attn_implementation,
        revision=config.revision,
    )
