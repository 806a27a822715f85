"""AMBER (Wang et al., 2023): LLM-free hallucination scores of descriptions and yes/no answers.

The release (github junyangwang0410/AMBER) is read in its own layout: a `data/` folder holding
`annotations.json` (one record per question id: its type, and `truth`: the image's objects for
a description, "yes"/"no" for a question; `hallu`: a description's hallucination candidates),
`relation.json` (each object's associated words), `safe_words.txt` (words never counted as
hallucinations) and `query/query_generative.json`, `query/query_discriminative.json` (id, image,
query). Images (AMBER_N.jpg) sit under the image root. The authors publish no Hugging Face
dataset; the images come from the link in their README.

Generative task (`score_description`, then `generative_metrics`), as the reference computes it:
the description's nouns that are AMBER objects are its mentions (repeats count); a mention that
is a safe word is fine; one equal to an annotated object or one of its associated words covers
that object; else one equal or near-synonymous to a hallucination candidate (or its associated
words) marks that candidate, and is a hallucination unless it is also near-synonymous to an
annotated object (or its words), which it then covers. Over all descriptions, in percent:

    CHAIR = hallucinated mentions / mentions
    Cover = covered objects / annotated objects
    Hal   = descriptions with a hallucinated mention / descriptions
    Cog   = marked candidates / hallucination candidates

Discriminative task (`discriminative_metrics`): "no" is the positive class, as in the reference:
precision = correct "no" answers / "no" answers, recall = correct "no" answers / questions whose
truth is "no"; accuracy, precision, recall and F1 in percent, overall and per dimension
(existence, attribute and its state / number / action parts, relation). The reference counts an
answer only when it is exactly "Yes" or "No"; here its first word decides ("Yes.", "no, there is
none"), and an answer starting with neither is wrong, not a "no", and counted in `unanswered`.
The reference also adds 0.001 to every denominator, rounds to one decimal and computes F1 from
the rounded precision and recall (plus 1e-4); these are exact ratios.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpo.evaluate.amber_match import Matcher, build_matcher
from bpo.evaluate.datasets import EvalItem, image_path

GENERATIVE_QUERIES = "query_generative.json"
DISCRIMINATIVE_QUERIES = "query_discriminative.json"
DIMENSIONS = ("existence", "attribute", "relation")
# annotations.json's question types -> (dimension, part); any other type is relation, as in the
# reference (which has "discriminative-relation" and "relation").
_TYPES = {
    "discriminative-hallucination": ("existence", None),
    "discriminative-attribute-state": ("attribute", "state"),
    "discriminative-attribute-number": ("attribute", "number"),
    "discriminative-attribute-action": ("attribute", "action"),
}


@dataclass(frozen=True)
class AmberVocabulary:
    """relation.json and safe_words.txt: what a description's nouns are matched against."""

    association: dict[str, list[str]]  # object -> its associated words
    safe_words: frozenset[str]  # never a hallucination
    objects: frozenset[str]  # every object and associated word: the nouns that are scored


def release_folder(source: str | Path) -> Path:
    """The release's data folder: `source` itself or its `data/`, whichever has annotations.json."""
    path = Path(source).expanduser()
    for folder in (path, path / "data"):
        if (folder / "annotations.json").is_file():
            return folder
    raise FileNotFoundError(
        f"no AMBER annotations.json in {path} or {path / 'data'}; point `data` at the AMBER "
        "release's data folder (annotations.json, relation.json, safe_words.txt, query/)"
    )


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the AMBER release's data folder holds it")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def read_vocabulary(folder: Path) -> AmberVocabulary:
    """AMBER's association lists and safe words from the release's data folder."""
    association = _load_json(folder / "relation.json")
    if not isinstance(association, dict):
        raise ValueError(f"{folder / 'relation.json'}: expected an object {{word: [words]}}")
    safe = folder / "safe_words.txt"
    if not safe.is_file():
        raise FileNotFoundError(f"{safe} not found; the AMBER release's data folder holds it")
    safe_words = frozenset(line.rstrip("\r\n") for line in safe.open(encoding="utf-8"))
    objects = frozenset(association) | {w for words in association.values() for w in words}
    return AmberVocabulary(association, safe_words, objects)


def _annotations(folder: Path) -> dict[int, dict[str, Any]]:
    records = _load_json(folder / "annotations.json")
    return {int(r["id"]): r for r in records}


def _queries(folder: Path, name: str) -> tuple[Path, list[dict[str, Any]]]:
    for path in (folder / "query" / name, folder / name):
        if path.is_file():
            return path, _load_json(path)
    raise FileNotFoundError(f"{folder / 'query' / name} not found; the AMBER release holds it")


