"""LLM judges: the prompts, reply parsers and scores of MM-Vet, LLaVA-Bench and judged objects.

The prompts are written for this project, following the published protocols: MM-Vet's 0.0-1.0
correctness grade against a ground truth that may join parts with <AND> or list alternatives with
<OR> (Yu et al., 2023), and LLaVA-Bench's pairwise 1-10 review of the model's answer beside the
reference answer, with the image given as text (Liu et al., 2023). The judge is any
OpenAI-compatible endpoint, asked through `bpo.endpoint.ChatClient`.

Each judged benchmark can instead be asked with the reference protocol's own prompt, from a file
the user has (`PromptFile`): LLaVA's `rule.json`, MM-Vet's grading prompt, RLHF-V's object
extraction prompt. The request is then laid out as the reference script lays it out.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpo.endpoint import Messages


@dataclass(frozen=True)
class PromptFile:
    """A judge prompt read from a file: its path, its text and the text's SHA-256."""

    path: str
    text: str

    @property
    def sha256(self) -> str:
        return sha256(self.text)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_prompt_file(path: str | Path, setting: str) -> PromptFile:
    """The prompt file a benchmark's `setting` names; a missing or empty file fails naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{setting}: prompt file {path} not found; fix the path")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{setting}: prompt file {path} is empty; put the judge's prompt in it")
    return PromptFile(str(path), text)


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


def mmvet_messages(
    question: str, ground_truth: str, answer: str, prompt: PromptFile | None = None
) -> Messages:
    """The grading request for one MM-Vet item.

    prompt: MM-Vet's own grading prompt (the evaluator's few-shot table); the request is then one
        user message, the prompt and a table row left for the grade to complete, as
        `mm-vet_evaluator.py` builds it: "{prompt}\n{question} | {ground truth} | {answer} | ",
        with spaces around <AND> and <OR>.
    """
    if prompt is not None:
        spaced = ground_truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
        row = " | ".join([question, spaced, answer, ""])
        return [{"role": "user", "content": f"{prompt.text}\n{row}"}]
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
    exactly those. An item whose grade never parsed (None) counts as 0.0 in every mean, as MM-Vet's
    evaluator scores an item after its tries run out, and is counted in `unparsable`.
    """
    if len(grades) != len(capabilities):
        raise ValueError(f"{len(grades)} grades but {len(capabilities)} capability lists")
    by_capability: dict[str, list[float]] = {}
    by_combination: dict[str, list[float]] = {}
    scored = [0.0 if grade is None else grade for grade in grades]
    for grade, needs in zip(scored, capabilities, strict=True):
        for name in needs:
            by_capability.setdefault(name, []).append(grade)
        by_combination.setdefault("_".join(sorted(needs)), []).append(grade)

    def percent(values: list[float]) -> float:
        return 100 * sum(values) / len(values) if values else 0.0

    unparsable = sum(grade is None for grade in grades)
    return {
        "total": percent(scored),
        "capability": {k: percent(v) for k, v in sorted(by_capability.items())},
        "combination": {k: percent(v) for k, v in sorted(by_combination.items())},
        "graded": len(grades) - unparsable,
        "unparsable": unparsable,
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


# The system message of LLaVA's `eval_gpt_review_bench.py`, sent with the rule file's prompts.
LLAVA_RULE_SYSTEM = (
    "You are a helpful and precise assistant for checking the quality of the answer."
)


def read_rules(prompt: PromptFile) -> dict[str, dict[str, str]]:
    """LLaVA's rule.json: {key: {"role": ..., "prompt": ...}}; anything else fails naming the key."""
    try:
        rules = json.loads(prompt.text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{prompt.path} is not JSON ({exc}); use LLaVA's rule.json") from None
    if not isinstance(rules, dict):
        raise ValueError(f"{prompt.path}: a rule file is a JSON object of rules; use rule.json")
    for key, rule in rules.items():
        if not (isinstance(rule, dict) and all(isinstance(rule.get(f), str) for f in RULE_FIELDS)):
            raise ValueError(
                f"{prompt.path}: rule {key!r} needs text fields 'role' and 'prompt'; fix the rule"
            )
    return rules


RULE_FIELDS = ("role", "prompt")


def _rule_messages(
    rule: dict[str, str], question: str, context: Any, reference: str, answer: str
) -> Messages:
    """The request as `eval_gpt_review_bench.py` lays it out for one rule of rule.json."""
    role = rule["role"]
    caption = "\n".join(context) if isinstance(context, list) else str(context)
    content = (
        f"[Context]\n{caption}\n\n[Question]\n{question}\n\n"
        f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n[System]\n{rule['prompt']}\n\n"
    )
    return [{"role": "system", "content": LLAVA_RULE_SYSTEM}, {"role": "user", "content": content}]


def llava_bench_messages(
    question: str,
    context: Any,
    reference: str,
    answer: str,
    category: str,
    rules: dict[str, dict[str, str]] | None = None,
) -> Messages:
    """The review request: Assistant 1 is the reference answer, Assistant 2 the model's.

    rules: LLaVA's rule.json (`read_rules`); its rule `llava_bench_{category}` is asked, laid out
        as LLaVA's script lays it out (context lines, question, both answers, the rule's prompt).
    """
    if rules is not None:
        key = f"llava_bench_{category}"
        if key not in rules:
            raise ValueError(
                f"the rule file has no rule {key!r} for category {category!r}; use LLaVA's "
                "rule.json, which has one per LLaVA-Bench category"
            )
        return _rule_messages(rules[key], question, context, reference, answer)
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


# RLHF-V asks nothing about an answer of this many words or fewer: it lists no object.
SHORT_ANSWER_WORDS = 3


def is_short_answer(answer: str) -> bool:
    return len(answer.split()) <= SHORT_ANSWER_WORDS


def object_messages(question: str, answer: str, prompt: PromptFile | None = None) -> Messages:
    """The request for the objects an answer mentions.

    prompt: RLHF-V's extraction prompt, with `{question}` and `{answer}` where the item goes; it
        is sent, filled, as one system message, as `eval_gpt_obj_halbench.py` sends it.
    """
    if prompt is not None:
        missing = [f for f in ("{question}", "{answer}") if f not in prompt.text]
        if missing:
            raise ValueError(
                f"prompt file {prompt.path} lacks {' and '.join(missing)}; mark where the "
                "question and the answer go"
            )
        content = prompt.text.replace("{question}", question).replace("{answer}", answer)
        return [{"role": "system", "content": content}]
    content = OBJECTS_INSTRUCTIONS.format(question=question, answer=answer)
    return [{"role": "user", "content": content}]


def parse_object_list(text: str) -> list[str]:
    """The object names in a reply, read as RLHF-V reads them: the reply as JSON, else (when it
    holds '["') its last line as JSON; ValueError unless that is a list of strings."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if '["' not in text:
            raise ValueError(f"no JSON list in the reply {text[:80]!r}") from None
        last = text.strip().split("\n")[-1]
        try:
            value = json.loads(last)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the reply's last line is not JSON ({exc}): {last[:80]!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"the reply is not a JSON list of strings: {text[:80]!r}")
    return value
