import json
import os
from pathlib import Path

import pytest
from data_helpers import noisy_png_bytes, write_jsonl

from bpo.data import BadRecord, Sample, read_llava, split_records

MULTI_TURN = {
    "id": "coco_1",
    "image": "a.png",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?\n"},
        {"from": "gpt", "value": "A red square."},
        {"from": "human", "value": "How big is it?"},
        {"from": "gpt", "value": " Eight pixels wide. \n"},
    ],
}
TEXT_ONLY = {
    "id": 7,
    "conversations": [
        {"from": "user", "value": "Say hi."},
        {"from": "assistant", "value": "hi"},
    ],
}
IMAGE_LAST = {
    "id": "vg_2",
    "image": "sub/b.png",
    "conversations": [
        {"from": "human", "value": "Describe the picture.\n<image>"},
        {"from": "gpt", "value": "Green."},
    ],
}


def expected_samples(file: str, lines: tuple[int, int, int]) -> list[Sample]:
    """What the three records above must become, given the line (or record) number of each."""
    first_question = {"role": "user", "content": "<image>\nWhat is this?"}
    return [
        Sample(
            id="coco_1#turn0",
            image="a.png",
            messages=[first_question],
            answer="A red square.",
            has_image_placeholder=True,
            meta={"file": file, "line": lines[0], "turn": 0},
        ),
        Sample(
            id="coco_1#turn1",
            image="a.png",
            messages=[
                first_question,
                {"role": "assistant", "content": "A red square."},
                {"role": "user", "content": "How big is it?"},
            ],
            answer="Eight pixels wide.",
            has_image_placeholder=True,
            meta={"file": file, "line": lines[0], "turn": 1},
        ),
        Sample(
            id="7",
            image=None,
            messages=[{"role": "user", "content": "Say hi."}],
            answer="hi",
            has_image_placeholder=False,
            meta={"file": file, "line": lines[1], "turn": 0},
        ),
        Sample(
            id="vg_2",
            image="sub/b.png",
            messages=[{"role": "user", "content": "Describe the picture.\n<image>"}],
            answer="Green.",
            has_image_placeholder=True,
            meta={"file": file, "line": lines[2], "turn": 0},
        ),
    ]


def test_json_list_gives_one_sample_per_assistant_turn(tmp_path, image_root):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([MULTI_TURN, TEXT_ONLY, IMAGE_LAST], indent=2))

    records = list(read_llava(path, image_root=image_root))

    assert records == expected_samples(str(path), (1, 2, 3))


def test_jsonl_counts_physical_lines_including_blank_ones(tmp_path, image_root):
    path = tmp_path / "train.jsonl"
    path.write_text(
        f"{json.dumps(MULTI_TURN)}\n\n{json.dumps(TEXT_ONLY)}\n{json.dumps(IMAGE_LAST)}"
    )

    records = list(read_llava(path, image_root=image_root))

    assert records == expected_samples(str(path), (1, 3, 4))


def one_turn(record_id, image=None, question="<image>\nQ?", answer="A."):
    record = {
        "id": record_id,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }
    if image is not None:
        record["image"] = image
    return record


