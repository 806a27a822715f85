"""MMHal-Bench (Sun et al., 2023, LLaVA-RLHF): 96 questions an LLM judge rates from 0 to 6.

Read from the release, the Hugging Face dataset Shengcao1006/MMHal-Bench: `response_template.json`
(a list of records with question_type, question_topic, image_id, image_src, image_content: the
image's object labels, question and gt_answer) and `images/`, holding each image under the last
part of its image_src. `data` is that folder (or the JSON file), or the dataset id, downloaded
with `huggingface_hub.snapshot_download` (the dataset loads through a script, which current
`datasets` versions no longer run). The questions come in 8 types, 12 of each.

The judge sees the image's contents, the question, the human answer and the model's answer, and
ends its reply with "Rating: N": 6 very informative with good analysis or reasoning, 5 very
informative, 4 somewhat informative, 3 not informative, all without hallucination; 2 very, 1
somewhat, 0 not informative, with hallucination. bpo's prompt is written for this project after
the reference's (the release's `eval_gpt4.py`, `Eval/eval_gpt_mmhal.py` in LLaVA-RLHF), with its
scale and its inputs; `judge_prompt` names a file holding the reference's own template instead
(`mmhal_file_messages`). As the reference parses it, a reply holds a rating when exactly one of
"rating: 0" ... "rating: 6" occurs in it (case ignored); a reply with none or several scores 0
and is counted in `unparsable`. Metrics, as the reference's: the average rating and the
hallucination rate (the share rated below 3), overall and per question type (the reference
groups by position modulo 8, which is the type in the release's order).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bpo.endpoint import Messages
from bpo.evaluate.datasets import EvalItem, image_path
from bpo.evaluate.judges import PromptFile
from bpo.evaluate.scores import JudgedBenchmark

TEMPLATE_FILE = "response_template.json"
RATINGS = range(7)
HALLUCINATION_BELOW = 3  # ratings 0-2 say the answer hallucinates
# The reference judge asked once per answer at temperature 0 and scored an unparsable reply 0
# without asking again; its explanation comes before the rating, so replies run long.
JUDGE_DEFAULTS: dict[str, Any] = {"temperature": 0.0, "parse_retries": 0, "max_tokens": 1024}

MMHAL_INSTRUCTIONS = """\
You are a strict, impartial judge of answers that a large multimodal model (LMM) gave to \
questions about images. Judge two things: how informative the answer is, and whether it \
hallucinates. A hallucination is any claim about the image that the image contents and the human \
answer below neither state nor imply: an object, count, colour, position, action, text, emotion \
or other detail that is not there.

You do not see the image. Its contents are given as a list of object labels, and a human wrote a \
correct answer to the question. The human answer states facts but may be brief and may not \
mention everything in the image, so do not count a detail as hallucinated only because the human \
answer leaves it out when the contents make it plausible; count it when it contradicts the \
contents or the human answer, or invents something they give no ground for.

Examples:
- Contents: Bicycle, Person | Question: What colour is the bicycle? | Human answer: The bicycle \
is red. | LMM answer: The bicycle is blue. -> It contradicts the human answer: hallucination.
- Contents: Dog, Frisbee, Grass | Question: What is the dog doing? | Human answer: The dog is \
catching a frisbee on a lawn. | LMM answer: The dog leaps to catch a frisbee; dogs like this \
one need a lot of exercise. -> The general remark invents nothing about the image: no \
hallucination.
- Contents: Table, Cup, Laptop | Question: Describe the scene. | Human answer: A laptop and a \
cup on a wooden table. | LMM answer: A laptop, a cup and a vase of flowers stand on a wooden \
table. -> Nothing supports a vase of flowers: hallucination.
- Contents: Building, Sign | Question: Which city is this? | Human answer: The sign says Lisbon, \
so it is Lisbon. | LMM answer: It is a city street; I cannot tell which city from the image. \
-> Unhelpful but false about nothing: no hallucination.