def _items(
    source: str, image_root: str | None, name: str, want: Any
) -> list[tuple[EvalItem, dict[str, Any]]]:
    """(item, annotation) of the query file `name` whose annotation `want(annotation)` keeps."""
    folder = release_folder(source)
    annotations = _annotations(folder)
    path, queries = _queries(folder, name)
    root = Path(image_root) if image_root else folder
    pairs = []
    for index, query in enumerate(queries):
        where = f"{path} item {index}"
        qid = int(query["id"])
        if qid not in annotations:
            raise ValueError(f"{where} (id={qid}): no annotation with this id in annotations.json")
        annotation = annotations[qid]
        if want(annotation):
            image = image_path(root, str(query["image"]), where)
            pairs.append((EvalItem(str(qid), str(query["query"]), image), annotation))
    return pairs


def read_generative(source: str, image_root: str | None = None) -> list[EvalItem]:
    """The description requests, each with its image's objects and hallucination candidates."""
    items = []
    for item, annotation in _items(
        source, image_root, GENERATIVE_QUERIES, lambda a: a["type"] == "generative"
    ):
        item.fields = {"truth": list(annotation["truth"]), "hallu": list(annotation["hallu"])}
        items.append(item)
    return items


def dimension(question_type: str) -> tuple[str, str | None]:
    """(dimension, attribute part or None) of an annotation's discriminative type."""
    return _TYPES.get(question_type, ("relation", None))


def read_discriminative(
    source: str, image_root: str | None = None, dimensions: Sequence[str] = DIMENSIONS
) -> list[EvalItem]:
    """The yes/no questions of the chosen dimensions, each with its truth ("yes" or "no")."""

    def wanted(annotation: dict[str, Any]) -> bool:
        return annotation["type"] != "generative" and dimension(annotation["type"])[0] in dimensions

    items = []
    for item, annotation in _items(source, image_root, DISCRIMINATIVE_QUERIES, wanted):
        name, part = dimension(annotation["type"])
        truth = str(annotation["truth"]).strip().lower()
        if truth not in ("yes", "no"):
            raise ValueError(
                f"annotations.json id {item.question_id}: truth {truth!r} is not yes or no"
            )
        item.fields = {"dimension": name, "part": part, "truth": truth}
        items.append(item)
    return items


# --- generative: one description ----------------------------------------------------------------


@dataclass(frozen=True)
class DescriptionScore:
    """What one description mentions, hallucinates, covers and recognizes."""

    mentions: list[str]  # its nouns that are AMBER objects, in order, repeats kept
    hallucinated: list[str]  # the mentions that are hallucinations
    covered: list[int]  # indices of the annotated objects it covers
    recognized: list[int]  # indices of the hallucination candidates it marks (Cog)


def _candidates(objects: Sequence[str], association: dict[str, list[str]]) -> list[tuple[str, int]]:
    """(word, object index): every object's associated words, then the objects themselves, in
    the order the reference searches them."""
    words = [(w, i) for i, obj in enumerate(objects) for w in association[obj]]
    return words + [(obj, i) for i, obj in enumerate(objects)]


def _first_equal(noun: str, candidates: list[tuple[str, int]]) -> int | None:
    return next((i for word, i in candidates if word == noun), None)


def _first_synonym(noun: str, candidates: list[tuple[str, int]], matcher: Matcher) -> int | None:
    return next((i for word, i in candidates if matcher.synonyms(noun, word)), None)


def score_description(
    nouns: Sequence[str],
    truth: Sequence[str],
    hallu: Sequence[str],
    vocabulary: AmberVocabulary,
    matcher: Matcher,
) -> DescriptionScore:
    """One description's mentions, scored against its image's annotation as the reference does.

    nouns: the description's noun lemmas (`matcher.nouns(text)`).
    """
    missing = sorted({o for o in (*truth, *hallu) if o not in vocabulary.association})
    if missing:
        raise ValueError(f"objects {missing} of the annotation have no entry in relation.json")
    safe, risky = (
        _candidates(truth, vocabulary.association),
        _candidates(hallu, vocabulary.association),
    )
    mentions = [n for n in nouns if n in vocabulary.objects]
    hallucinated, covered, recognized = [], set(), set()
    for noun in mentions:
        if noun in vocabulary.safe_words:
            continue
        owner = _first_equal(noun, safe)
        if owner is not None:
            covered.add(owner)
            continue
        # The reference does not stop at an equal candidate: it also looks for a similar one,
        # and a noun equal to a candidate is still no hallucination when it is similar to an
        # annotated object.
        for owner in (_first_equal(noun, risky), _first_synonym(noun, risky, matcher)):
            if owner is not None:
                recognized.add(owner)
        owner = _first_synonym(noun, safe, matcher)
        if owner is not None:
            covered.add(owner)
            continue
        hallucinated.append(noun)
    return DescriptionScore(mentions, hallucinated, sorted(covered), sorted(recognized))


