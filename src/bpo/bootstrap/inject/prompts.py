"""The few-shot chats that ask a language model for a subtly wrong rewrite of a gold answer.

Two modes: `description` rewrites the answer alone, `qa` rewrites it given its question. The
examples are written for this project, each with one or two small, plausible errors.
"""

from __future__ import annotations

from typing import Literal

from bpo.endpoint import Messages

Mode = Literal["description", "qa"]

REWRITE_INSTRUCTIONS = {
    "description": (
        "Rewrite the image description below so that it stays close to the original in wording "
        "and length but becomes subtly wrong about the image: add an object that is not there, "
        "drop one that is, or change a colour, a number, a position or a relation. Change one "
        "or two details only, keep everything else word for word, and reply with the rewritten "
        "description alone."
    ),
    "qa": (
        "Below are a question about an image and its correct answer. Rewrite the answer so that "
        "it stays close to the original in wording and length but becomes subtly wrong: a "
        "different object, colour, number, position or relation. Keep everything else word "
        "for word and reply with the rewritten answer alone."
    ),
}
# Written for this project: each shows one or two small, plausible errors.
DESCRIPTION_EXAMPLES = (
    (
        "A brown dog sleeps on a grey sofa next to two cushions.",
        "A brown cat sleeps on a grey sofa next to three cushions.",
    ),
    (
        "Three people wait at a bus stop while a red bus pulls in on the left.",
        "Three people wait at a bus stop while a blue bus pulls in on the right.",
    ),
    (
        "A plate holds a sandwich and an apple; a cup of coffee stands behind it.",
        "A plate holds a sandwich, an apple and a banana; a cup of tea stands behind it.",
    ),
)
QA_EXAMPLES = (
    ("What is the man holding?", "He is holding a black umbrella.", "He is holding a black bag."),
    (
        "How many birds are on the fence?",
        "There are four birds on the fence.",
        "There are six birds on the fence.",
    ),
    (
        "Where is the laptop?",
        "The laptop is on the desk, to the left of the lamp.",
        "The laptop is on the desk, to the right of the lamp.",
    ),
)


def _qa_turn(question: str, answer: str) -> str:
    return f"Question: {question}\nAnswer: {answer}"


def rewrite_messages(
    gold: str, mode: Mode = "description", question: str | None = None
) -> Messages:
    """The few-shot chat asking for a subtly wrong rewrite of `gold`.

    The instructions open the first user turn (not a system turn: some chat templates refuse
    one); each example is a user turn and the assistant's rewrite.
    """
    if mode not in REWRITE_INSTRUCTIONS:
        raise ValueError(f"unknown rewrite mode {mode!r}; use 'description' or 'qa'")
    if mode == "qa" and question is None:
        raise ValueError("mode 'qa' rewrites an answer given its question: pass question=")
    if mode == "description":
        shots = [(g, r) for g, r in DESCRIPTION_EXAMPLES]
        last = gold
    else:
        shots = [(_qa_turn(q, g), r) for q, g, r in QA_EXAMPLES]
        last = _qa_turn(question, gold)
    messages: Messages = []
    for user, assistant in [*shots, (last, None)]:
        if not messages:
            user = f"{REWRITE_INSTRUCTIONS[mode]}\n\n{user}"
        messages.append({"role": "user", "content": user})
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
    return messages