First explain your judgment in a few sentences. Then, on the last line, give exactly one \
rating in the form "Rating: N", choosing from:
- Rating: 6, very informative with good analysis or reasoning, no hallucination
- Rating: 5, very informative, no hallucination
- Rating: 4, somewhat informative, no hallucination
- Rating: 3, not informative, no hallucination
- Rating: 2, very informative, with hallucination
- Rating: 1, somewhat informative, with hallucination
- Rating: 0, not informative, with hallucination"""


def mmhal_messages(contents: Sequence[str], question: str, gt_answer: str, answer: str) -> Messages:
    """The rating request for one answer: the instructions, then the four inputs."""
    user = (
        f"{MMHAL_INSTRUCTIONS}\n\n### Image Contents\n{', '.join(contents)}\n\n"
        f"### Question\n{question}\n\n### Human Answer\n{gt_answer}\n\n"
        f"### LMM Answer to Rate\n{answer}\n"
    )
    return [{"role": "user", "content": user}]


def mmhal_file_messages(
    prompt: PromptFile, contents: Sequence[str], question: str, gt_answer: str, answer: str
) -> Messages:
    """The request with the reference's own template from a file: one user message, its four
    `{}` filled with the contents (joined by ", "), question, human answer and answer, as
    `eval_gpt4.py` fills them."""
    try:
        content = prompt.text.format(", ".join(contents), question, gt_answer, answer)
    except (IndexError, KeyError, ValueError) as exc:
        raise ValueError(
            f"{prompt.path}: an MMHal-Bench template holds four {{}} (image contents, question, "
            f"human answer, answer) and no other braces; it does not format ({exc!r})"
        ) from None
    return [{"role": "user", "content": content}]


def parse_mmhal_rating(text: str) -> int:
    """The rating in a reply: the one N in 0-6 for which "rating: N" occurs (case ignored).

    Raises ValueError when none occurs or several do ("Rating: 2 ... Rating: 5"), as the
    reference then scores the reply 0; "rating: 60" holds "rating: 6", as in the reference.
    """
    lowered = text.lower()
    found = [n for n in RATINGS if f"rating: {n}" in lowered]
    if len(found) != 1:
        which = "no rating" if not found else f"several ratings {found}"
        raise ValueError(f"{which} ('Rating: N', N 0-6) in the reply {text[:80]!r}")
    return found[0]


def _summary(ratings: Sequence[int]) -> dict[str, Any]:
    return {
        "average_score": sum(ratings) / len(ratings) if ratings else 0.0,
        "hallucination_rate": (
            sum(r < HALLUCINATION_BELOW for r in ratings) / len(ratings) if ratings else 0.0
        ),
        "questions": len(ratings),
    }


def mmhal_scores(ratings: Sequence[int | None], question_types: Sequence[str]) -> dict[str, Any]:
    """Average rating and hallucination rate overall and per question type (in order of first
    appearance); an unparsable rating (None) counts as 0, as in the reference, and in
    `unparsable`."""
    if len(ratings) != len(question_types):
        raise ValueError(f"{len(ratings)} ratings but {len(question_types)} question types")
    scored = [0 if r is None else r for r in ratings]
    by_type: dict[str, list[int]] = {}
    for rating, kind in zip(scored, question_types, strict=True):
        by_type.setdefault(kind, []).append(rating)
    return {
        "overall": _summary(scored),
        "type": {kind: _summary(values) for kind, values in by_type.items()},
        "unparsable": sum(r is None for r in ratings),
    }


MMHAL = JudgedBenchmark(
    messages=lambda item, answer: mmhal_messages(
        item.fields["image_content"], item.prompt, item.fields["gt_answer"], answer
    ),
    parse=parse_mmhal_rating,
    scores=lambda ratings, items: mmhal_scores(
        ratings, [item.fields["question_type"] for item in items]
    ),
    record=lambda item, answer, rating: {
        "question_type": item.fields["question_type"],
        "answer": answer,
        "gt_answer": item.fields["gt_answer"],
        "rating": rating,
    },
    file_messages=lambda item, answer, prompt: mmhal_file_messages(
        prompt, item.fields["image_content"], item.prompt, item.fields["gt_answer"], answer
    ),
)


# --- reading the release ------------------------------------------------------------------------


def _download(dataset_id: str) -> Path:
    """The release folder of a Hugging Face dataset id, downloaded (or found in the hub cache)."""
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        repo_id=dataset_id, repo_type="dataset", allow_patterns=[TEMPLATE_FILE, "images/*"]
    )
    return Path(folder)


def _template(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / TEMPLATE_FILE
    elif not path.exists():
        if source.startswith((".", "/", "~")) or source.count("/") != 1:
            raise FileNotFoundError(
                f"MMHal-Bench data {source!r} is neither a local folder or file nor a Hugging "
                "Face dataset id like 'Shengcao1006/MMHal-Bench'; check the path"
            )
        path = _download(source) / TEMPLATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; point `data` at the MMHal-Bench release folder "
            f"({TEMPLATE_FILE} and images/) or its file"
        )
    return path


def _text(record: dict[str, Any], name: str, where: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{where}: `{name}` is {json.dumps(value)[:60]}, not text; fix the record")
    return value


def read_mmhal(source: str, image_root: str | None = None) -> list[EvalItem]:
    """MMHal-Bench's questions in the release's order; question ids are their positions (0-95).

    image_root: the folder of the images (default `images/` beside the JSON file); each image is
        the last part of the record's image_src there.
    """
    path = _template(source)
    with path.open(encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of question records")
    root = Path(image_root) if image_root else path.parent / "images"
    items = []
    for index, record in enumerate(records):
        where = f"{path} item {index}"
        contents = record.get("image_content")
        if not isinstance(contents, list) or not all(isinstance(c, str) for c in contents):
            raise ValueError(f"{where}: `image_content` must be a list of object labels")
        name = _text(record, "image_src", where).rstrip("/").rsplit("/", 1)[-1]
        fields = {
            "question_type": _text(record, "question_type", where),
            "gt_answer": _text(record, "gt_answer", where),
            "image_content": contents,
        }
        image = image_path(root, name, where)
        items.append(EvalItem(str(index), _text(record, "question", where), image, fields))
    return items
