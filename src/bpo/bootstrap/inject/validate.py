"""Validation of error-injected rewrites: every candidate negative checked, every reject counted.

A rewrite is usable when it is non-empty, differs from the gold answer after normalization, and
its length in words stays within bounds of the gold's; chat preambles ("Sure! Here is the
rewritten description:") and quotes around the whole of it are stripped first. Rejects are
counted per reason in an `InjectionStats` for the manifest, never dropped silently. (The official
code never checked that a rewrite differs from the gold answer.)
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

REJECT_REASONS = ("empty", "identical", "too_short", "too_long", "no_edit")

# What chat models put before the answer they were asked for. Matched at the start only, one
# after another ("Sure! Here is the rewritten description:" is two of them).
PREAMBLES = (
    r"(?:sure|certainly|of course|okay|ok|absolutely)\b[!.,]?",
    # "Here is the rewritten description:" but not "Here is a dog: ...", which may be the answer
    r"here(?:'s| is| are)\b[^:\n]{0,60}?(?:rewrit|modif|alter|edit|version|descri|answer|"
    r"caption|response)[^:\n]{0,30}:",
    r"(?:the\s+)?(?:rewritten|modified|altered|new|incorrect|wrong|edited)\s+"
    r"(?:description|answer|caption|text|version|response)\s*:",
    r"(?:rewrite|rewritten|description|answer|caption|response|output)\s*:",
    r"assistant\s*:",
)
_PREAMBLE = re.compile(r"^\s*(?:" + "|".join(PREAMBLES) + r")\s*", re.IGNORECASE)
_QUOTES = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("`", "`"))
_NON_WORD = re.compile(r"[^\w\s]+")


def strip_preamble(text: str) -> str:
    """`text` without leading chat preambles and without quotes around the whole of it."""
    text = text.strip()
    while True:
        stripped = _PREAMBLE.sub("", text, count=1).strip()
        for left, right in _QUOTES:
            if len(stripped) >= 2 and stripped[0] == left and stripped[-1] == right:
                stripped = stripped[1:-1].strip()
        if stripped == text:
            return text
        text = stripped


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: what 'identical' compares."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def validate_rewrite(
    gold: str, rewrite: str | None, min_ratio: float = 0.5, max_ratio: float = 2.0
) -> tuple[str | None, str | None]:
    """(cleaned rewrite, None) when usable, else (None, reason): one of `REJECT_REASONS`.

    min_ratio, max_ratio: bounds on the rewrite's length in words over the gold answer's, so
    that negatives do not differ from the gold in length (DPO would learn length instead).
    """
    cleaned = strip_preamble(rewrite or "")
    if not normalize(cleaned):
        return None, "empty"
    if normalize(cleaned) == normalize(gold):
        return None, "identical"
    ratio = len(cleaned.split()) / max(1, len(gold.split()))
    if ratio < min_ratio:
        return None, "too_short"
    if ratio > max_ratio:
        return None, "too_long"
    return cleaned, None


@dataclass
class InjectionStats:
    """Accepted rewrites and rejects per reason, as the manifest reports them."""

    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)

    def record(self, reason: str | None) -> None:
        if reason is None:
            self.accepted += 1
        else:
            self.rejected[reason] += 1

    def as_dict(self) -> dict:
        return {"accepted": self.accepted, "rejected": dict(sorted(self.rejected.items()))}


@dataclass
class Injection:
    """One rewrite: `text` (None when rejected, with `reason`), `raw` output, `edits` made."""

    gold: str
    text: str | None
    reason: str | None
    raw: str | None = None
    edits: list[dict[str, Any]] = field(default_factory=list)


def checked(
    gold: str,
    raw: str | None,
    edits: list[dict[str, Any]],
    stats: InjectionStats | None,
    min_ratio: float,
    max_ratio: float,
) -> Injection:
    """The Injection of one raw rewrite, validated and counted in `stats`."""
    text, reason = validate_rewrite(gold, raw, min_ratio, max_ratio)
    if stats is not None:
        stats.record(reason)
    return Injection(gold, text, reason, raw, edits)
