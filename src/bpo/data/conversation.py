"""Chat turns shared by the readers: role mapping, validation, one Sample per assistant turn."""

from __future__ import annotations

from typing import Any

from bpo.data.records import IMAGE_PLACEHOLDER, BadRecord, Sample

# LLaVA writes human/gpt; chat datasets write user/assistant. Both map to chat roles.
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class RecordError(ValueError):
    """A record cannot be used; the reader turns it into a BadRecord."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def bad_record(
    file: str, line: int | None, unit: str, record_id: str | None, error: Any
) -> BadRecord:
    """A BadRecord whose message reads `file line 17 (id=x): <error text>`.

    Args:
        unit: how `line` counts: "line", "record" or "row".
        error: a RecordError or an ImageError (anything with `reason` and a message).
    """
    where = file if line is None else f"{file} {unit} {line}"
    if record_id is not None:
        where += f" (id={record_id})"
    return BadRecord(
        file=file, line=line, id=record_id, reason=error.reason, message=f"{where}: {error}"
    )


def record_id(value: Any) -> str:
    """The record's id as a string; integers are accepted because some datasets use them."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise RecordError(
            "missing_id", f"no usable 'id' (got {value!r}); give every record a unique id"
        )
    return str(value)


def _content_text(content: Any, index: int) -> str:
    """A turn's text; HF-style parts are joined by newlines with image parts as `<image>`."""
    if content is None or isinstance(content, str):
        return (content or "").strip()
    if not isinstance(content, list):
        raise RecordError("bad_turn", f"turn {index} content must be a string or a list of parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("image", "image_url"):
            texts.append(IMAGE_PLACEHOLDER)
        elif kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise RecordError(
                "bad_turn", f"turn {index} has a content part that is not text or image: {part!r}"
            )
    return "\n".join(texts).strip()


def _message(turn: Any, index: int) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise RecordError("bad_turn", f"turn {index} is not an object: {turn!r}")
    if "from" in turn:
        role, content = turn.get("from"), turn.get("value")
    elif "role" in turn:
        role, content = turn.get("role"), turn.get("content")
    else:
        raise RecordError(
            "bad_turn", f"turn {index} has neither 'from'/'value' nor 'role'/'content'"
        )
    mapped = ROLES.get(role.lower()) if isinstance(role, str) else None
    if mapped is None:
        raise RecordError(
            "bad_turn", f"turn {index} has role {role!r}; expected one of {', '.join(ROLES)}"
        )
    return {"role": mapped, "content": _content_text(content, index)}


def _check_order(messages: list[dict[str, str]]) -> None:
    start = 1 if messages and messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RecordError(
                "bad_turn_order",
                f"turn {i} is {message['role']} but {expected} was expected; turns must "
                "alternate user/assistant, starting with the user",
            )
    if len(messages) == start or messages[-1]["role"] != "assistant":
        raise RecordError(
            "bad_turn_order", "the conversation does not end with an assistant turn to learn from"
        )


def _check_nonempty(messages: list[dict[str, str]]) -> None:
    for i, message in enumerate(messages):
        if message["content"]:
            continue
        if message["role"] == "assistant":
            raise RecordError("missing_answer", f"assistant turn {i} is empty; drop or fill it")
        if message["role"] == "user":
            raise RecordError("missing_question", f"user turn {i} is empty; drop or fill it")


def parse_conversation(turns: Any) -> list[dict[str, str]]:
    """Validated `{"role", "content"}` messages from LLaVA or chat-style turns; RecordError if bad."""
    if not isinstance(turns, list) or not turns:
        raise RecordError(
            "missing_conversations", "no turns ('conversations' or 'messages' missing or empty)"
        )
    messages = [_message(turn, i) for i, turn in enumerate(turns)]
    _check_order(messages)
    _check_nonempty(messages)
    return messages


def count_placeholders(messages: list[dict[str, str]]) -> int:
    return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)


