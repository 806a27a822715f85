"""Error-injected negatives: validation, the lexical injector and the LLM rewriters."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from bpo.bootstrap.inject import (
    EDIT_TYPES,
    EndpointRewriter,
    InjectionStats,
    InjectionVocabulary,
    LocalRewriter,
    causal_lm_from_mllm,
    inject_errors,
    normalize,
    rewrite_messages,
    strip_preamble,
    validate_rewrite,
)
from bpo.endpoint import EndpointConfig
from bpo.models.tiny import (
    TinyLlavaConfig,
    build_tiny_causal_lm,
    build_tiny_llava,
    force_greedy_token,
)

# The local chat-completions server the judge tests use (tests/ is no package: load it by path).
_spec = importlib.util.spec_from_file_location(
    "evaluate_conftest", Path(__file__).parents[1] / "evaluate" / "conftest.py"
)
_server = sys.modules.setdefault("evaluate_conftest", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(_server)
judge_server = _server.judge_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOLD = "A brown dog sleeps on a grey sofa."  # 7 words


# --- Validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("Sure! Here is the rewritten description: A cat.", "A cat."),
        ("Rewritten answer: A cat.", "A cat."),
        ('"A cat on a mat."', "A cat on a mat."),
        ("Answer: 'A cat.'", "A cat."),
        ("Certainly. Here's the modified caption:\n\u201cA cat.\u201d", "A cat."),
        ("Assistant: A cat.", "A cat."),
        ("A sure thing: a cat.", "A sure thing: a cat."),  # only leading preambles go
        ("Here is a dog: it sleeps.", "Here is a dog: it sleeps."),  # an answer, not a preamble
    ],
)
def test_preambles_and_quotes_are_stripped(raw, cleaned):
    assert strip_preamble(raw) == cleaned


def test_validation_by_hand():
    # identical after lower-casing, punctuation and whitespace are dropped
    assert normalize("A  brown DOG, sleeps on a grey sofa!") == "a brown dog sleeps on a grey sofa"
    assert validate_rewrite(GOLD, "a brown dog sleeps on a GREY sofa") == (None, "identical")
    assert validate_rewrite(GOLD, "Sure! Here is the rewritten description: " + GOLD) == (
        None,
        "identical",
    )
    assert validate_rewrite(GOLD, "") == (None, "empty")
    assert validate_rewrite(GOLD, None) == (None, "empty")
    assert validate_rewrite(GOLD, 'Rewritten answer: "..."') == (None, "empty")
    # 3 words / 7 = 0.43 < 0.5; 4 / 7 = 0.57 passes
    assert validate_rewrite(GOLD, "A brown cat.") == (None, "too_short")
    assert validate_rewrite(GOLD, "A brown cat sleeps.") == ("A brown cat sleeps.", None)
    # 15 words / 7 = 2.14 > 2.0; 14 / 7 = 2.0 passes
    long = "A brown dog sleeps on a grey sofa while a black cat watches it from the"
    assert validate_rewrite(GOLD, long + " window.") == (None, "too_long")
    assert validate_rewrite(GOLD, long) == (long, None)
    assert validate_rewrite(GOLD, "A cat.", min_ratio=0.2) == ("A cat.", None)


def test_stats_count_accepted_and_each_reason():
    stats = InjectionStats()
    for raw in ["", "A brown dog sleeps on a grey sofa", "A cat.", "A cat sleeps on a sofa."]:
        stats.record(validate_rewrite(GOLD, raw)[1])
    stats.record(validate_rewrite(GOLD, " ".join(["dog"] * 20))[1])
    assert stats.as_dict() == {
        "accepted": 1,
        "rejected": {"empty": 1, "identical": 1, "too_long": 1, "too_short": 1},
    }


# --- Lexical injector -------------------------------------------------------------------------

SHAPE_CAPTION = "a red circle, a purple cross and a blue ring."
COCO_TEXT = "Two dogs sit on the left of a red sofa, next to a cat and an apple."


@pytest.fixture(scope="module")
def shapes() -> InjectionVocabulary:
    return InjectionVocabulary.shapeworld()


@pytest.fixture(scope="module")
def coco() -> InjectionVocabulary:
    return InjectionVocabulary.coco()


def test_shapeworld_edits_exact(shapes):
    def one(kind: str, seed: int = 1):
        injection = inject_errors(SHAPE_CAPTION, shapes, seed=seed, edit_types=[kind])
        return injection.text, injection.edits

    # every rewrite is a caption in the world's format: shape order, "a, b and c."
    assert one("swap_object") == (
        "a purple cross, a blue ring and a red frame.",
        [{"type": "swap_object", "from": "circle", "to": "frame"}],
    )
    assert one("insert_object") == (
        "a red circle, a purple cross, a red square and a blue ring.",
        [{"type": "insert_object", "object": "square", "colour": "red"}],
    )
    assert one("delete_object") == (
        "a purple cross and a blue ring.",
        [{"type": "delete_object", "object": "circle"}],
    )
    assert one("change_colour") == (
        "a white circle, a purple cross and a blue ring.",
        [{"type": "change_colour", "from": "red", "to": "white", "object": "circle"}],
    )
    # a caption states no count or position: reported, not dropped
    stats = InjectionStats()
    result = inject_errors(SHAPE_CAPTION, shapes, edit_types=["change_count"], stats=stats)
    assert (result.text, result.reason) == (None, "no_edit")
    assert stats.as_dict() == {"accepted": 0, "rejected": {"no_edit": 1}}
    # answers that are not captions get the generic edits
    counted = inject_errors("There are three shapes.", shapes, seed=0)
    assert (counted.text, counted.edits) == (
        "There are nine shapes.",
        [{"type": "change_count", "from": "three", "to": "nine"}],
    )


def test_shapeworld_insertion_follows_partners(shapes):
    # the only present shape is the circle; its partner (the cross) is the only one with weight
    for seed in range(10):
        injection = inject_errors(
            "a red circle.", shapes, seed=seed, edit_types=["insert_object"], max_ratio=3.0
        )
        assert injection.edits[0]["object"] == "cross"
        assert injection.text == f"a red circle and a {injection.edits[0]['colour']} cross."


def test_coco_edits_exact(coco):
    def one(kind: str, seed: int = 0) -> tuple[str | None, list]:
        injection = inject_errors(COCO_TEXT, coco, seed=seed, edit_types=[kind])
        return injection.text, injection.edits

    start = "Two dogs sit on the left of a red sofa, next to a cat"
    assert one("swap_object") == (
        start + " and a chair.",  # "an apple" -> "a chair": the article follows
        [{"type": "swap_object", "from": "apple", "to": "chair"}],
    )
    assert one("swap_object", seed=2) == (
        "Two stop signs" + COCO_TEXT[8:],  # plural kept
        [{"type": "swap_object", "from": "dog", "to": "stop sign"}],
    )
    assert one("insert_object", seed=1) == (
        "Two dogs and a cow" + COCO_TEXT[8:],
        [{"type": "insert_object", "object": "cow", "after": "dog"}],
    )
    assert one("delete_object") == (
        start + ".",
        [{"type": "delete_object", "object": "apple"}],
    )
    assert one("delete_object", seed=1) == (
        "Two dogs sit on the left of a red sofa, next to an apple.",
        [{"type": "delete_object", "object": "cat"}],
    )
    assert one("change_colour") == (
        COCO_TEXT.replace("red", "brown"),
        [{"type": "change_colour", "from": "red", "to": "brown"}],
    )
    assert one("change_count") == (
        "Nine" + COCO_TEXT[3:],  # capital kept
        [{"type": "change_count", "from": "two", "to": "nine"}],
    )
    assert one("change_position") == (
        COCO_TEXT.replace("left", "right"),
        [{"type": "change_position", "from": "left", "to": "right"}],
    )


def test_coco_list_deletion_stays_grammatical(coco):
    texts = {
        inject_errors(
            "A man, a dog and a traffic light.", coco, seed=s, edit_types=["delete_object"]
        ).text
        for s in range(8)
    }
    assert texts == {
        "A man and a traffic light.",
        "A dog and a traffic light.",
        "A man and a dog.",  # the list's comma became its "and"
    }
    # the last of three: "a, b and C" -> "a and b"
    text = "I see a cat, a dog and a bird on the grass here."
    results = {
        inject_errors(text, coco, seed=s, edit_types=["delete_object"]).text for s in range(12)
    }
    assert "I see a cat and a dog on the grass here." in results
    assert results <= {
        "I see a cat and a dog on the grass here.",
        "I see a cat and a bird on the grass here.",
        "I see a dog and a bird on the grass here.",
    }


def test_cooccurrence_makes_an_insertion_certain(coco):
    prior = {"dog": {"frisbee": 5.0}, "person": {"frisbee": 1.0, "kite": 2.0}}
    vocabulary = InjectionVocabulary.coco(cooccurrence=prior)
    for seed in range(10):
        got = inject_errors("A dog runs.", vocabulary, seed=seed, edit_types=["insert_object"])
        assert got.text == "A dog and a frisbee runs."
    # with a man and a dog present, kite (2) and frisbee (5 + 1) are the only candidates
    drawn = {
        inject_errors("A man and a dog.", vocabulary, seed=s, edit_types=["insert_object"]).edits[
            0
        ]["object"]
        for s in range(30)
    }
    assert drawn == {"frisbee", "kite"}


def test_injection_is_deterministic_and_always_accounted(coco, shapes):
    golds = [COCO_TEXT, "A man, a dog and a traffic light.", "A cat.", "Nothing to see here."]
    stats = InjectionStats()
    first = [inject_errors(g, coco, seed=7, num_edits=2, stats=stats) for g in golds]
    again = [inject_errors(g, coco, seed=7, num_edits=2) for g in golds]
    assert [(i.text, i.edits) for i in first] == [(i.text, i.edits) for i in again]
    # every output is either valid or rejected with its reason
    for injection in first:
        if injection.text is None:
            assert injection.reason is not None
        else:
            assert validate_rewrite(injection.gold, injection.text) == (injection.text, None)
    assert first[3].reason == "no_edit"
    assert len(first[0].edits) == 2
    assert stats.accepted + sum(stats.rejected.values()) == len(golds)
    with pytest.raises(ValueError, match="unknown edit types"):
        inject_errors(COCO_TEXT, coco, edit_types=["recolour"])
    assert set(EDIT_TYPES) == {
        "swap_object",
        "insert_object",
        "delete_object",
        "change_colour",
        "change_count",
        "change_position",
    }


# --- LLM rewriters ----------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def forced_lm(word: str):
    """A tiny Llama + tokenizer whose greedy output is `word`, over and over (no EOS)."""
    model, tokenizer = build_tiny_causal_lm(
        ["rewrite the description of the image ."] * 8, CHAT_TEMPLATE, extra_tokens=[word]
    )
    force_greedy_token(model, tokenizer.convert_tokens_to_ids(word))
    return model, tokenizer


@pytest.fixture(scope="module")
def zebra_lm():
    return forced_lm("Zebra")


def test_prompt_uses_the_chat_template(zebra_lm):
    model, tokenizer = zebra_lm
    rewriter = LocalRewriter(model, tokenizer, temperature=0.0)
    prompt = rewriter.prompt(GOLD)
    assert prompt.startswith("<|user|>Rewrite the image description below")
    assert prompt.endswith(f"<|user|>{GOLD}\n<|assistant|>")
    assert prompt.count("<|assistant|>") == 4  # three examples, then the answer to give
    qa = rewriter.prompt("It is red.", mode="qa", question="What colour is the bus?")
    assert qa.endswith(
        "<|user|>Question: What colour is the bus?\nAnswer: It is red.\n<|assistant|>"
    )
    with pytest.raises(ValueError, match="pass question="):
        rewrite_messages("It is red.", mode="qa")


def test_local_rewriter_keeps_the_first_character_and_the_token_limit(zebra_lm):
    model, tokenizer = zebra_lm
    for limit in (1, 3):
        rewriter = LocalRewriter(model, tokenizer, max_new_tokens=limit, temperature=0.0)
        raw = rewriter.generate([rewriter.prompt(GOLD), rewriter.prompt("A cat.")])
        # the official code decoded from one character too far and lost the "Z"
        assert raw == ["Zebra" * limit] * 2
        zebra = tokenizer.convert_tokens_to_ids("Zebra")
        assert rewriter.generate_ids([rewriter.prompt(GOLD)]) == [[zebra] * limit]
    stats = InjectionStats()
    rewriter = LocalRewriter(model, tokenizer, max_new_tokens=2, temperature=0.0)
    done = rewriter.rewrite_all(["Zebra crossing.", "ZebraZebra"], stats=stats)
    assert [(d.text, d.reason) for d in done] == [("ZebraZebra", None), (None, "identical")]
    assert stats.as_dict() == {"accepted": 1, "rejected": {"identical": 1}}


def test_sampled_rewrites_honour_max_new_tokens():
    model, tokenizer = build_tiny_causal_lm(
        ["a red dog and a blue cat on a mat ."] * 8, CHAT_TEMPLATE
    )
    rewriter = LocalRewriter(model, tokenizer, max_new_tokens=5, temperature=1.0, top_p=1.0)
    prompts = [rewriter.prompt(GOLD), rewriter.prompt("A cat.")] * 2
    new_tokens = rewriter.generate_ids(prompts)
    assert [len(ids) <= 5 for ids in new_tokens] == [True] * 4
    assert max(len(ids) for ids in new_tokens) == 5  # random weights: some row runs to the limit


def test_sampled_rewrites_do_not_depend_on_the_batch():
    """Temperature 1: six golds rewritten in one run (batches of 4, padded) equal the same golds
    rewritten in two runs of three given their global indices (batches of 2): request i samples
    from its own keyed stream, whatever else runs. The six rewrites differ from each other, so a
    shuffled order could not pass; another seed gives other rewrites."""
    model, tokenizer = build_tiny_causal_lm(
        ["a red dog and a blue cat on a mat ."] * 8, CHAT_TEMPLATE
    )
    golds = [GOLD, "A cat.", "A red dog on a mat.", GOLD, "A blue cat.", "A dog and a cat."]

    def rewriter(batch_size, seed=0):
        return LocalRewriter(
            model, tokenizer, max_new_tokens=6, temperature=1.0, top_p=1.0,
            batch_size=batch_size, max_ratio=99, seed=seed,
        )  # fmt: skip

    whole = rewriter(4).rewrite_all(golds)
    first = rewriter(2).rewrite_all(golds[:3], indices=[0, 1, 2])
    second = rewriter(2).rewrite_all(golds[3:], indices=[3, 4, 5])
    assert [r.raw for r in whole] == [r.raw for r in first + second]
    assert [r.text for r in whole] == [r.text for r in first + second]
    assert len({r.raw for r in whole}) == 6
    # GOLD at index 0 and index 3: same prompt, other stream, other rewrite.
    assert whole[0].raw != whole[3].raw
    assert [r.raw for r in rewriter(4, seed=1).rewrite_all(golds)] != [r.raw for r in whole]
    assert rewriter(1).rewrite(golds[4], index=4).raw == whole[4].raw


def test_the_mllm_language_model_is_a_causal_lm_sharing_its_weights():
    texts = ["a red circle and a blue square ."] * 8
    llava, processor = build_tiny_llava(texts, TinyLlavaConfig(), seed=0)
    lm = causal_lm_from_mllm(llava)
    assert lm.lm_head.weight.data_ptr() == llava.lm_head.weight.data_ptr()
    ids = processor.tokenizer("a red circle and", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = llava(input_ids=ids).logits
        got = lm(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    rewriter = LocalRewriter(
        lm,
        processor.tokenizer,
        max_new_tokens=4,
        temperature=0.0,
        chat_template=processor.chat_template,
    )
    prompt = rewriter.prompt("a red circle .")
    assert prompt.startswith("USER: Rewrite the image description") and prompt.endswith(
        "ASSISTANT:"
    )
    assert len(rewriter.generate([prompt])) == 1


def test_endpoint_rewriter(judge_server, monkeypatch):
    monkeypatch.setenv("REWRITER_KEY", "secret")
    replies = iter(
        [
            "Sure! Here is the rewritten description: A brown cat sleeps on a grey sofa.",
            "A brown dog sleeps on a grey sofa.",
        ]
    )
    judge_server.reply = lambda body: (200, next(replies), {})
    config = EndpointConfig(
        base_url=judge_server.url,
        model="rewriter-7b",
        api_key_env="REWRITER_KEY",
        temperature=0.7,
        max_tokens=64,
        max_retries=0,
    )
    stats = InjectionStats()
    rewriter = EndpointRewriter(config)
    try:
        first = rewriter.rewrite(GOLD, stats=stats)
        second = rewriter.rewrite("It is red.", mode="qa", question="What colour?", stats=stats)
    finally:
        rewriter.close()
    assert (first.text, first.reason) == ("A brown cat sleeps on a grey sofa.", None)
    assert (second.text, second.reason) == (None, "too_long")  # 7 words for 3
    request = judge_server.seen[0]
    assert request.headers["Authorization"] == "Bearer secret"
    assert request.body["model"] == "rewriter-7b"
    assert request.body["temperature"] == 0.7
    assert request.body["max_tokens"] == 64
    assert request.body["messages"] == rewrite_messages(GOLD)
    assert judge_server.seen[1].body["messages"][-1]["content"] == (
        "Question: What colour?\nAnswer: It is red."
    )
    assert stats.as_dict() == {"accepted": 1, "rejected": {"too_long": 1}}
