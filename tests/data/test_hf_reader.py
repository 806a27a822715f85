import pytest
from data_helpers import png_bytes
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from bpo.data import Sample, read_hf_dataset, split_records


def parts(*items):
    """Chat content parts; every part has both keys because Arrow stores one struct type."""
    return [
        {"type": "image", "text": None} if item is None else {"type": "text", "text": item}
        for item in items
    ]


def test_chat_messages_with_embedded_images(tmp_path):
    dataset = Dataset.from_list(
        [
            {
                "id": "r0",
                "image": PILImage.new("RGB", (8, 8), (255, 0, 0)),
                "messages": [
                    {"role": "user", "content": parts(None, "What colour?")},
                    {"role": "assistant", "content": parts("Red.")},
                ],
            },
            {
                "id": "r1",
                "image": PILImage.new("L", (4, 4), 7),
                "messages": [
                    {"role": "system", "content": parts("Be brief.")},
                    {"role": "user", "content": parts("Look:", None)},
                    {"role": "assistant", "content": parts("Grey.")},
                    {"role": "user", "content": parts("Sure?")},
                    {"role": "assistant", "content": parts("Yes.")},
                ],
            },
            {
                "id": "r2",
                "image": PILImage.new("RGB", (8, 8)),
                "messages": [
                    {"role": "user", "content": parts(None, "Hi")},
                    {"role": "assistant", "content": parts("")},
                ],
            },
        ]
    )

    samples, bad = split_records(read_hf_dataset(dataset, name="toy"))

    look = {"role": "user", "content": "Look:\n<image>"}
    system = {"role": "system", "content": "Be brief."}
    assert samples == [
        Sample(
            "r0",
            None,
            [{"role": "user", "content": "<image>\nWhat colour?"}],
            "Red.",
            True,
            {"dataset": "toy", "row": 0, "turn": 0},
        ),
        Sample(
            "r1#turn0", None, [system, look], "Grey.", True, {"dataset": "toy", "row": 1, "turn": 0}
        ),
        Sample(
            "r1#turn1",
            None,
            [
                system,
                look,
                {"role": "assistant", "content": "Grey."},
                {"role": "user", "content": "Sure?"},
            ],
            "Yes.",
            True,
            {"dataset": "toy", "row": 1, "turn": 1},
        ),
    ]
    assert [
        (s.pil_image.mode, s.pil_image.size, s.pil_image.getpixel((0, 0))) for s in samples
    ] == [
        ("RGB", (8, 8), (255, 0, 0)),
        ("RGB", (4, 4), (7, 7, 7)),
        ("RGB", (4, 4), (7, 7, 7)),
    ]
    assert [str(b) for b in bad] == [
        "toy row 2 (id=r2): assistant turn 1 is empty; drop or fill it"
    ]


def test_corrupt_embedded_image_is_one_bad_row_not_a_crash():
    features = Features(
        {"image": Image(), "messages": [{"role": Value("string"), "content": Value("string")}]}
    )
    chat = [{"role": "user", "content": "<image>\nQ?"}, {"role": "assistant", "content": "A."}]
    dataset = Dataset.from_list(
        [
            {"image": {"bytes": png_bytes(), "path": "ok.png"}, "messages": chat},
            {"image": {"bytes": b"garbage", "path": "bad.png"}, "messages": chat},
            {"image": {"bytes": png_bytes(), "path": "ok2.png"}, "messages": chat},
        ],
        features=features,
    )

    samples, bad = split_records(read_hf_dataset(dataset))

    assert [(s.id, s.image, s.pil_image.size) for s in samples] == [
        ("0", None, (8, 8)),
        ("2", None, (8, 8)),
    ]
    assert [(b.reason, b.line, b.id) for b in bad] == [("corrupt_image", 1, "1")]
    assert str(bad[0]).startswith("dataset row 1 (id=1): image 'bad.png' cannot be decoded")


def test_llava_conversations_with_path_images(tmp_path, image_root):
    dataset = Dataset.from_list(
        [
            {
                "id": 10,
                "image": "sub/b.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nColour?"},
                    {"from": "gpt", "value": "Green."},
                ],
            },
            {
                "id": 11,
                "image": "../secret.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nColour?"},
                    {"from": "gpt", "value": "Blue."},
                ],
            },
        ]
    )

    samples, bad = split_records(read_hf_dataset(dataset, image_root=image_root))

    assert samples == [
        Sample(
            "10",
            "sub/b.png",
            [{"role": "user", "content": "<image>\nColour?"}],
            "Green.",
            True,
            {"dataset": "dataset", "row": 0, "turn": 0},
        )
    ]
    assert samples[0].pil_image is None  # path images are loaded later, by the model layer
    assert [(b.reason, b.line, b.id) for b in bad] == [("image_outside_root", 1, "11")]


def test_unknown_messages_column_is_named():
    dataset = Dataset.from_list([{"chat": "x"}])

    with pytest.raises(
        ValueError, match=r"no column 'messages' \(columns: chat\); pass messages_column="
    ):
        read_hf_dataset(dataset)
