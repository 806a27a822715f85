"""How AMBER's generative scorer reads a description: its nouns, and when two words are synonyms.

AMBER's reference scorer (`inference.py` of the release) takes the tokens of `nltk.word_tokenize`
that `nltk.pos_tag` tags NN*, lemmatizes each with NLTK's `WordNetLemmatizer` (as a noun, case
kept: "Dog" stays "Dog"), and calls two words near-synonyms when spaCy `en_core_web_lg` gives
`nlp(a).similarity(nlp(b))` above 0.8. Both halves are pluggable here, and the results name the
pair that produced the numbers (`MatcherInfo`):

nouns (`amber_nouns`)
    "nltk"        the reference's own calls. Needs `nltk` and its data (punkt_tab,
                  averaged_perceptron_tagger_eng, wordnet), installed by the user; without them
                  the run stops naming the command that installs them.
    "vocabulary"  an offline approximation that needs no data: every word (letters and hyphens,
                  case kept) is a candidate noun, with no part-of-speech filter, lemmatized by
                  WordNet's own noun suffix rules keeping only forms in AMBER's vocabulary.
similarity (`amber_similarity`)
    "spacy:MODEL" `nlp(a).similarity(nlp(b))` of an installed spaCy model, as the reference
                  (MODEL en_core_web_lg reproduces it).
    "vectors:PATH" a word-vector table, a JSON object {word: [numbers]}, compared by spaCy's rules
                  for a Doc (below).
    "exact"       no near-synonyms: two words match only when their texts are equal.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Similarity = Callable[[str, str], float]
SIMILARITY_KINDS = ("spacy:", "vectors:", "exact")
NOUN_SOURCES = ("nltk", "vocabulary")
NLTK_DATA = ("punkt_tab", "averaged_perceptron_tagger_eng", "wordnet")
NLTK_INSTALL = f"pip install nltk && python -m nltk.downloader {' '.join(NLTK_DATA)}"
SPACY_INSTALL = "pip install spacy && python -m spacy download {model}"


class MatcherUnavailableError(RuntimeError):
    """The noun extractor or the similarity a benchmark names is not installed here."""


@dataclass(frozen=True)
class NounExtractor:
    """Text -> the lemmas of its noun tokens, in order: tokenize, tag, keep NN*, lemmatize."""

    tokenize: Callable[[str], list[str]]
    tag: Callable[[list[str]], list[tuple[str, str]]]
    lemmatize: Callable[[str], str]
    name: str

    def __call__(self, text: str) -> list[str]:
        tagged = self.tag(self.tokenize(text))
        return [self.lemmatize(word) for word, pos in tagged if pos.startswith("NN")]


# --- nouns: NLTK, as the reference --------------------------------------------------------------

_MISSING_RESOURCE = re.compile(r"Resource '?([\w.]+)'? not found")


def nltk_extractor() -> NounExtractor:
    """The reference's noun extraction; a clear error when nltk or its data is not installed."""
    try:
        import nltk
        from nltk.stem import WordNetLemmatizer
    except ImportError:
        raise MatcherUnavailableError(
            "AMBER's generative scoring (amber_nouns: nltk) needs nltk: "
            f"`{NLTK_INSTALL}`; or set amber_nouns: vocabulary for the offline approximation"
        ) from None
    lemmatizer = WordNetLemmatizer()
    missing = []
    for probe in (
        lambda: nltk.word_tokenize("A dog."),
        lambda: nltk.pos_tag(["A", "dog"]),
        lambda: lemmatizer.lemmatize("dogs"),
    ):
        try:
            probe()
        except LookupError as exc:
            found = _MISSING_RESOURCE.search(str(exc))
            missing.append(found.group(1) if found else str(exc).strip().splitlines()[0])
    if missing:
        raise MatcherUnavailableError(
            f"AMBER's generative scoring (amber_nouns: nltk) needs NLTK data that is not "
            f"installed: {', '.join(missing)}. Install it with `python -m nltk.downloader "
            f"{' '.join(NLTK_DATA)}` (or set NLTK_DATA to where it is), or set amber_nouns: "
            "vocabulary for the offline approximation"
        )
    return NounExtractor(
        tokenize=nltk.word_tokenize,
        tag=nltk.pos_tag,
        lemmatize=lemmatizer.lemmatize,
        name=f"nltk {nltk.__version__} (word_tokenize, pos_tag, WordNetLemmatizer)",
    )


