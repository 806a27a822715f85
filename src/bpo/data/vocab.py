"""Object vocabularies: which words mention which object category, as CHAIR counts mentions.

COCO mentions follow the published CHAIR extraction as refined for Object HalBench (RLHF-V): the
80-category synonym list shipped as package data (`coco_synonyms.txt`), singular nouns, two-word
phrases and the special rules below. Words are singularized with lemminflect (its data ships in
the wheel), so nothing is downloaded at run time. Other worlds (ShapeWorld) build an
`ObjectVocabulary` from their own words.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from lemminflect import getLemma

# Two-word phrases that name no COCO object and must not fire for their parts: a "train track" is
# no train; "home plate" (baseball) is kept from the published extraction's list.
NON_OBJECT_PHRASES = ("home plate", "train track")
# "baby elephant" is an elephant, not a person (`baby` and `adult` are person synonyms); "baby
# animal" and "adult cub" are no COCO object at all.
ANIMAL_WORDS = (
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "animal",
    "cub",
)
# "passenger jet" is an airplane and "passenger train" a train, not a person.
VEHICLE_WORDS = ("jet", "train")

_WORD = re.compile(r"[a-z]+")


def read_synonyms(path: str | Path | None = None) -> dict[str, str]:
    """{synonym: category} from a synonym list: one category per line, its name first.

    path: a comma-separated list like the shipped `coco_synonyms.txt` (the default); synonyms
    are lower-cased ("iPhone"), and a synonym listed twice keeps its category.
    """
    if path is None:
        text = resources.files("bpo.data").joinpath("coco_synonyms.txt").read_text()
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
