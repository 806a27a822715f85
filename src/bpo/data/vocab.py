"""Object vocabularies: which words mention which object category, as CHAIR counts mentions.

COCO mentions follow the published CHAIR extraction as refined for Object HalBench (RLHF-V): the
80-category synonym list shipped as package data (`coco_synonyms.txt`), two-word phrases and the
special rules below. Text is split into words as NLTK's `word_tokenize` splits it (`word_tokens`,
a port of its rules: compounds such as "bird's-eye" or "man-made" stay one word), and only plural
noun forms are singularized, with lemminflect's noun tables (its data ships in the wheel, so
nothing is downloaded at run time). Other worlds (ShapeWorld) build an `ObjectVocabulary` from
their own words.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from lemminflect import getAllLemmas, getAllLemmasOOV

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

# Plural-looking endings of words the noun tables do not know ("bi-planes"), not "-ss"/"-us"/"-is".
_PLURAL_ENDING = re.compile(r"[^sui]s$")
_HYPHEN_IN_WORD = re.compile(r"(?<=[a-z])-(?=[a-z])")
# Words of closed classes (articles, determiners, prepositions, conjunctions, pronouns, numbers
# words): never the noun of an object name, though the lemma tables give some a noun reading.
_CLOSED_CLASS = frozenset(
    str.split(
        "a an the this that these those some any many few several each every all both no other "
        "another of in on at by for from to with without near next under over above below behind "
        "beside besides between among into onto through along across around against and or but nor "
        "its his her their our my your one two three four five six seven eight nine ten"
    )
)

# --- words, as NLTK's word_tokenize splits them -------------------------------------------------
# Punctuation that always stands alone; commas and colons only when no digit follows ("3,000",
# "12:30" stay whole). Hyphens, slashes and apostrophes inside a word never split it.
_ALONE = re.compile(r"""(\.{2,}|--|[«»“”‘’„`"?!;@#$%&*()\[\]{}<>\u2012-\u2015]|[:,](?!\d))""")
# An apostrophe opening a word ("'tis" aside) is a quote.
_OPENING_QUOTE = re.compile(r"(?<![\w'])'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)")
# Clitics split off the end of a word: "dog's" -> dog, 's; "dogs'" -> dogs, '.
_CLITIC = re.compile(r"^(.*[^' ])('s|'m|'d|'ll|'re|'ve|n't|')$")


def _ends_sentence(token: str) -> bool:
    """Whether a word's final period ends a sentence, as Punkt decides on ordinary prose.

    Abbreviations keep their period: ones with an inner period ("e.g.", "u.s.") and initials.
    """
    word = token[:-1]
    return token.endswith(".") and len(word) > 1 and "." not in word


def word_tokens(text: str) -> list[str]:
    """`text` split into words and punctuation as NLTK's `word_tokenize` splits it.

    A faithful port of its rules for what CHAIR reads: compounds stay whole ("bird's-eye",
    "man-made", "car-free", "bi-plane", "and/or"); commas, semicolons, brackets, quotes, "?", "!"
    and sentence-final periods stand alone; clitics split off ("dog's" -> dog, 's). Sentence ends
    are found as Punkt finds them in ordinary prose (a period after a word, not an abbreviation).
    Not ported: Penn Treebank contractions ("cannot" -> can, not), which name no object.
    """
    text = _OPENING_QUOTE.sub("' ", _ALONE.sub(r" \1 ", text))
    tokens = text.split()
    words: list[str] = []
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        period = token[-1] == "."
        if not period and "'" not in token:  # most words: kept as they are
            words.append(token)
            continue
        if period and not token.endswith("..") and len(token) > 1:
            period = i == last or _ends_sentence(token)
            if period:
                token = token[:-1]
        else:
            period = False
        clitic = _CLITIC.match(token) if "'" in token else None
        words.extend(clitic.groups() if clitic else (token,))
        if period:
            words.append(".")
    return words


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


def plural_lemma(word: str) -> str:
    """The singular of a plural noun form ("dogs" -> dog, "knives" -> knife); other words as
    written.

    A word the noun tables know gets its noun lemma; a word they know only as another part of
    speech is kept ("ferrying", "pursed", "clocked" are verb forms, not ferry, purse, clock); an
    unknown word is singularized only when it ends in a plural -s ("bi-planes" -> bi-plane).
    """
    readings = getAllLemmas(word)
    if "NOUN" in readings:
        return readings["NOUN"][0]
    if readings or not _PLURAL_ENDING.search(word):
        return word
    return getAllLemmasOOV(word, upos="NOUN")["NOUN"][0]


def _noun_flags(tokens: Sequence[str]) -> list[bool]:
    """Which words of an object name are nouns, as a tagger would read a noun phrase.

    Read right to left: a word with a noun reading is a noun, unless it also reads as an
    adjective and a noun follows it ("red car": red modifies car); closed-class words and
    punctuation never are; an unknown word is (taggers call unknown words nouns).
    """
    flags = [False] * len(tokens)
    for i in range(len(tokens) - 1, -1, -1):
        word = tokens[i]
        if word in _CLOSED_CLASS or not word[:1].isalnum():
            continue
        readings = getAllLemmas(word)
        before_noun = i + 1 < len(tokens) and flags[i + 1]
        if "ADJ" in readings and before_noun:
            continue
        flags[i] = "NOUN" in readings or "PROPN" in readings or not readings
    return flags


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
        """The word as the tables spell it: itself when the tables know it, else `plural_lemma`.

        Known words are kept as written so "people", "skis" and "sports" (of "sports ball") are
        not turned into other words first; "dogs" -> dog, "men" -> man, "knives" -> knife.
        """
        found = self._singular.get(word)
        if found is None:
            found = word if word in self._known else plural_lemma(word)
            self._singular[word] = found
        return found

    def mentions(self, text: str) -> list[tuple[str, str]]:
        """(word or phrase as normalized, category) of every object mention, in order."""
        singular = self._singular
        words = [singular.get(w) or self.singular(w) for w in word_tokens(text.lower())]
        said = self._phrased(words, keep_words=True)
        found = [(w, self.synonyms[w]) for w in said if w in self.synonyms]
        if any(w == "toilet" for w in said):
            found = [(w, c) for w, c in found if w != "seat"]
        return found

    def _phrased(self, words: Sequence[str], keep_words: bool) -> list[str]:
        """Left to right, each two-word window in `phrases` replaced by what it stands for.

        keep_words: keep the words outside phrases (False: the phrases alone).
        """
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
            if keep_words:
                said.append(word)
            i += 1
        return said

    def name_objects(self, name: str) -> list[str]:
        """The object words a judge's object name stands for, as RLHF-V reads a name.

        Its two-word phrases if it has any ("a baby elephant" -> elephant); else each run of
        nouns, singularized and joined ("dog bed" -> "dog bed", which names no category; "red
        car" -> car; "bunch of bananas" -> bunch, banana). Hyphens split words here, as spaCy's
        tokenizer (the reference's) splits them.
        """
        text = _HYPHEN_IN_WORD.sub(" - ", name.strip().lower())
        tokens = word_tokens(text)
        words = [self.singular(t) for t in tokens]
        phrases = self._phrased(words, keep_words=False)
        if phrases:
            return phrases
        runs: list[list[str]] = [[]]
        for word, noun in zip(words, _noun_flags(tokens), strict=True):
            if noun:
                runs[-1].append(word)
            elif runs[-1]:
                runs.append([])
        return [" ".join(run) for run in runs if run]


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
    """The categories of a list of object names (a judge's extraction), as RLHF-V maps them.

    Each name becomes object words (`ObjectVocabulary.name_objects`); the words are
    de-duplicated after singularizing ("dog", "dogs" -> one dog; "toilet", "toilet seat" -> one
    toilet), `seat` is dropped when a `toilet` is listed, and what the synonym list names is kept.
    """
    vocabulary = vocabulary or coco_vocabulary()
    words = [w for name in objects for w in vocabulary.name_objects(name)]
    unique = list(dict.fromkeys(words))
    if "toilet" in unique:
        unique = [w for w in unique if w != "seat"]
    return [vocabulary.synonyms[w] for w in unique if w in vocabulary.synonyms]