def _percent(part: float, whole: float) -> float:
    return 100 * part / whole if whole else 0.0


def generative_metrics(scores: Sequence[DescriptionScore], items: Sequence[EvalItem]) -> dict:
    """CHAIR, Cover, Hal and Cog in percent over all descriptions, and the counts behind them."""
    mentions = sum(len(s.mentions) for s in scores)
    hallucinated = sum(len(s.hallucinated) for s in scores)
    objects = sum(len(item.fields["truth"]) for item in items)
    candidates = sum(len(item.fields["hallu"]) for item in items)
    with_hallucination = sum(bool(s.hallucinated) for s in scores)
    return {
        "chair": _percent(hallucinated, mentions),
        "cover": _percent(sum(len(s.covered) for s in scores), objects),
        "hal": _percent(with_hallucination, len(scores)),
        "cog": _percent(sum(len(s.recognized) for s in scores), candidates),
        "descriptions": len(scores),
        "mentions": mentions,
        "hallucinated": hallucinated,
    }


def score_generative(
    items: Sequence[EvalItem],
    answers: dict[str, str],
    nouns: str,
    similarity_name: str,
    threshold: float,
    data: str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """AMBER's generative metrics of the answers, the matcher that produced them, and a record
    per description naming its mentions, hallucinations and what it covered."""
    vocabulary = read_vocabulary(release_folder(data))
    matcher = build_matcher(nouns, similarity_name, threshold, vocabulary.objects)
    scores, records = [], []
    for item in items:
        answer = answers[item.question_id]
        truth, hallu = item.fields["truth"], item.fields["hallu"]
        score = score_description(matcher.nouns(answer), truth, hallu, vocabulary, matcher)
        scores.append(score)
        records.append(
            {
                "question_id": item.question_id,
                "answer": answer,
                "mentions": score.mentions,
                "hallucinated": score.hallucinated,
                "covered": [truth[i] for i in score.covered],
                "recognized": [hallu[i] for i in score.recognized],
                "truth": truth,
                "hallu": hallu,
            }
        )
    metrics = generative_metrics(scores, items)
    metrics["matcher"] = matcher.info()
    return metrics, records


# --- discriminative -----------------------------------------------------------------------------

_FIRST_WORD = re.compile(r"[^A-Za-z]*([A-Za-z]+)")


def parse_answer(text: str) -> str | None:
    """ "yes" or "no" when the answer's first word is one ("Yes.", "no, none"), else None."""
    first = _FIRST_WORD.match(text)
    word = first.group(1).lower() if first else None
    return word if word in ("yes", "no") else None


def yes_no_metrics(predictions: Sequence[str | None], truths: Sequence[str]) -> dict:
    """Accuracy, precision, recall and F1 in percent with "no" the positive class, as AMBER."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions but {len(truths)} truths")
    pairs = list(zip(predictions, truths, strict=True))
    correct = sum(p == t for p, t in pairs)
    said_no = sum(p == "no" for p, _ in pairs)
    truly_no = sum(t == "no" for _, t in pairs)
    correct_no = sum(p == t == "no" for p, t in pairs)
    precision, recall = _percent(correct_no, said_no), _percent(correct_no, truly_no)
    return {
        "accuracy": _percent(correct, len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "questions": len(pairs),
        "unanswered": sum(p is None for p, _ in pairs),
    }


def discriminative_metrics(predictions: Sequence[str | None], items: Sequence[EvalItem]) -> dict:
    """`yes_no_metrics` over all questions ("all") and per dimension and attribute part, for the
    groups that have questions."""
    groups: dict[str, list[int]] = {"all": list(range(len(items)))}
    for index, item in enumerate(items):
        groups.setdefault(item.fields["dimension"], []).append(index)
        if item.fields["part"]:
            groups.setdefault(f"attribute_{item.fields['part']}", []).append(index)
    order = [
        "all",
        "existence",
        "attribute",
        *(f"attribute_{p}" for p in ("state", "number", "action")),
        "relation",
    ]
    return {
        name: yes_no_metrics(
            [predictions[i] for i in groups[name]], [items[i].fields["truth"] for i in groups[name]]
        )
        for name in order
        if name in groups
    }


def score_discriminative(
    items: Sequence[EvalItem], answers: dict[str, str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """AMBER's discriminative metrics, and a record per question (its parsed answer and truth)."""
    predictions = [parse_answer(answers[item.question_id]) for item in items]
    records = [
        {
            "question_id": item.question_id,
            "answer": answers[item.question_id],
            "prediction": prediction,
            "truth": item.fields["truth"],
            "dimension": item.fields["dimension"],
            "part": item.fields["part"],
        }
        for item, prediction in zip(items, predictions, strict=True)
    ]
    return discriminative_metrics(predictions, items), records
