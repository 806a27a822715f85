"""LLM judges: the prompts, reply parsers and scores of MM-Vet, LLaVA-Bench and judged objects.

The prompts are written for this project, following the published protocols: MM-Vet's 0.0-1.0
correctness grade against a ground truth that may join parts with <AND> or list alternatives with
<OR> (Yu et al., 2023), and LLaVA-Bench's pairwise 1-10 review of the model's answer beside the
reference answer, with the image given as text (Liu et al., 2023). The judge is any
OpenAI-compatible endpoint, asked through `bpo.endpoint.ChatClient`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from bpo.endpoint import Messages

# --- MM-Vet ---------------------------------------------------------------------------------

MMVET_SYSTEM = (
    "You grade answers to questions about images. You do not see the image: judge the answer "
    "against the ground truth only."
)
MMVET_INSTRUCTIONS = """\
Compare the model's answer with the ground truth and reply with one number between 0.0 and 1.0: \
how much of the ground truth the answer gets right.

How to grade:
- Parts joined by <AND> are all required: the grade is the share of them the answer gets right.
- Alternatives joined by <OR> are each a complete answer: matching any one of them earns 1.0.
- Wording does not matter, meaning does: synonyms, paraphrases, units and number formats that say \
the same thing are correct. Extra correct detail costs nothing; a statement that contradicts the \
ground truth lowers the grade.
- For an open-ended question, grade how fully and how correctly the answer covers the points of \
the ground truth, in steps of 0.1.
- Reply with the number alone.

Graded examples:
Question: Which two numbers solve the equation? | Ground truth: 3 <AND> -2 | Answer: x = 3 | Grade: 0.5
Question: Which two numbers solve the equation? | Ground truth: 3 <AND> -2 | Answer: -2 and 3 \
| Grade: 1.0
Question: What is the man holding? | Ground truth: umbrella <OR> parasol | Answer: He holds a \
black parasol. | Grade: 1.0
Question: What does the street sign say? | Ground truth: Main St | Answer: It says Elm Street. \
| Grade: 0.0
Question: How many cups are on the table? | Ground truth: 4 | Answer: There are four cups. \
| Grade: 1.0
Question: What colour is the bus and where is it going? | Ground truth: yellow <AND> to the airport \
| Answer: The bus is yellow and is going downtown. | Grade: 0.5
Question: Why is the road wet? | Ground truth: It has been raining: the sky is grey and people \
carry umbrellas. | Answer: Because it rained. | Grade: 0.6"""


def mmvet_messages(question: str, ground_truth: str, answer: str) -> Messages:
    """The grading request for one MM-Vet item."""
    item = f"Question: {question} | Ground truth: {ground_truth} | Answer: {answer} | Grade:"
    return [
        {"role": "system", "content": MMVET_SYSTEM},
        {"role": "user", "content": f"{MMVET_INSTRUCTIONS}\n\nNow grade this one:\n{item}"},
    ]


_GRADE_PREFIX = re.compile(r"^\s*(?:grade|score|correctness)\s*[:=]?\s*", re.IGNORECASE)


def parse_mmvet_grade(text: str) -> float:
    """The grade in a reply: its first word, a number from 0 to 1 ("0.5", "Grade: 1.0.").

    Raises ValueError when the first word is not a number or the number is outside [0, 1].
    """
    stripped = _GRADE_PREFIX.sub("", text.strip())
    first = stripped.split(maxsplit=1)[0].rstrip(".,;:") if stripped else ""
    try:
        grade = float(first)
    except ValueError:
        raise ValueError(f"no grade at the start of the reply {text[:80]!r}") from None
    if not 0.0 <= grade <= 1.0:
        raise ValueError(f"grade {grade} is outside [0, 1] in the reply {text[:80]!r}")
    return grade


def mmvet_scores(grades: Sequence[float | None], capabilities: Sequence[Sequence[str]]) -> dict:
    """MM-Vet's scores in percent: total, per capability and per capability combination.

    A capability's score is the mean grade of the items that need it (an item needing OCR and
    math counts for both); a combination's ("math_ocr", names sorted) of the items that need
    exactly those. Items whose grade is None (unparsable) are left out of every mean and counted
    in `unparsable`; a mean over no item is 0.
    """
    if len(grades) != len(capabilities):
        raise ValueError(f"{len(grades)} grades but {len(capabilities)} capability lists")
    by_capability: dict[str, list[float]] = {}
    by_combination: dict[str, list[float]] = {}
    graded = []
    for grade, needs in zip(grades, capabilities, strict=True):
        for name in needs:
            by_capability.setdefault(name, [])
        by_combination.setdefault("_".join(sorted(needs)), [])
        if grade is None:
            continue
        graded.append(grade)
        for name in needs:
            by_capability[name].append(grade)
        by_combination["_".join(sorted(needs))].append(grade)

    def percent(values: list[float]) -> float:
        return 100 * sum(values) / len(values) if values else 0.0

    return {
        "total": percent(graded),
        "capability": {k: percent(v) for k, v in sorted(by_capability.items())},
        "combination": {k: percent(v) for k, v in sorted(by_combination.items())},
        "graded": len(graded),
        "unparsable": len(grades) - len(graded),
    }


# --- LLaVA-Bench in-the-wild ------------------------------------------------------------------

LLAVA_BENCH_SYSTEM = "You are a fair, careful reviewer of answers to questions about images."
LLAVA_BENCH_FOCUS = {
    "conv": "This is a conversational question: a short, direct, correct answer is best.",
    "detail": (
        "This question asks for a detailed description: reward correct, complete coverage of the "
        "objects, attributes and layout, and penalize anything the description does not support."
    ),
    "complex": (
        "This question needs reasoning about the image: reward correct reasoning grounded in "
        "what the image shows."
    ),
}
LLAVA_BENCH_INSTRUCTIONS = """\
You cannot see the image; the description above tells what it shows. Two assistants answered the \
question. Rate each answer for helpfulness, relevance, accuracy (against the description) and \
level of detail, on a scale of 1 to 10 where 10 is best. {focus}

On the first line write only the two scores, Assistant 1's then Assistant 2's, separated by a \
space. From the second line on, explain the ratings in a few sentences. Do not let the order of \
the answers or their length sway you."""


def llava_bench_messages(
    question: str, context: str, reference: str, answer: str, category: str
) -> Messages:
    """The review request: Assistant 1 is the reference answer, Assistant 2 the model's."""
    focus = LLAVA_BENCH_FOCUS.get(category, "")
    instructions = LLAVA_BENCH_INSTRUCTIONS.format(focus=focus).replace("  ", " ").rstrip()
    user = (
        f"[Image description]\n{context}\n\n[Question]\n{question}\n\n"
        f"[Assistant 1]\n{reference}\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{answer}\n[End of Assistant 2]\n\n{instructions}"
    )
    return [{"role": "system", "content": LLAVA_BENCH_SYSTEM}, {"role": "user", "content": user}]


_SCORE = re.compile(r"^\d+(?:\.\d+)?$")


def parse_review_scores(text: str) -> tuple[float, float]:
    """(reference score, model score) from a review's first line: two numbers from 1 to 10.

    Commas between the scores are accepted ("8, 6"); anything else on the line, or a score
    outside [1, 10], raises ValueError.
    """
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    parts = first.replace(",", " ").split()
    if len(parts) != 2 or not all(_SCORE.match(p) for p in parts):
        raise ValueError(f"the first line is not two scores: {first[:80]!r}")
    scores = (float(parts[0]), float(parts[1]))
    if not all(1.0 <= s <= 10.0 for s in scores):
        raise ValueError(f"scores {scores} are outside [1, 10]: {first[:80]!r}")
    return scores


def llava_bench_scores(
    reviews: Sequence[tuple[float, float] | None], categories: Sequence[str]
) -> dict:
    """Relative scores: 100 * mean(model score) / mean(reference score), per category and overall.

    reviews: (reference score, model score) per question, None when the review did not parse;
        those are reported in `unparsable` and left out of every mean (the original script
        averaged them in as -1). A category with no parsed review scores 0.
    """
    if len(reviews) != len(categories):
        raise ValueError(f"{len(reviews)} reviews but {len(categories)} categories")
    groups: dict[str, list[tuple[float, float]]] = {c: [] for c in sorted(set(categories))}
    parsed = []
    for review, category in zip(reviews, categories, strict=True):
        if review is not None:
            groups[category].append(review)
            parsed.append(review)

    def summary(pairs: list[tuple[float, float]]) -> dict:
        reference = sum(r for r, _ in pairs) / len(pairs) if pairs else 0.0
        model = sum(m for _, m in pairs) / len(pairs) if pairs else 0.0
        return {
            "relative": 100 * model / reference if reference else 0.0,
            "model": model,
            "reference": reference,
            "reviews": len(pairs),
        }

    return {
        "overall": summary(parsed),
        **{category: summary(pairs) for category, pairs in groups.items()},
        "unparsable": len(reviews) - len(parsed),
    }


# --- Object extraction for Object HalBench (optional, as in the RLHF-V evaluation) ------------

OBJECTS_INSTRUCTIONS = """\
Below are a question about an image and an answer to it. Assume the answer is right, and list \
every physical object the answer says is visible in the image.

- List objects only, without colours, materials, counts or other attributes ("two red cars" -> \
"car").
- Only objects the answer states are present; not ones it says are absent or might be there.
- Reply with a JSON list of strings and nothing else, e.g. ["car", "traffic light", "person"]; \
reply [] when there is none.

[Question]
{question}

[Answer]
{answer}"""


def object_messages(question: str, answer: str) -> Messages:
    """The request for the objects an answer mentions."""
    content = OBJECTS_INSTRUCTIONS.format(question=question, answer=answer)
    return [{"role": "user", "content": content}]


def parse_object_list(text: str) -> list[str]:
    """The JSON list of strings in a reply (the outermost [...]); ValueError if there is none."""
    start, end = text.find("["), text.rfind("]")
    if start == -1 or end < start:
        raise ValueError(f"no JSON list in the reply {text[:80]!r}")
    try:
        value = json.loads(text[start : end + 1])
    except json.JSONDecodeError as exc:
        raise ValueError(f"the list in the reply is not JSON ({exc}): {text[:80]!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"the reply's list is not a list of strings: {text[:80]!r}")
    return value
