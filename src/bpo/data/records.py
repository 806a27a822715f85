"""The records that flow between stages: SFT samples, preference pairs, bad records."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

# Bump when a PreferencePair field is added, removed or changes meaning; the manifest records it.
SCHEMA_VERSION = 1

# LLaVA's image token as it appears in conversation text. HF-style image parts are rewritten to
# it, so every Sample marks the image position the same way.
IMAGE_PLACEHOLDER = "<image>"

# Reasons the readers and the store use for BadRecord.reason. Other stages add their own
# (a generator's rejects, say); this table documents the data layer's.
REASONS = {
    "malformed_json": "a JSON Lines line that does not parse",
    "not_an_object": "a record that is not a JSON object",
    "missing_id": "no usable `id` (missing, empty, or not a string/integer)",
    "duplicate_id": "an `id` seen earlier in the same file or dataset",
    "duplicate_sample_id": "a sample id (`id`, or `id#turn<k>`) an earlier record's samples have",
    "bad_image_field": "`image` is not a single non-empty path (multi-image records included)",
    "missing_conversations": "`conversations`/`messages` missing, empty or not a list",
    "bad_turn": "a turn that is not {from, value} / {role, content} with a known role and text",
    "bad_turn_order": "turns that do not alternate user/assistant starting with the user",
    "missing_question": "a user turn with empty text",
    "missing_answer": "an assistant turn with empty text",
    "placeholder_without_image": "an `<image>` placeholder in a record that has no image",
    "multiple_image_placeholders": "more than one `<image>` placeholder for the one image",
    "no_image_placeholder": "an image but no `<image>` placeholder (only when required)",
    "image_outside_root": "an image path that is absolute or resolves outside the image root",
    "invalid_image_path": "an image path no file can have (a NUL byte, a name the OS refuses)",
    "missing_image": "an image file that does not exist",
    "corrupt_image": "an image file that cannot be decoded in full",
    "image_too_large": "an image whose header declares more pixels than max_image_pixels",
}


def remove_image_placeholder(text: str) -> str:
    """The text with every `<image>` placeholder removed and outer whitespace stripped."""
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


def pair_key(sample_id: str, source: str, sample_index: int = 0) -> str:
    """The identity of a pair in a store, computable before the pair is generated.

    Args:
        sample_index: which of several pairs made from the same sample by the same source
            (e.g. the k-th sampled negative); 0 when a source makes one pair per sample.
    """
    # `source` never contains ':' and the index is an integer, so rsplit(':', 2) recovers the
    # parts: the key is unique even when ids contain ':'.
    return f"{sample_id}:{source}:{sample_index}"


@dataclass
class Sample:
    """One SFT sample: the context up to a user turn, and the gold assistant answer to it.

    Args:
        id: unique per sample; the source record's id, plus `#turn{k}` when the conversation has
            more than one assistant turn (k = 0-based index among the assistant turns).
        image: the image path relative to the image root, as written in the data; None for
            text-only samples and for images embedded in a dataset (see `pil_image`).
        messages: `{"role": "system"|"user"|"assistant", "content": str}` dicts ending with the
            user turn being answered. Each content is the source text with outer whitespace
            stripped; `<image>` placeholders are kept verbatim where the source put them.
        answer: the gold assistant turn (outer whitespace stripped).
        has_image_placeholder: whether `messages` contain `<image>`. When False and `image` is
            set, the prompt builder must insert the image itself (LLaVA puts it first).
        meta: provenance, e.g. {"file": ..., "line": ..., "turn": k} or {"row": i}.
        pil_image: the decoded RGB image when the dataset embeds it (bytes or PIL) rather than
            naming a file; never serialized, not compared, not shown in repr.
        record_id: the id of the record the sample came from (`id` less `#turn{k}`, which a
            record id may itself end in); set by the readers, not compared, not shown in repr.
    """

    id: str
    image: str | None
    messages: list[dict[str, str]]
    answer: str
    has_image_placeholder: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    pil_image: Any = field(default=None, repr=False, compare=False)
    record_id: str | None = field(default=None, repr=False, compare=False)


@dataclass
class BadRecord:
    """A record a reader or generator could not use: where it is, why, and how to fix it.

    Args:
        line: 1-based physical line for JSON Lines, 1-based record index for a JSON list,
            0-based row index for a `datasets.Dataset` (so `dataset[line]` finds it).
        reason: a short machine key (see REASONS) used for counting.
        message: the human text naming file, line, id and the fix; `str()` returns it.
    """

    file: str
    line: int | None
    id: str | None
    reason: str
    message: str

    def __str__(self) -> str:
        return self.message

    @property
    def key(self) -> str:
        """Identity used by the store so a bad record reported again after a resume counts once."""
        return f"{self.file}:{self.line}:{self.id}:{self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "id": self.id,
            "reason": self.reason,
            "message": self.message,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BadRecord:
        return cls(
            file=data["file"],
            line=data["line"],
            id=data["id"],
            reason=data["reason"],
            message=data["message"],
        )


def _check_type(name: str, value: Any, types: tuple[type, ...], type_text: str) -> None:
    # bool is an int subclass; a True where a count or log-prob belongs is always a bug.
    if isinstance(value, bool) and bool not in types:
        raise ValueError(f"field '{name}' must be {type_text}, got bool {value!r}")
    if not isinstance(value, types):
        raise ValueError(f"field '{name}' must be {type_text}, got {type(value).__name__}")


def _check_messages(name: str, messages: Any) -> None:
    _check_type(name, messages, (list,), "a list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"field '{name}[{i}]' must be a dict, got {type(message).__name__}")
        for part in ("role", "content"):
            if not isinstance(message.get(part), str):
                raise ValueError(f"field '{name}[{i}].{part}' must be a string")


def _check_logp(name: str, value: Any) -> float | None:
    if value is None:
        return None
    _check_type(name, value, (int, float), "a number or null")
    if not math.isfinite(value):
        raise ValueError(f"field '{name}' must be finite, got {value!r}")
    return float(value)


@dataclass
class PreferencePair:
    """One preference pair: the prompt, a chosen (gold) and a rejected (negative) answer.

    Args:
        image: the image path relative to the image root; None for text-only prompts.
        prompt: chat messages (as in `Sample.messages`) ending with the user turn.
        source: what made the negative, e.g. "weaken" or "inject"; must not contain ':'.
        meta: how it was made (noise step, temperature, seed, generator, `sample_index`...).
            Keep each key's type the same across pairs so `datasets` can load the shards.
        ref_chosen_logp, ref_rejected_logp: summed reference-model log-probs, filled by `refs`.
        chosen_tokens, rejected_tokens: the answers' token counts under the scoring tokenizer.
        ref_noised_chosen_logp: the reference's summed log-prob of the chosen answer on the noised
            image (training's image-contrast term); written only when set.
    """

    id: str
    image: str | None
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None
    chosen_tokens: int | None = None
    rejected_tokens: int | None = None
    ref_noised_chosen_logp: float | None = None

    def __post_init__(self) -> None:
        _check_type("id", self.id, (str,), "a string")
        if not self.id:
            raise ValueError("field 'id' must be a non-empty string")
        if self.image is not None:
            _check_type("image", self.image, (str,), "a string or null")
        _check_messages("prompt", self.prompt)
        _check_type("chosen", self.chosen, (str,), "a string")
        _check_type("rejected", self.rejected, (str,), "a string")
        _check_type("source", self.source, (str,), "a string")
        if not self.source or ":" in self.source:
            raise ValueError(f"field 'source' must be non-empty without ':', got {self.source!r}")
        _check_type("meta", self.meta, (dict,), "a dict")
        sample_index = self.meta.get("sample_index", 0)
        _check_type("meta.sample_index", sample_index, (int,), "an integer")
        self.ref_chosen_logp = _check_logp("ref_chosen_logp", self.ref_chosen_logp)
        self.ref_rejected_logp = _check_logp("ref_rejected_logp", self.ref_rejected_logp)
        self.ref_noised_chosen_logp = _check_logp(
            "ref_noised_chosen_logp", self.ref_noised_chosen_logp
        )
        for name in ("chosen_tokens", "rejected_tokens"):
            value = getattr(self, name)
            if value is not None:
                _check_type(name, value, (int,), "an integer or null")

    @property
    def key(self) -> str:
        """The pair's identity in a store: `pair_key(id, source, meta.get("sample_index", 0))`."""
        return pair_key(self.id, self.source, self.meta.get("sample_index", 0))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with every field, in declaration order; `ref_noised_chosen_logp`
        only when set, so pairs without it are written as before it existed."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if data["ref_noised_chosen_logp"] is None:
            del data["ref_noised_chosen_logp"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PreferencePair:
        """Build and validate a pair; a missing, unknown or ill-typed field raises ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"a pair must be a JSON object, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        required = ["id", "image", "prompt", "chosen", "rejected", "source"]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(repr(m) for m in missing)}")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(repr(u) for u in unknown)}; schema version "
                f"{SCHEMA_VERSION} has {', '.join(known)}"
            )
        values = dict(data)
        if values.get("meta") is None:
            values["meta"] = {}
        return cls(**values)
