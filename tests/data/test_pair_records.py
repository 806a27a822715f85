import json
import math

import pytest

from bpo.data import PreferencePair, pair_key, remove_image_placeholder

PAIR_JSON = {
    "id": "coco_1#turn1",
    "image": "a.png",
    "prompt": [{"role": "user", "content": "<image>\nWhat is this?"}],
    "chosen": "A red square.",
    "rejected": "A red square next to a dog.",
    "source": "inject",
    "meta": {"sample_index": 2, "seed": 0, "generator": "lexical"},
    "ref_chosen_logp": -12.5,
    "ref_rejected_logp": -20.25,
    "chosen_tokens": 4,
    "rejected_tokens": 8,
}


def test_json_round_trip_through_text_is_exact():
    pair = PreferencePair.from_json(json.loads(json.dumps(PAIR_JSON)))

    assert pair.to_json() == PAIR_JSON
    assert list(pair.to_json()) == list(PAIR_JSON)  # field order is the file's column order
    assert PreferencePair.from_json(pair.to_json()) == pair


def test_optional_fields_default_to_none_and_empty_meta():
    required = {k: PAIR_JSON[k] for k in ("id", "image", "prompt", "chosen", "rejected", "source")}

    pair = PreferencePair.from_json(required)

    assert (pair.meta, pair.ref_chosen_logp, pair.chosen_tokens) == ({}, None, None)
    assert pair.key == "coco_1#turn1:inject:0"


def test_key_uses_sample_index_and_is_computable_before_the_pair_exists():
    pair = PreferencePair.from_json(PAIR_JSON)

    assert pair.key == pair_key("coco_1#turn1", "inject", 2) == "coco_1#turn1:inject:2"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"chosen": None}, "field 'chosen' must be a string, got NoneType"),
        ({"prompt": "hi"}, "field 'prompt' must be a list of messages, got str"),
        ({"prompt": [{"role": "user"}]}, r"field 'prompt\[0\].content' must be a string"),
        ({"ref_chosen_logp": "1.0"}, "field 'ref_chosen_logp' must be a number or null, got str"),
        ({"ref_rejected_logp": math.nan}, "field 'ref_rejected_logp' must be finite"),
        ({"chosen_tokens": True}, "field 'chosen_tokens' must be an integer or null, got bool"),
        ({"source": "a:b"}, "field 'source' must be non-empty without ':'"),
        ({"meta": {"sample_index": "2"}}, "field 'meta.sample_index' must be an integer"),
        ({"extra": 1}, "unknown field\\(s\\) 'extra'; schema version 1 has id, image, prompt"),
    ],
)
def test_ill_typed_fields_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        PreferencePair.from_json({**PAIR_JSON, **change})


def test_missing_fields_are_all_named():
    data = {k: v for k, v in PAIR_JSON.items() if k not in ("chosen", "source")}

    with pytest.raises(ValueError, match="missing field\\(s\\) 'chosen', 'source'"):
        PreferencePair.from_json(data)


def test_integer_logp_becomes_float():
    assert PreferencePair.from_json({**PAIR_JSON, "ref_chosen_logp": -3}).ref_chosen_logp == -3.0


def test_remove_image_placeholder():
    assert remove_image_placeholder("<image>\nWhat is this? ") == "What is this?"
    assert remove_image_placeholder("Describe.\n<image>") == "Describe."