def check_placeholders(messages: list[dict[str, str]], has_image: bool, require: bool) -> None:
    """One image, at most one `<image>`; a placeholder needs an image (the processor would fail).

    Args:
        require: also refuse an image without a placeholder (otherwise the prompt builder adds it).
    """
    count = count_placeholders(messages)
    if count > 1:
        raise RecordError(
            "multiple_image_placeholders",
            f"{count} '{IMAGE_PLACEHOLDER}' placeholders for one image; keep only the first",
        )
    if count and not has_image:
        raise RecordError(
            "placeholder_without_image",
            f"'{IMAGE_PLACEHOLDER}' placeholder but no image; add the image or remove the placeholder",
        )
    if require and has_image and not count:
        raise RecordError(
            "no_image_placeholder",
            f"an image but no '{IMAGE_PLACEHOLDER}' placeholder; add it to the first user turn",
        )


def sample_ids(record_id: str, messages: list[dict[str, str]]) -> list[str]:
    """The ids of a record's samples: the record id, or `{id}#turn{k}` for each of several turns."""
    answers = sum(m["role"] == "assistant" for m in messages)
    return [f"{record_id}#turn{k}" for k in range(answers)] if answers > 1 else [record_id]


class SeenIds:
    """The record ids and sample ids a reader has given out, so a repeat of either is caught.

    The store keys pairs by sample id, so two records whose samples share an id (a record named
    `x#turn0` beside a two-turn record `x`) would lose one record's pairs however their record
    ids differ. Each id maps to where it was read, so the error names both records.

    Args:
        unit: how the readers' positions count ("line", "record" or "row").
    """

    def __init__(self, unit: str) -> None:
        self.unit = unit
        # id -> position. Positions only, not the owners' ids: these grow with the data set.
        self.records: dict[str, int] = {}
        self.samples: dict[str, int] = {}

    def claim_record(self, record_id: str, position: int) -> None:
        """RecordError (duplicate_id) if the record id was read before; else remember it."""
        if record_id in self.records:
            raise RecordError(
                "duplicate_id",
                f"this id appeared earlier ({self.unit} {self.records[record_id]}); ids must be "
                "unique",
            )
        self.records[record_id] = position

    def _owner(self, sample_id: str, position: int) -> str:
        """The id of the record at `position` that gave `sample_id`."""
        # A one-answer record's sample id is its own id (read at that position); otherwise the
        # sample id is the record's id plus `#turn{k}`.
        if self.records.get(sample_id) == position:
            return sample_id
        return sample_id.rpartition("#turn")[0]

    def claim_samples(self, ids: list[str], position: int) -> None:
        """RecordError (duplicate_sample_id) if a sample id was given out before; else keep them."""
        for sample_id in ids:
            if sample_id in self.samples:
                where = self.samples[sample_id]
                raise RecordError(
                    "duplicate_sample_id",
                    f"its sample id '{sample_id}' is also a sample id of {self.unit} {where} "
                    f"(id={self._owner(sample_id, where)}), and pairs are keyed by sample id (a "
                    "record with several answers gives '<id>#turn<k>'), so one record's pairs "
                    "would be lost; rename one of the two records",
                )
        for sample_id in ids:
            self.samples[sample_id] = position


def to_samples(
    sample_id: str,
    messages: list[dict[str, str]],
    image: str | None,
    meta: dict[str, Any],
    pil_image: Any = None,
) -> list[Sample]:
    """One Sample per assistant turn, with every earlier turn as context.

    Args:
        sample_id: the record's id; the samples' ids are `sample_ids(sample_id, messages)`.
    """
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    ids = sample_ids(sample_id, messages)
    samples = []
    for k, position in enumerate(answers):
        context = [dict(m) for m in messages[:position]]
        samples.append(
            Sample(
                id=ids[k],
                image=image,
                messages=context,
                answer=messages[position]["content"],
                has_image_placeholder=count_placeholders(context) > 0,
                meta={**meta, "turn": k},
                pil_image=pil_image,
                record_id=sample_id,
            )
        )
    return samples