# --- nouns: the offline approximation -----------------------------------------------------------

_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")
# WordNet's detachment rules for nouns (morphy): suffix -> replacement.
_NOUN_SUFFIXES = (
    ("s", ""),
    ("ses", "s"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("men", "man"),
    ("ies", "y"),
)


def vocabulary_lemma(word: str, vocabulary: Collection[str]) -> str:
    """WordNet's noun lemma of `word` where the lemma is one of AMBER's words, else `word`.

    Like `WordNetLemmatizer.lemmatize`, the shortest of the word and its detached forms that is a
    known noun wins; "known" here means in `vocabulary` instead of in WordNet ("cups" -> "cup",
    "glasses" -> "glass", "benches" -> "bench").
    """
    forms = [word] + [
        word[: -len(suffix)] + ending for suffix, ending in _NOUN_SUFFIXES if word.endswith(suffix)
    ]
    known = [form for form in forms if form in vocabulary]
    return min(known, key=len) if known else word


def vocabulary_extractor(vocabulary: Collection[str]) -> NounExtractor:
    """Every word a candidate noun (no tagger), lemmatized against AMBER's own vocabulary."""
    words = frozenset(vocabulary)
    return NounExtractor(
        tokenize=_WORD.findall,
        tag=lambda tokens: [(token, "NN") for token in tokens],
        lemmatize=functools.lru_cache(maxsize=None)(lambda w: vocabulary_lemma(w, words)),
        name="vocabulary (no tagger; WordNet noun suffix rules within AMBER's vocabulary)",
    )


def noun_extractor(source: str, vocabulary: Collection[str]) -> NounExtractor:
    """The extractor `amber_nouns` names."""
    if source == "nltk":
        return nltk_extractor()
    if source == "vocabulary":
        return vocabulary_extractor(vocabulary)
    raise ValueError(f"amber_nouns {source!r}: use one of {', '.join(NOUN_SOURCES)}")


# --- similarity ---------------------------------------------------------------------------------


def doc_similarity(a: Sequence[str], b: Sequence[str], vector: Callable[[str], Any]) -> float:
    """spaCy's `Doc.similarity` over token lists: 1.0 for the same tokens; else the cosine of the
    mean token vectors (a token without a vector counts as zeros), 0.0 when either mean is zero.

    vector(token): the token's vector (a sequence of numbers), or None when it has none.
    """
    if list(a) == list(b):
        return 1.0
    means = []
    for tokens in (a, b):
        vectors = [vector(t) for t in tokens]
        size = next((len(v) for v in vectors if v is not None), 0)
        total = [0.0] * size
        for v in vectors:
            if v is not None:
                total = [x + y for x, y in zip(total, v, strict=True)]
        means.append([x / len(tokens) for x in total] if tokens else [])
    norms = [math.sqrt(sum(x * x for x in m)) for m in means]
    if not norms[0] or not norms[1] or len(means[0]) != len(means[1]):
        return 0.0
    return sum(x * y for x, y in zip(*means, strict=True)) / (norms[0] * norms[1])


def read_vector_table(path: str | Path) -> dict[str, list[float]]:
    """A word-vector table: a JSON object {word: [numbers]}, every vector of one length."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"amber_similarity: vector table {path} not found; check the path")
    table = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(table, dict):
        raise ValueError(f"{path}: a vector table is a JSON object {{word: [numbers]}}")
    sizes = set()
    for word, vector in table.items():
        if not isinstance(vector, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in vector
        ):
            raise ValueError(f"{path}: the vector of {word!r} is not a list of numbers")
        sizes.add(len(vector))
    if len(sizes) > 1:
        raise ValueError(f"{path}: vectors have different lengths {sorted(sizes)}; use one")
    return table


def table_similarity(table: dict[str, list[float]]) -> Similarity:
    """Similarity by a vector table: a word found whole is one token, else its spaced parts."""

    def tokens(text: str) -> list[str]:
        return [text] if text in table else text.split()

    return lambda a, b: doc_similarity(tokens(a), tokens(b), table.get)


def spacy_similarity(model: str) -> tuple[Similarity, str]:
    """`nlp(a).similarity(nlp(b))` of an installed spaCy model (each text parsed once), and its
    name; a clear error when spaCy or the model is not installed."""
    try:
        import spacy
    except ImportError:
        raise MatcherUnavailableError(
            f"amber_similarity spacy:{model} needs spaCy: `{SPACY_INSTALL.format(model=model)}`; "
            "or use amber_similarity: vectors:PATH or exact"
        ) from None
    try:
        nlp = spacy.load(model)
    except OSError:
        raise MatcherUnavailableError(
            f"amber_similarity spacy:{model}: the spaCy model {model} is not installed: "
            f"`python -m spacy download {model}`; or use amber_similarity: vectors:PATH or exact"
        ) from None
    parse = functools.lru_cache(maxsize=None)(nlp)
    version = nlp.meta.get("version", "?")
    return (
        lambda a, b: float(parse(a).similarity(parse(b))),
        f"spacy {spacy.__version__} {model} {version}",
    )


def check_similarity_name(name: str) -> None:
    """Fail on an `amber_similarity` that names no kind of similarity (no file is read)."""
    if name == "exact" or (
        name.startswith(("spacy:", "vectors:")) and name.split(":", 1)[1].strip()
    ):
        return
    raise ValueError(
        f"amber_similarity {name!r}: use spacy:MODEL (spacy:en_core_web_lg is the reference's), "
        "vectors:PATH (a JSON word-vector table) or exact"
    )


def similarity(name: str) -> tuple[Similarity, str]:
    """The similarity `amber_similarity` names, and the name the results record."""
    check_similarity_name(name)
    if name == "exact":
        return (lambda a, b: 1.0 if a == b else 0.0), "exact (no near-synonyms)"
    kind, value = name.split(":", 1)
    if kind == "spacy":
        return spacy_similarity(value)
    return table_similarity(read_vector_table(value)), f"vectors {value}"


def check_available(nouns: str, similarity_name: str) -> None:
    """Fail now, before any answer is generated, when the named matcher cannot be built here."""
    check_similarity_name(similarity_name)
    if nouns == "nltk":
        nltk_extractor()
    kind, _, value = similarity_name.partition(":")
    if kind == "vectors" and not Path(value).is_file():
        raise FileNotFoundError(f"amber_similarity: vector table {value} not found; check the path")
    if kind == "spacy":
        try:
            import spacy
        except ImportError:
            raise MatcherUnavailableError(
                f"amber_similarity spacy:{value} needs spaCy: "
                f"`{SPACY_INSTALL.format(model=value)}`; or use vectors:PATH or exact"
            ) from None
        if not (spacy.util.is_package(value) or Path(value).is_dir()):
            raise MatcherUnavailableError(
                f"amber_similarity spacy:{value}: the spaCy model {value} is not installed: "
                f"`python -m spacy download {value}`; or use vectors:PATH or exact"
            )


@dataclass(frozen=True)
class Matcher:
    """The pair that reads descriptions: nouns, near-synonym similarity and its threshold."""

    nouns: NounExtractor
    similar: Similarity
    threshold: float
    similarity_name: str

    def synonyms(self, a: str, b: str) -> bool:
        return self.similar(a, b) > self.threshold

    def info(self) -> dict[str, Any]:
        """What results.json records of the matcher, so runs scored differently are told apart."""
        return {
            "nouns": self.nouns.name,
            "similarity": self.similarity_name,
            "threshold": self.threshold,
        }


def build_matcher(
    nouns: str, similarity_name: str, threshold: float, vocabulary: Collection[str]
) -> Matcher:
    """The matcher an AMBER benchmark's settings name."""
    similar, name = similarity(similarity_name)
    cached = functools.lru_cache(maxsize=None)(similar)
    return Matcher(noun_extractor(nouns, vocabulary), cached, threshold, name)
