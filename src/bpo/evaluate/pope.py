"""POPE (Li et al., 2023): polling yes/no questions about objects that are or are not in the image.

Questions are built from any annotation set, COCO or ShapeWorld: a list of per-image object sets.
Each image gets `per_image` questions about objects it has (label yes) and as many about objects
it lacks (label no), the absent objects chosen one of three ways:

- random: uniformly among the categories the image lacks;
- popular: the categories that occur in the most images of the annotation set;
- adversarial: the categories that co-occur most often with the image's own objects.

Answers are parsed as the reference code does and scored with yes as the positive class.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Strategy = Literal["random", "popular", "adversarial"]
STRATEGIES: tuple[str, ...] = ("random", "popular", "adversarial")
QUESTION_TEMPLATE = "Is there {article} {object} in the image?"


@dataclass(frozen=True)
class PopeQuestion:
    """One polling question: `object` asked about `image`; `label` True when it is there."""

    question_id: str
    image: str
    object: str
    label: bool
    text: str
    strategy: str


def article(word: str) -> str:
    """The indefinite article for `word`: an before a vowel letter ("an apple"), else a."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def pope_question(obj: str) -> str:
    """The standard question: "Is there a dog in the image?" / "Is there an orange in the image?"."""
    return QUESTION_TEMPLATE.format(article=article(obj), object=obj)


def object_frequency(object_sets: Iterable[set[str]]) -> Counter:
    """In how many images each category occurs (the popular strategy's ranking)."""
    counts: Counter = Counter()
    for objects in object_sets:
        counts.update(set(objects))
    return counts


def co_occurrence(object_sets: Iterable[set[str]]) -> dict[str, Counter]:
    """{a: {b: number of images holding both a and b}} for a != b (the adversarial ranking)."""
    counts: dict[str, Counter] = {}
    for objects in object_sets:
        unique = sorted(set(objects))
        for a in unique:
            row = counts.setdefault(a, Counter())
            row.update(b for b in unique if b != a)
    return counts


def _ranked(scores: Mapping[str, float], candidates: Iterable[str]) -> list[str]:
    """Candidates by score, highest first; ties (and unscored ones, at 0) in name order."""
    return sorted(candidates, key=lambda c: (-scores.get(c, 0), c))


def _negatives(
    strategy: str,
    present: set[str],
    absent: list[str],
    count: int,
    rng: np.random.Generator,
    frequency: Mapping[str, int],
    pairs: Mapping[str, Counter],
) -> list[str]:
    if strategy == "random":
        picks = rng.choice(len(absent), size=min(count, len(absent)), replace=False)
        return [absent[i] for i in sorted(picks)]
    if strategy == "popular":
        return _ranked(frequency, absent)[:count]
    together: Counter = Counter()
    for obj in present:
        together.update(pairs.get(obj, {}))
    return _ranked(together, absent)[:count]


def build_pope_questions(
    image_ids: Sequence[str],
    object_sets: Sequence[set[str]],
    strategy: Strategy = "random",
    per_image: int = 3,
    seed: int = 0,
    categories: Iterable[str] | None = None,
    frequency: Mapping[str, int] | None = None,
    pairs: Mapping[str, Counter] | None = None,
) -> list[PopeQuestion]:
    """Yes/no questions for every image with at least one object: positives and negatives alternate.

    Each image gets min(per_image, its object count) positives, drawn at random from its
    objects, and as many negatives. Question ids are "{image}:{strategy}:{k}".

    categories: what negatives are drawn from; default every category of `object_sets`.
    frequency, pairs: the popular and adversarial rankings; default computed from `object_sets`
        (pass counts over a larger annotation set to rank by it instead).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown POPE strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if len(image_ids) != len(object_sets):
        raise ValueError(f"{len(image_ids)} image ids but {len(object_sets)} object sets")
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("image ids repeat; each image must appear once")
    vocabulary = sorted(
        set(categories) if categories is not None else {o for s in object_sets for o in s}
    )
    frequency = frequency if frequency is not None else object_frequency(object_sets)
    pairs = pairs if pairs is not None else co_occurrence(object_sets)
    rng = np.random.default_rng(seed)
    questions: list[PopeQuestion] = []
    for image, objects in zip(image_ids, object_sets, strict=True):
        present = sorted(objects)
        if not present:
            continue
        count = min(per_image, len(present))
        picks = rng.choice(len(present), size=count, replace=False)
        positives = [present[i] for i in picks]
        absent = [c for c in vocabulary if c not in objects]
        negatives = _negatives(strategy, set(present), absent, count, rng, frequency, pairs)
        asked = []
        for k in range(count):
            asked.append((positives[k], True))
            if k < len(negatives):
                asked.append((negatives[k], False))
        for k, (obj, label) in enumerate(asked):
            questions.append(
                PopeQuestion(
                    question_id=f"{image}:{strategy}:{k}",
                    image=image,
                    object=obj,
                    label=label,
                    text=pope_question(obj),
                    strategy=strategy,
                )
            )
    return questions


_SENTENCE_END = re.compile(r"\.")
_TOKEN = re.compile(r"[a-z]+")


def parse_yes_no(text: str) -> bool:
    """True (yes) unless the first sentence holds the word "no" or "not", as POPE's reference does.

    The first sentence is the text before the first period. Unlike the reference, case and
    punctuation around words do not matter ("NO!" is no); like it, "isn't" is not "not", so
    "There isn't one" counts as yes, and an answer with neither word ("There is a dog.") is yes.
    """
    first = _SENTENCE_END.split(text, maxsplit=1)[0]
    words = set(_TOKEN.findall(first.lower()))
    return not ({"no", "not"} & words)


def pope_metrics(predictions: Sequence[bool], labels: Sequence[bool]) -> dict:
    """Accuracy, precision, recall, F1 (yes is the positive class) and the share of yes answers.

    yes_ratio is the share of *predictions* that are yes (0.5 on a balanced set means no bias).
    A ratio whose denominator is zero (no yes predicted, no yes label, no question) is 0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    tp = sum(p and y for p, y in zip(predictions, labels, strict=True))
    fp = sum(p and not y for p, y in zip(predictions, labels, strict=True))
    fn = sum(not p and y for p, y in zip(predictions, labels, strict=True))
    tn = len(labels) - tp - fp - fn
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "questions": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }
