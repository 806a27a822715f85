"""The lexical injector: deterministic, offline, vocabulary-driven errors in a gold answer.

It swaps, inserts or deletes an object, changes a colour, a count or a position, or flips a
yes/no answer, and is co-occurrence-aware: an inserted object follows the prior (the objects that
come with those present). ShapeWorld captions are parsed and rewritten in the world's own format. The same
(gold, seed) always gives the same rewrite.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lemminflect import getInflection

from bpo.bootstrap.config import EDIT_TYPES
from bpo.bootstrap.inject.validate import Injection, InjectionStats, checked
from bpo.data.vocab import ObjectVocabulary, coco_vocabulary
from bpo.shapeworld.metrics import is_well_formed

COLOUR_WORDS = (
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "white",
    "black",
    "brown",
    "orange",
    "pink",
    "grey",
    "gray",
    "silver",
)
COUNT_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Each position word turns into its opposite: the most confusable wrong position.
_OPPOSITE_PAIRS = (
    ("left", "right"),
    ("top", "bottom"),
    ("above", "below"),
    ("upper", "lower"),
    ("over", "under"),
    ("inside", "outside"),
    ("front", "back"),
    ("near", "far"),
    ("behind", "beside"),
)
POSITION_OPPOSITES = {a: b for pair in _OPPOSITE_PAIRS for a, b in (pair, pair[::-1])}
# Words a noun phrase may start with before its object word ("a small red dog").
_NP_WORDS = frozenset(
    (
        "a",
        "an",
        "the",
        "one",
        "some",
        "small",
        "large",
        "big",
        "little",
        *COUNT_WORDS,
        *COLOUR_WORDS,
    )
)
_TOKEN = re.compile(r"[A-Za-z]+|\d+")


@dataclass
class InjectionVocabulary:
    """The words the lexical injector edits, and the prior its insertions follow.

    objects: CHAIR's word tables: which words mention which category.
    categories: the names inserted or swapped in, one per category.
    cooccurrence: {category: {category: count}}: how often two categories appear together; an
        inserted category is drawn with weight sum(count with each category present), uniformly
        over the absent ones when every weight is 0.
    shapeworld_captions: parse captions in ShapeWorld's format ("a red circle and a blue ring.") and
        rewrite them in it: objects in the world's shape order.
    """

    objects: ObjectVocabulary
    categories: tuple[str, ...]
    colours: tuple[str, ...] = COLOUR_WORDS
    counts: tuple[str, ...] = COUNT_WORDS
    positions: Mapping[str, str] = field(default_factory=lambda: dict(POSITION_OPPOSITES))
    cooccurrence: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    shapeworld_captions: bool = False

    @classmethod
    def coco(cls, cooccurrence: Mapping[str, Mapping[str, float]] | None = None):
        """COCO's 80 categories through the CHAIR synonym list; no prior unless given one."""
        vocabulary = coco_vocabulary()
        categories = tuple(dict.fromkeys(vocabulary.synonyms.values()))
        return cls(vocabulary, categories, cooccurrence=dict(cooccurrence or {}))

    @classmethod
    def shapeworld(cls, cooccurrence: Mapping[str, Mapping[str, float]] | None = None):
        """ShapeWorld's shapes and colours; the prior defaults to the text corpus's partners."""
        from bpo.shapeworld.world import COLOURS, NUMBER_WORDS, PARTNERS, SHAPES, shape_vocabulary

        prior = cooccurrence or {s: {p: 1.0} for s, p in PARTNERS.items()}
        return cls(
            shape_vocabulary(SHAPES),
            SHAPES,
            colours=COLOURS,
            counts=NUMBER_WORDS[2:],
            cooccurrence=prior,
            shapeworld_captions=True,
        )


def _capitalized(before: str, rest: str) -> str:
    """before + rest, rest capitalized when it now starts a sentence."""
    if not before.strip() or re.search(r"[.!?]\s*$", before):
        rest = rest[:1].upper() + rest[1:]
    return before + rest


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


@dataclass
class _Mention:
    start: int  # character span of the object word(s)
    end: int
    category: str
    plural: bool
    np_start: int  # where its noun phrase starts ("a red dog": at "a")