def test_bad_records_are_reported_and_good_ones_around_them_survive(tmp_path, image_root):
    (image_root / "garbage.png").write_bytes(b"this is not a png at all")
    png = noisy_png_bytes()
    (image_root / "cut.png").write_bytes(png[: len(png) // 2])  # header intact, pixels cut
    os.symlink(tmp_path / "secret.png", image_root / "link.png")
    absolute = str(tmp_path / "secret.png")
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            one_turn("good_1", "a.png"),  # 1
            '{"id": "broken", "image": ',  # 2
            one_turn("no_answer", "a.png", answer="  "),  # 3
            one_turn("escape", "../secret.png"),  # 4
            one_turn("absolute", absolute),  # 5
            one_turn("link", "link.png"),  # 6
            one_turn("garbage", "garbage.png"),  # 7
            one_turn("cut", "cut.png"),  # 8
            one_turn("missing", "nope.png"),  # 9
            one_turn("no_image", None),  # 10: placeholder but no image
            {"id": "order", "conversations": [{"from": "gpt", "value": "Hi."}]},  # 11
            one_turn("good_1", "a.png"),  # 12: duplicate id
            [1, 2],  # 13
            {"id": "empty", "conversations": []},  # 14
            one_turn("good_2", "sub/b.png"),  # 15
        ],
    )

    samples, bad = split_records(read_llava(path, image_root=image_root))

    assert [s.id for s in samples] == ["good_1", "good_2"]
    assert [(b.reason, b.line, b.id) for b in bad] == [
        ("malformed_json", 2, None),
        ("missing_answer", 3, "no_answer"),
        ("image_outside_root", 4, "escape"),
        ("image_outside_root", 5, "absolute"),
        ("image_outside_root", 6, "link"),
        ("corrupt_image", 7, "garbage"),
        ("corrupt_image", 8, "cut"),
        ("missing_image", 9, "missing"),
        ("placeholder_without_image", 10, "no_image"),
        ("bad_turn_order", 11, "order"),
        ("duplicate_id", 12, "good_1"),
        ("not_an_object", 13, None),
        ("missing_conversations", 14, "empty"),
    ]
    assert all(b.file == str(path) for b in bad)
    by_id = {b.id: b for b in bad}
    root = image_root.resolve()
    assert str(by_id["missing"]) == (
        f"{path} line 9 (id=missing): image 'nope.png' not found under --image-root {root}; "
        "check --image-root or the path in the data"
    )
    assert str(by_id["escape"]).startswith(
        f"{path} line 4 (id=escape): image '../secret.png' resolves to "
        f"{(tmp_path / 'secret.png').resolve()}, outside --image-root {root}"
    )
    assert str(by_id["absolute"]) == (
        f"{path} line 5 (id=absolute): image '{absolute}' is an absolute path; "
        f"write it relative to --image-root {root}"
    )
    assert str(by_id["cut"]).startswith(
        f"{path} line 8 (id=cut): image '{root / 'cut.png'}' cannot be decoded"
    )
    assert (
        str(by_id["no_answer"])
        == f"{path} line 3 (id=no_answer): assistant turn 1 is empty; drop or fill it"
    )


def test_json_list_bad_record_message_says_record(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([one_turn("a"), one_turn("b", answer="")]))

    samples, bad = split_records(read_llava(path))

    assert samples == []  # "a" has a placeholder but no image
    assert [str(b) for b in bad] == [
        f"{path} record 1 (id=a): '<image>' placeholder but no image; add the image or remove the placeholder",
        f"{path} record 2 (id=b): assistant turn 1 is empty; drop or fill it",
    ]


def test_without_check_images_only_the_path_is_checked(tmp_path, image_root):
    (image_root / "garbage.png").write_bytes(b"not a png")
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            one_turn("g", "garbage.png"),
            one_turn("m", "missing.png"),
            one_turn("e", "../secret.png"),
        ],
    )

    samples, bad = split_records(read_llava(path, image_root=image_root, check_images=False))

    assert [s.id for s in samples] == ["g", "m"]
    assert [(b.reason, b.id) for b in bad] == [("image_outside_root", "e")]


def test_without_image_root_paths_are_taken_as_written(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [one_turn("e", "../secret.png")])

    samples, bad = split_records(read_llava(path))

    assert [(s.id, s.image) for s in samples] == [("e", "../secret.png")]
    assert bad == []


def test_image_without_placeholder_is_kept_unless_required(tmp_path, image_root):
    path = write_jsonl(tmp_path / "train.jsonl", [one_turn("p", "a.png", question="What is it?")])

    (sample,) = read_llava(path, image_root=image_root)
    (bad,) = read_llava(path, image_root=image_root, require_placeholder=True)

    assert (sample.id, sample.has_image_placeholder) == ("p", False)
    assert isinstance(bad, BadRecord)
    assert (bad.reason, bad.line) == ("no_image_placeholder", 1)


def test_missing_file_raises_at_the_call(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"LLaVA data file .*nope\.json not found"):
        read_llava(tmp_path / "nope.json")


def test_unparsable_json_list_raises_naming_the_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[{"id": "a"},')

    with pytest.raises(ValueError, match=r"train\.json is not valid JSON"):
        read_llava(path)


def test_missing_image_root_raises(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [one_turn("a")])

    with pytest.raises(FileNotFoundError, match=r"--image-root .* is not a directory"):
        read_llava(path, image_root=Path(tmp_path / "no_such_dir"))
