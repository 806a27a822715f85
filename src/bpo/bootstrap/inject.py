"""Error-injected negatives: the gold answer rewritten to be similar but wrong.

Three rewriters share one validation step (`validate_rewrite`), whose rejects are counted per
reason in an `InjectionStats` for the manifest, never dropped silently:

- `inject_errors`: a deterministic, offline, vocabulary-driven injector (swap, insert or delete an
  object, change a colour, a count or a position), co-occurrence-aware so that insertions follow
  the prior; ShapeWorld captions are parsed and rewritten in the world's own format;
- `LocalRewriter`: any local causal LM (by default the MLLM's own language model, see
  `causal_lm_from_mllm`), prompted through its own chat template with few-shot examples;
- `EndpointRewriter`: an OpenAI-compatible chat endpoint, through bpo.endpoint.ChatClient.

The official code's rewriter ignored its max-token setting, never checked that a rewrite differs
from the gold answer, and cut the first character off every output; all three are fixed here.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from lemminflect import getInflection
from transformers import LogitsProcessorList

from bpo.bootstrap.weaken import KeyedSampler, stream_seed
from bpo.data.vocab import ObjectVocabulary, coco_vocabulary
from bpo.endpoint import ChatClient, EndpointConfig, Messages

# --- Validation -------------------------------------------------------------------------------

REJECT_REASONS = ("empty", "identical", "too_short", "too_long", "no_edit")

# What chat models put before the answer they were asked for. Matched at the start only, one
# after another ("Sure! Here is the rewritten description:" is two of them).
PREAMBLES = (
    r"(?:sure|certainly|of course|okay|ok|absolutely)\b[!.,]?",
    # "Here is the rewritten description:" but not "Here is a dog: ...", which may be the answer
    r"here(?:'s| is| are)\b[^:\n]{0,60}?(?:rewrit|modif|alter|edit|version|descri|answer|"
    r"caption|response)[^:\n]{0,30}:",
    r"(?:the\s+)?(?:rewritten|modified|altered|new|incorrect|wrong|edited)\s+"
    r"(?:description|answer|caption|text|version|response)\s*:",
    r"(?:rewrite|rewritten|description|answer|caption|response|output)\s*:",
    r"assistant\s*:",
)
_PREAMBLE = re.compile(r"^\s*(?:" + "|".join(PREAMBLES) + r")\s*", re.IGNORECASE)
_QUOTES = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("`", "`"))
_NON_WORD = re.compile(r"[^\w\s]+")


def strip_preamble(text: str) -> str:
    """`text` without leading chat preambles and without quotes around the whole of it."""
    text = text.strip()
    while True:
        stripped = _PREAMBLE.sub("", text, count=1).strip()
        for left, right in _QUOTES:
            if len(stripped) >= 2 and stripped[0] == left and stripped[-1] == right:
                stripped = stripped[1:-1].strip()
        if stripped == text:
            return text
        text = stripped


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: what 'identical' compares."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def validate_rewrite(
    gold: str, rewrite: str | None, min_ratio: float = 0.5, max_ratio: float = 2.0
) -> tuple[str | None, str | None]:
    """(cleaned rewrite, None) when usable, else (None, reason): one of `REJECT_REASONS`.

    min_ratio, max_ratio: bounds on the rewrite's length in words over the gold answer's, so
    that negatives do not differ from the gold in length (DPO would learn length instead).
    """
    cleaned = strip_preamble(rewrite or "")
    if not normalize(cleaned):
        return None, "empty"
    if normalize(cleaned) == normalize(gold):
        return None, "identical"
    ratio = len(cleaned.split()) / max(1, len(gold.split()))
    if ratio < min_ratio:
        return None, "too_short"
    if ratio > max_ratio:
        return None, "too_long"
    return cleaned, None


@dataclass
class InjectionStats:
    """Accepted rewrites and rejects per reason, as the manifest reports them."""

    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)

    def record(self, reason: str | None) -> None:
        if reason is None:
            self.accepted += 1
        else:
            self.rejected[reason] += 1

    def as_dict(self) -> dict:
        return {"accepted": self.accepted, "rejected": dict(sorted(self.rejected.items()))}


@dataclass
class Injection:
    """One rewrite: `text` (None when rejected, with `reason`), `raw` output, `edits` made."""

    gold: str
    text: str | None
    reason: str | None
    raw: str | None = None
    edits: list[dict[str, Any]] = field(default_factory=list)


def _checked(
    gold: str,
    raw: str | None,
    edits: list[dict[str, Any]],
    stats: InjectionStats | None,
    min_ratio: float,
    max_ratio: float,
) -> Injection:
    text, reason = validate_rewrite(gold, raw, min_ratio, max_ratio)
    if stats is not None:
        stats.record(reason)
    return Injection(gold, text, reason, raw, edits)


# --- Lexical injector -------------------------------------------------------------------------

COLOUR_WORDS = (
    "red", "green", "blue", "yellow", "purple", "white", "black", "brown", "orange", "pink",
    "grey", "gray", "silver",
)  # fmt: skip
COUNT_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Each position word turns into its opposite: the most confusable wrong position.
POSITION_OPPOSITES = {
    "left": "right", "right": "left", "top": "bottom", "bottom": "top", "above": "below",
    "below": "above", "upper": "lower", "lower": "upper", "over": "under", "under": "over",
    "inside": "outside", "outside": "inside", "front": "back", "back": "front", "near": "far",
    "far": "near", "behind": "beside", "beside": "behind",
}  # fmt: skip
EDIT_TYPES = (
    "swap_object",
    "insert_object",
    "delete_object",
    "change_colour",
    "change_count",
    "change_position",
)
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

    def change_position(self):
        positions = self.vocabulary.positions
        return self._word_edit("change_position", tuple(positions), positions.get)


def _shapeworld_items(text: str, vocabulary: InjectionVocabulary) -> list[list[str]] | None:
    """[[colour, shape], ...] of a ShapeWorld caption, or None when the text is not one."""
    colours, shapes = "|".join(vocabulary.colours), "|".join(vocabulary.categories)
    item = rf"a ({colours}) ({shapes})"
    if not re.fullmatch(rf"{item}(?:, {item})*(?: and {item})?\.", text.strip()):
        return None
    return [list(m) for m in re.findall(item, text)]


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
        order = list(edit_types)
        rng.shuffle(order)
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
    return _checked(gold, text, edits, stats, min_ratio, max_ratio)


# --- LLM rewriters ----------------------------------------------------------------------------

Mode = Literal["description", "qa"]

REWRITE_INSTRUCTIONS = {
    "description": (
        "Rewrite the image description below so that it stays close to the original in wording "
        "and length but becomes subtly wrong about the image: add an object that is not there, "
        "drop one that is, or change a colour, a number, a position or a relation. Change one "
        "or two details only, keep everything else word for word, and reply with the rewritten "
        "description alone."
    ),
    "qa": (
        "Below are a question about an image and its correct answer. Rewrite the answer so that "
        "it stays close to the original in wording and length but becomes subtly wrong: a "
        "different object, colour, number, position or relation. Keep everything else word "
        "for word and reply with the rewritten answer alone."
    ),
}
# Written for this project: each shows one or two small, plausible errors.
DESCRIPTION_EXAMPLES = (
    (
        "A brown dog sleeps on a grey sofa next to two cushions.",
        "A brown cat sleeps on a grey sofa next to three cushions.",
    ),
    (
        "Three people wait at a bus stop while a red bus pulls in on the left.",
        "Three people wait at a bus stop while a blue bus pulls in on the right.",
    ),
    (
        "A plate holds a sandwich and an apple; a cup of coffee stands behind it.",
        "A plate holds a sandwich, an apple and a banana; a cup of tea stands behind it.",
    ),
)
QA_EXAMPLES = (
    ("What is the man holding?", "He is holding a black umbrella.", "He is holding a black bag."),
    (
        "How many birds are on the fence?",
        "There are four birds on the fence.",
        "There are six birds on the fence.",
    ),
    (
        "Where is the laptop?",
        "The laptop is on the desk, to the left of the lamp.",
        "The laptop is on the desk, to the right of the lamp.",
    ),
)


def _qa_turn(question: str, answer: str) -> str:
    return f"Question: {question}\nAnswer: {answer}"


def rewrite_messages(
    gold: str, mode: Mode = "description", question: str | None = None
) -> Messages:
    """The few-shot chat asking for a subtly wrong rewrite of `gold`.

    The instructions open the first user turn (not a system turn: some chat templates refuse
    one); each example is a user turn and the assistant's rewrite.
    """
    if mode not in REWRITE_INSTRUCTIONS:
        raise ValueError(f"unknown rewrite mode {mode!r}; use 'description' or 'qa'")
    if mode == "qa" and question is None:
        raise ValueError("mode 'qa' rewrites an answer given its question: pass question=")
    if mode == "description":
        shots = [(g, r) for g, r in DESCRIPTION_EXAMPLES]
        last = gold
    else:
        shots = [(_qa_turn(q, g), r) for q, g, r in QA_EXAMPLES]
        last = _qa_turn(question, gold)
    messages: Messages = []
    for user, assistant in [*shots, (last, None)]:
        if not messages:
            user = f"{REWRITE_INSTRUCTIONS[mode]}\n\n{user}"
        messages.append({"role": "user", "content": user})
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
    return messages


def causal_lm_from_mllm(model: Any) -> Any:
    """The MLLM's language model as a causal LM that shares (never copies) its weights.

    transformers 5 has no causal-LM class for a LLaVA checkpoint, so this builds the text
    config's causal LM on the meta device and puts the MLLM's decoder (`get_decoder()`, e.g.
    `model.model.language_model`) and `lm_head` in it.
    """
    from transformers import AutoModelForCausalLM

    text_config = model.config.get_text_config()
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(text_config)
    setattr(lm, lm.base_model_prefix, model.get_decoder())
    lm.lm_head = model.lm_head
    lm.generation_config = model.generation_config
    return lm.eval()


class LocalRewriter:
    """Rewrites with a local causal LM, prompted through its tokenizer's chat template.

    chat_template: a template to use instead of the tokenizer's own (e.g. the MLLM processor's,
        when the rewriter is the MLLM's language model).
    temperature: 0 decodes greedily.
    seed: with a request's index, keys its sampling (`stream_seed(seed, index, 0, "inject")`,
        through weaken's `KeyedSampler`), so the rewrite of request i does not depend on the
        batch it lands in: a resumed or sharded run that passes global `indices` rewrites
        exactly as an uninterrupted one.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.9,
        chat_template: str | None = None,
        batch_size: int = 8,
        min_ratio: float = 0.5,
        max_ratio: float = 2.0,
        seed: int = 0,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.chat_template = chat_template
        self.batch_size = batch_size
        self.min_ratio, self.max_ratio = min_ratio, max_ratio
        self.seed = seed

    def seeds(self, count: int, indices: Sequence[int] | None = None) -> list[int]:
        """The sampling seed of each of `count` requests (indices default to 0, 1, ...)."""
        keys = list(range(count)) if indices is None else list(indices)
        if len(keys) != count:
            raise ValueError(f"{len(keys)} indices for {count} prompts")
        return [stream_seed(self.seed, key, 0, "inject") for key in keys]

    def prompt(self, gold: str, mode: Mode = "description", question: str | None = None) -> str:
        """The rendered prompt text for one rewrite."""
        return self.tokenizer.apply_chat_template(
            rewrite_messages(gold, mode, question),
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )

    @torch.no_grad()
    def generate_ids(
        self, prompts: Sequence[str], indices: Sequence[int] | None = None
    ) -> list[list[int]]:
        """The new tokens of each prompt's continuation (at most max_new_tokens, padding cut).

        indices: the prompts' global indices, which key their sampling (default 0, 1, ...).
        """
        tokenizer, outputs = self.tokenizer, []
        seeds = self.seeds(len(prompts), indices)
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            for i in range(0, len(prompts), self.batch_size):
                # The template already wrote any BOS it wants; do not add a second.
                batch = tokenizer(
                    list(prompts[i : i + self.batch_size]),
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                ).to(self.model.device)
                # Greedy decoding of the tokens the keyed sampler forces (argmax at temperature 0).
                sampler = KeyedSampler(seeds[i : i + self.batch_size], self.temperature, self.top_p)
                out = self.model.generate(
                    **batch,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    logits_processor=LogitsProcessorList([sampler]),
                    pad_token_id=tokenizer.pad_token_id,
                )
                # Slice off the prompt by token count, not characters: the official code cut
                # the decoded text and lost each output's first character.
                new = out[:, batch["input_ids"].shape[1] :]  # (B, new tokens)
                for row in new.tolist():
                    while row and row[-1] == tokenizer.pad_token_id:
                        row.pop()  # rows that stopped early are padded to the longest
                    outputs.append(row)
        finally:
            tokenizer.padding_side = side
        return outputs

    def generate(self, prompts: Sequence[str], indices: Sequence[int] | None = None) -> list[str]:
        """The raw continuation of each prompt: only the new tokens, decoded whole."""
        ids = self.generate_ids(prompts, indices)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def rewrite_all(
        self,
        golds: Sequence[str],
        mode: Mode = "description",
        questions: Sequence[str | None] | None = None,
        stats: InjectionStats | None = None,
        indices: Sequence[int] | None = None,
    ) -> list[Injection]:
        """One validated rewrite per gold answer, rejects counted in `stats`.

        indices: the golds' global indices, which key their sampling (default 0, 1, ...).
        """
        questions = questions if questions is not None else [None] * len(golds)
        prompts = [self.prompt(g, mode, q) for g, q in zip(golds, questions, strict=True)]
        raws = self.generate(prompts, indices)
        return [
            _checked(g, raw, [{"type": "llm", "mode": mode}], stats, self.min_ratio, self.max_ratio)
            for g, raw in zip(golds, raws, strict=True)
        ]

    def rewrite(
        self,
        gold: str,
        mode: Mode = "description",
        question: str | None = None,
        stats: InjectionStats | None = None,
        index: int = 0,
    ) -> Injection:
        """One validated rewrite of `gold`, sampled as request `index`."""
        return self.rewrite_all([gold], mode, [question], stats, [index])[0]


class EndpointRewriter:
    """Rewrites with an OpenAI-compatible chat endpoint, through the judge's retrying client.

    config: base_url, model, api_key_env, max_retries, backoff, max_tokens, temperature (a
        rewriter wants some, unlike a judge: set it, e.g. 0.7).
    """

    def __init__(self, config: EndpointConfig, min_ratio: float = 0.5, max_ratio: float = 2.0):
        self.client = ChatClient(config, section="inject.endpoint")
        self.min_ratio, self.max_ratio = min_ratio, max_ratio

    def close(self) -> None:
        self.client.close()

    def rewrite(
        self,
        gold: str,
        mode: Mode = "description",
        question: str | None = None,
        stats: InjectionStats | None = None,
    ) -> Injection:
        """One validated rewrite of `gold`; endpoint failures past the retries raise EndpointError."""
        raw = self.client.complete(rewrite_messages(gold, mode, question))
        edits = [{"type": "llm", "mode": mode, "model": self.client.config.model}]
        return _checked(gold, raw, edits, stats, self.min_ratio, self.max_ratio)