class _Editor:
    """One random edit of a text; each method returns (new text, edit record) or None."""

    def __init__(self, text: str, vocabulary: InjectionVocabulary, rng: random.Random):
        self.text, self.vocabulary, self.rng = text, vocabulary, rng
        self.tokens = [(m.start(), m.end(), m.group().lower()) for m in _TOKEN.finditer(text)]

    def mentions(self) -> list[_Mention]:
        objects = self.vocabulary.objects
        found, i, tokens = [], 0, self.tokens
        while i < len(tokens):
            _, end, word = tokens[i]
            if i + 1 < len(tokens):
                phrase = f"{objects.singular(word)} {objects.singular(tokens[i + 1][2])}"
                target = objects.phrases.get(phrase)
                if target is not None:
                    if target in objects.synonyms:
                        last = tokens[i + 1][2]
                        plural = objects.singular(last) != last
                        found.append(self._mention(i, tokens[i + 1][1], target, plural))
                    i += 2
                    continue
            singular = objects.singular(word)
            if singular in objects.synonyms:
                found.append(self._mention(i, end, objects.synonyms[singular], singular != word))
            i += 1
        return found

    def _mention(self, i: int, end: int, category: str, plural: bool) -> _Mention:
        j = i
        while j > 0 and self.tokens[j - 1][2] in _NP_WORDS:
            between = self.text[self.tokens[j - 1][1] : self.tokens[j][0]]
            if between.strip():
                break
            j -= 1
        return _Mention(self.tokens[i][0], end, category, plural, self.tokens[j][0])

    def _replace(self, start: int, end: int, new: str) -> str:
        """Replace text[start:end], fixing an 'a'/'an' right before it."""
        before, after = self.text[:start], self.text[end:]
        match = re.search(r"\b([Aa]n?)(\s+)$", before)
        if match:
            article = _article(new)
            article = article.capitalize() if match.group(1)[0] == "A" else article
            before = before[: match.start()] + article + match.group(2)
        return before + new + after

    def _name(self, category: str, plural: bool) -> str:
        if not plural:
            return category
        head, _, last = category.rpartition(" ")
        inflected = getInflection(last, tag="NNS")
        last = inflected[0] if inflected else last + "s"
        return f"{head} {last}".strip()

    def swap_object(self):
        mentions = self.mentions()
        if not mentions:
            return None
        m = self.rng.choice(mentions)
        present = {x.category for x in mentions}
        choices = [c for c in self.vocabulary.categories if c not in present]
        if not choices:
            return None
        new = self.rng.choice(choices)
        text = self._replace(m.start, m.end, self._name(new, m.plural))
        return text, {"type": "swap_object", "from": m.category, "to": new}

    def _draw_absent(self, present: set[str]) -> str | None:
        absent = [c for c in self.vocabulary.categories if c not in present]
        if not absent:
            return None
        prior = self.vocabulary.cooccurrence
        weights = [sum(prior.get(p, {}).get(c, 0.0) for p in sorted(present)) for c in absent]
        if sum(weights) <= 0:
            return self.rng.choice(absent)
        return self.rng.choices(absent, weights=weights)[0]

    def insert_object(self):
        mentions = self.mentions()
        if not mentions:
            return None
        new = self._draw_absent({m.category for m in mentions})
        if new is None:
            return None
        m = self.rng.choice(mentions)
        text = self.text[: m.end] + f" and {_article(new)} {new}" + self.text[m.end :]
        return text, {"type": "insert_object", "object": new, "after": m.category}

    def delete_object(self):
        mentions = self.mentions()
        text = self.text
        options = []
        for k, m in enumerate(mentions):
            before, after = text[: m.np_start], text[m.end :]
            prev = mentions[k - 1] if k > 0 else None
            nxt = mentions[k + 1] if k + 1 < len(mentions) else None
            gap_before = text[prev.end : m.np_start] if prev else ""
            gap_after = text[m.end : nxt.np_start] if nxt else ""
            if re.fullmatch(r",\s*", gap_before):  # "a, B and c" -> "a and c"
                options.append((m, text[: prev.end] + after))
            elif re.fullmatch(r",\s*", gap_after):  # "A, b and c" -> "b and c"
                options.append((m, _capitalized(before, text[nxt.np_start :])))
            elif re.fullmatch(r"\s+and\s+", gap_before):  # "a and B" -> "a"
                new = text[: prev.end] + after
                # "a, b and C" -> "a and b": the list's last comma becomes its "and".
                comma = re.search(r",\s*$", new[: prev.np_start])
                if comma:
                    new = new[: comma.start()] + " and " + new[prev.np_start :]
                options.append((m, new))
            elif re.fullmatch(r"\s+and\s+", gap_after):  # "A and b" -> "b"
                options.append((m, _capitalized(before, text[nxt.np_start :])))
        if not options:
            return None
        m, new = self.rng.choice(options)
        return new, {"type": "delete_object", "object": m.category}

    def _word_edit(self, kind: str, words: Sequence[str], pick) -> tuple[str, dict] | None:
        found = [(s, e, w) for s, e, w in self.tokens if w in words]
        if not found:
            return None
        start, end, word = self.rng.choice(found)
        new = pick(word)
        if new is None or new == word:
            return None
        original = self.text[start:end]
        new_cased = new.capitalize() if original[:1].isupper() else new
        return self._replace(start, end, new_cased), {"type": kind, "from": word, "to": new}

    def change_colour(self):
        colours = self.vocabulary.colours
        return self._word_edit(
            "change_colour", colours, lambda w: self.rng.choice([c for c in colours if c != w])
        )

    def change_count(self):
        counts = self.vocabulary.counts
        return self._word_edit(
            "change_count", counts, lambda w: self.rng.choice([c for c in counts if c != w])
        )

    def flip_answer(self):
        """A yes/no answer turned into its opposite: its first word ("Yes." -> "No.") or its last
        ("ring yes." -> "ring no."), the word's case kept."""
        if not self.tokens:
            return None
        for start, end, word in (self.tokens[0], self.tokens[-1]):
            at_edge = start == len(self.text) - len(self.text.lstrip()) or re.fullmatch(
                r"[.!?]?", self.text[end:].strip()
            )
            if word in ("yes", "no") and at_edge:
                new = "no" if word == "yes" else "yes"
                original = self.text[start:end]
                if original.isupper() and len(original) > 1:
                    new = new.upper()
                elif original[:1].isupper():
                    new = new.capitalize()
                text = self.text[:start] + new + self.text[end:]
                return text, {"type": "flip_answer", "from": word, "to": new.lower()}
        return None

    def change_position(self):
        positions = self.vocabulary.positions
        return self._word_edit("change_position", tuple(positions), positions.get)


