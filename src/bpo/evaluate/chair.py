"""CHAIR (Rohrbach et al., 2018): how many mentioned objects are not in the image.

`chair_scores` is benchmark-agnostic: it takes the object categories each response mentions (in
order, repeats kept) and the ground-truth categories of each image. ShapeWorld extracts mentions
exactly from its own vocabulary; COCO mentions come from `extract_objects`, which follows the
published CHAIR extraction as refined for Object HalBench (RLHF-V): the 80-category synonym list
shipped as package data, singular nouns, two-word phrases and the special rules below. Words are
singularized with lemminflect (its data ships in the wheel), so nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from lemminflect import getLemma


def chair_scores(mentions: Sequence[Sequence[str]], ground_truth: Sequence[set[str]]) -> dict:
    """CHAIR_s, CHAIR_i, recall and the response-level rate over responses that mention objects.

    - chair_s: share of responses with at least one hallucinated mention;
    - chair_i: hallucinated mentions / all mentions (repeats count, as in the original metric);
    - recall: unique correctly mentioned categories summed / ground-truth sizes summed;
    - chair_s_mentioned: chair_s over responses with at least one mention (Object HalBench's
      response-level rate).
    """
    if len(mentions) != len(ground_truth):
        raise ValueError(f"{len(mentions)} responses but {len(ground_truth)} ground-truth sets")
    n_mentions = n_hallucinated = n_bad_responses = n_mentioning = 0
    n_recalled = n_truth = 0
    for said, truth in zip(mentions, ground_truth, strict=True):
        wrong = [m for m in said if m not in truth]
        n_mentions += len(said)
        n_hallucinated += len(wrong)
        n_bad_responses += bool(wrong)
        n_mentioning += bool(said)
        n_recalled += len(set(said) & truth)
        n_truth += len(truth)
    return {
        "chair_s": n_bad_responses / len(mentions) if mentions else 0.0,
        "chair_i": n_hallucinated / n_mentions if n_mentions else 0.0,
        "recall": n_recalled / n_truth if n_truth else 0.0,
        "chair_s_mentioned": n_bad_responses / n_mentioning if n_mentioning else 0.0,
        "responses": len(mentions),
        "mentions": n_mentions,
        "hallucinated_mentions": n_hallucinated,
    }


# Two-word phrases that name no COCO object and must not fire for their parts: a "train track" is
# no train; "home plate" (baseball) is kept from the published extraction's list.
NON_OBJECT_PHRASES = ("home plate", "train track")
# "baby elephant" is an elephant, not a person (`baby` and `adult` are person synonyms); "baby
# animal" and "adult cub" are no COCO object at all.
ANIMAL_WORDS = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "animal", "cub",
)  # fmt: skip
# "passenger jet" is an airplane and "passenger train" a train, not a person.
VEHICLE_WORDS = ("jet", "train")

_WORD = re.compile(r"[a-z]+")


def read_synonyms(path: str | Path | None = None) -> dict[str, str]:
    """{synonym: category} from a synonym list: one category per line, its name first.

    path: a comma-separated list like the shipped `coco_synonyms.txt` (the default); synonyms
    are lower-cased ("iPhone"), and a synonym listed twice keeps its category.
    """
    if path is None:
        text = resources.files("bpo.evaluate").joinpath("data/coco_synonyms.txt").read_text()
        label = "coco_synonyms.txt (package data)"
    else:
        text, label = Path(path).read_text(encoding="utf-8"), str(path)
    synonyms: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = [w.strip().lower() for w in line.split(",") if w.strip()]
        if not words:
            continue
        category = words[0]
        for word in words:
            known = synonyms.setdefault(word, category)
            if known != category:
                raise ValueError(
                    f"{label} line {number}: '{word}' already names '{known}'; a synonym must "
                    "belong to one category, so remove it from one of the two lines"
                )
    return synonyms


@dataclass
class ObjectVocabulary:
    """What counts as a mention of which category: CHAIR's word and phrase tables.

    Text is lower-cased and split into letter runs ("dog's" -> dog, s; "hot-dog" -> hot, dog);
    each word is singularized; then, left to right, a two-word window found in `phrases` is
    replaced by what it stands for and both words are consumed; what is left is looked up in
    `synonyms`. Finally `seat` is dropped when `toilet` was said (the seat is the toilet's).

    synonyms: {word or two-word phrase: category}.
    phrases: {two-word phrase (singular words): the word it stands for}; the result is looked
        up in `synonyms`, so a phrase mapped to a non-synonym ("home plate") mentions nothing.
    """

    synonyms: Mapping[str, str]
    phrases: Mapping[str, str]
    _firsts: frozenset[str] = field(init=False, repr=False, compare=False)
    _known: frozenset[str] = field(init=False, repr=False, compare=False)
    # word -> its table spelling; filled as text is read (the speed of extraction comes from it)
    _singular: dict[str, str] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._firsts = frozenset(p.split(" ")[0] for p in self.phrases)
        words = {w for key in (*self.synonyms, *self.phrases) for w in key.split(" ")}
        self._known = frozenset(words)

    @classmethod
    def coco(cls, synonyms: Mapping[str, str] | None = None) -> ObjectVocabulary:
        """The COCO vocabulary: the synonym list plus the published phrases and special rules."""
        synonyms = dict(synonyms if synonyms is not None else read_synonyms())
        phrases = {s: s for s in synonyms if len(s.split(" ")) == 2}
        phrases.update({p: p for p in NON_OBJECT_PHRASES})
        for animal in ANIMAL_WORDS:
            phrases[f"baby {animal}"] = animal
            phrases[f"adult {animal}"] = animal
        for vehicle in VEHICLE_WORDS:
            phrases[f"passenger {vehicle}"] = vehicle
        phrases["bow tie"] = "tie"
        phrases["toilet seat"] = "toilet"
        return cls(synonyms, phrases)

    def singular(self, word: str) -> str:
        """The word as the tables spell it: itself when the tables know it, else its noun lemma.

        Known words are kept as written so "people", "skis" and "sports" (of "sports ball") are
        not turned into other words first; "dogs" -> dog, "men" -> man, "knives" -> knife.
        """
        found = self._singular.get(word)
        if found is None:
            found = word if word in self._known else getLemma(word, upos="NOUN")[0]
            self._singular[word] = found
        return found

    def mentions(self, text: str) -> list[tuple[str, str]]:
        """(word or phrase as normalized, category) of every object mention, in order."""
        singular = self._singular
        words = [singular.get(w) or self.singular(w) for w in _WORD.findall(text.lower())]
        said: list[str] = []
        i, n = 0, len(words)
        while i < n:
            word = words[i]
            if word in self._firsts and i + 1 < n:
                phrase = f"{word} {words[i + 1]}"
                if phrase in self.phrases:
                    said.append(self.phrases[phrase])
                    i += 2
                    continue
            said.append(word)
            i += 1
        found = [(w, self.synonyms[w]) for w in said if w in self.synonyms]
        if any(w == "toilet" for w in said):
            found = [(w, c) for w, c in found if w != "seat"]
        return found


@cache
def coco_vocabulary() -> ObjectVocabulary:
    """The shipped COCO vocabulary, built once per process."""
    return ObjectVocabulary.coco()


def extract_objects(text: str, vocabulary: ObjectVocabulary | None = None) -> list[str]:
    """The COCO category of every object mention in `text`, in order, repeats kept.

    vocabulary: the word tables to use; default the COCO synonym list (`coco_vocabulary()`).
    """
    return [category for _, category in (vocabulary or coco_vocabulary()).mentions(text)]


def objects_to_categories(
    objects: Sequence[str], vocabulary: ObjectVocabulary | None = None
) -> list[str]:
    """The categories of a list of object names (a judge's extraction), one name at a time.

    Names are de-duplicated first (as RLHF-V's judged Object HalBench does), each is mapped on
    its own so that no phrase spans two names, and `seat` is dropped when a `toilet` is listed.
    """
    vocabulary = vocabulary or coco_vocabulary()
    unique = list(dict.fromkeys(o.strip().lower() for o in objects if o.strip()))
    found = [m for name in unique for m in vocabulary.mentions(name)]
    if any(word == "toilet" for word, _ in found):
        found = [(w, c) for w, c in found if w != "seat"]
    return [category for _, category in found]


def _load_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO {what} file {path} not found; download the COCO annotations")
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path} is not a COCO {what} file (no 'annotations'); check the path")
    return data


def _paths(paths: str | Path | Iterable[str | Path] | None) -> list[str | Path]:
    if paths is None:
        return []
    if isinstance(paths, str | Path):
        return [paths]
    return list(paths)


def coco_ground_truth(
    instances: str | Path | Iterable[str | Path],
    captions: str | Path | Iterable[str | Path] | None = None,
    image_ids: Iterable[int] | None = None,
    vocabulary: ObjectVocabulary | None = None,
) -> dict[int, set[str]]:
    """{image id: categories} from COCO `instances_*.json` and `captions_*.json`, as CHAIR does.

    The categories of an image are those of its segmentation annotations plus every category its
    five human captions mention (extracted with `extract_objects`): the original metric counts an
    object the annotators described but did not segment as present.

    instances, captions: one path or several (e.g. train2014 and val2014).
    image_ids: keep only these images (every image an annotation names, by default).
    """
    vocabulary = vocabulary or coco_vocabulary()
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    truth: dict[int, set[str]] = {i: set() for i in wanted} if wanted is not None else {}
    for path in _paths(instances):
        data = _load_json(path, "instances")
        names = {c["id"]: c["name"].lower() for c in data.get("categories", [])}
        for annotation in data["annotations"]:
            image = int(annotation["image_id"])
            if wanted is not None and image not in wanted:
                continue
            name = names.get(annotation["category_id"])
            if name not in vocabulary.synonyms:
                raise ValueError(
                    f"{path}: annotation {annotation.get('id')} has category "
                    f"{annotation['category_id']} ({name!r}), which the synonym list does not "
                    "name; pass the synonym list of this annotation set"
                )
            truth.setdefault(image, set()).add(vocabulary.synonyms[name])
    for path in _paths(captions):
        for annotation in _load_json(path, "captions")["annotations"]:
            image = int(annotation["image_id"])
            if wanted is not None and image not in wanted:
                continue
            truth.setdefault(image, set()).update(
                extract_objects(annotation["caption"], vocabulary)
            )
    return truth
