"""The tiny BPE tokenizer: lossless, with `<image>` and the chat specials as single tokens."""

from __future__ import annotations

import pytest

from bpo.models.tiny import IMAGE_TOKEN, SPECIAL_TOKENS, train_bpe_tokenizer

UNSEEN = ["a pink hexagon!  ok\n", "ÉTÉ — 42 cubes", "  leading and trailing  ", "\t\n"]


@pytest.fixture(scope="module")
def tokenizer(texts):
    return train_bpe_tokenizer(texts, vocab_size=512)


def test_round_trip(tokenizer, texts):
    for text in [
        *texts,
        *UNSEEN,
        "USER: <image>\nDescribe the image. ASSISTANT: a red circle .</s>",
    ]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_specials_are_single_tokens(tokenizer):
    for position, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer(token)["input_ids"] == [position]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = tokenizer("USER: <image>\nDescribe the image.")["input_ids"]
    assert ids.count(image_id) == 1
    assert tokenizer.convert_ids_to_tokens(ids)[5:8] == ["Ġ", IMAGE_TOKEN, "Ċ"]


def test_words_of_the_corpus_are_merged(tokenizer):
    assert tokenizer.convert_ids_to_tokens(
        tokenizer("a red circle and a blue square .")["input_ids"]
    ) == [
        "a",
        "Ġred",
        "Ġcircle",
        "Ġand",
        "Ġa",
        "Ġblue",
        "Ġsquare",
        "Ġ.",
    ]
    assert len(tokenizer) <= 512  # the corpus runs out of merges first
    assert tokenizer.padding_side == "left"