def _shapeworld_items(text: str, vocabulary: InjectionVocabulary) -> list[list[str]] | None:
    """[[colour, shape], ...] of a ShapeWorld caption (the world's grammar, `is_well_formed`),
    or None when the text is not one or names no object."""
    if not is_well_formed(text, vocabulary.categories, vocabulary.colours):
        return None
    colours, shapes = "|".join(vocabulary.colours), "|".join(vocabulary.categories)
    return [list(m) for m in re.findall(rf"a ({colours}) ({shapes})", text)] or None


def _shapeworld_caption(items: list[list[str]], vocabulary: InjectionVocabulary) -> str:
    """The caption of `items` in the world's format: shape order, 'a, b and c.'."""
    ordered = sorted(items, key=lambda item: vocabulary.categories.index(item[1]))
    phrases = [f"a {colour} {shape}" for colour, shape in ordered]
    if len(phrases) == 1:
        return phrases[0] + "."
    return ", ".join(phrases[:-1]) + " and " + phrases[-1] + "."


def _shapeworld_edit(items: list[list[str]], kind: str, editor: _Editor):
    vocabulary, rng = editor.vocabulary, editor.rng
    present = {shape for _, shape in items}
    items = [list(item) for item in items]
    if kind == "swap_object":
        absent = [s for s in vocabulary.categories if s not in present]
        if not absent:
            return None
        item = rng.choice(items)
        old, item[1] = item[1], rng.choice(absent)
        return items, {"type": kind, "from": old, "to": item[1]}
    if kind == "insert_object":
        new = editor._draw_absent(present)
        if new is None:
            return None
        colour = rng.choice(vocabulary.colours)
        return [*items, [colour, new]], {"type": kind, "object": new, "colour": colour}
    if kind == "delete_object":
        if len(items) < 2:
            return None
        gone = items.pop(rng.randrange(len(items)))
        return items, {"type": kind, "object": gone[1]}
    if kind == "change_colour":
        item = rng.choice(items)
        old, item[0] = item[0], rng.choice([c for c in vocabulary.colours if c != item[0]])
        return items, {"type": kind, "from": old, "to": item[0], "object": item[1]}
    return None  # ShapeWorld captions state no count or position


def inject_errors(
    gold: str,
    vocabulary: InjectionVocabulary,
    seed: int = 0,
    num_edits: int = 1,
    edit_types: Sequence[str] = EDIT_TYPES,
    stats: InjectionStats | None = None,
    min_ratio: float = 0.5,
    max_ratio: float = 2.0,
) -> Injection:
    """`gold` with `num_edits` random edits (types from `edit_types`), validated and counted.

    Each edit is drawn among the types that apply to the text, so the same (gold, seed) always
    gives the same rewrite; a gold answer no edit applies to is rejected as "no_edit".
    """
    unknown = set(edit_types) - set(EDIT_TYPES)
    if unknown:
        raise ValueError(f"unknown edit types {sorted(unknown)}; choose from {EDIT_TYPES}")
    rng = random.Random(seed)
    text, edits = gold, []
    for _ in range(num_edits):
        editor = _Editor(text, vocabulary, rng)
        items = _shapeworld_items(text, vocabulary) if vocabulary.shapeworld_captions else None
        # A yes/no answer's error is first of all the flipped answer; every other text draws
        # its edit order as it did before the flip existed.
        order = [kind for kind in edit_types if kind != "flip_answer"]
        rng.shuffle(order)
        if "flip_answer" in edit_types:
            order.insert(0, "flip_answer")
        for kind in order:
            if items is not None:
                done = _shapeworld_edit(items, kind, editor)
                if done is not None:
                    done = (_shapeworld_caption(done[0], vocabulary), done[1])
            else:
                done = getattr(editor, kind)()
            if done is not None:
                text = done[0]
                edits.append(done[1])
                break
    if not edits:
        if stats is not None:
            stats.record("no_edit")
        return Injection(gold, None, "no_edit", None, [])
    return checked(gold, text, edits, stats, min_ratio, max_ratio)
