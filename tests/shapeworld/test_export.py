"""Exporting scenes as a LLaVA dataset that the data layer reads back exactly."""

import json

import numpy as np
import pytest
from PIL import Image

from bpo.data import BadRecord, Sample, read_llava
from bpo.shapeworld.export import read_scenes, write_llava_dataset
from bpo.shapeworld.world import (
    Scene,
    ShapeObject,
    WorldConfig,
    caption,
    render,
    sample_scene,
)

# Two shapes and one object per scene: `questions` then has exactly one present shape to ask
# about and one absent, so every record's conversation is known by hand, whatever the seed.
CFG = WorldConfig(
    grid=3, cell_size=6, pixel_noise=0.1, shapes=("circle", "square"), colours=("red", "blue")
)
WORLD = WorldConfig()  # eight shapes, 1..3 objects a scene
OBJECTS = [
    ShapeObject("circle", "red", 0, 0, 1.0),
    ShapeObject("square", "blue", 1, 2, 0.35),
    ShapeObject("circle", "blue", 2, 1, 0.8),
    ShapeObject("square", "red", 2, 2, 0.9),
    ShapeObject("circle", "red", 1, 1, 0.4),
]
SCENES = [Scene((o,), grid=3, seed=100 + i) for i, o in enumerate(OBJECTS)]


def expected_turns(o: ShapeObject) -> list[tuple[str, str]]:
    """(user, assistant) pairs of a one-object scene under CFG, written out by hand."""
    other = "square" if o.shape == "circle" else "circle"
    return [
        ("<image>\nDescribe the image.", f"a {o.colour} {o.shape}."),
        (f"Is there a {o.shape} in the image?", f"{o.shape} yes."),
        (f"What color is the {o.shape}?", f"The {o.shape} is {o.colour}."),
        (f"Is there a {other} in the image?", f"{other} no."),
        ("How many shapes are in the image?", "There is one shape."),
    ]


def expected_samples(path: str) -> list[Sample]:
    """Five assistant turns per record, so ids get '#turn0'..'#turn4'; turn k's context is every
    earlier pair plus its question; `line` is the 1-based record index of a JSON list."""
    samples = []
    for index, o in enumerate(OBJECTS):
        turns = expected_turns(o)
        for k, (question, answer) in enumerate(turns):
            context = []
            for q, a in turns[:k]:
                context += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            context.append({"role": "user", "content": question})
            samples.append(
                Sample(
                    id=f"sw_{index:06d}#turn{k}",
                    image=f"images/sw_{index:06d}.png",
                    messages=context,
                    answer=answer,
                    has_image_placeholder=True,
                    meta={"file": path, "line": index + 1, "turn": k},
                )
            )
    return samples


def test_read_llava_reads_the_export_back_as_the_expected_samples(tmp_path):
    out = tmp_path / "sw"
    path = write_llava_dataset(iter(SCENES), CFG, out, seed=3)
    assert path == out / "data.json"
    records = list(read_llava(path, image_root=out))
    assert not [r for r in records if isinstance(r, BadRecord)]
    assert records == expected_samples(str(path))


def test_data_json_record_is_llava_conversation_format(tmp_path):
    """The first record, exactly: id, relative image path, human/gpt turns."""
    path = write_llava_dataset(SCENES, CFG, tmp_path)
    records = json.loads(path.read_text())
    turns = []
    for question, answer in expected_turns(OBJECTS[0]):
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    assert records[0] == {
        "id": "sw_000000",
        "image": "images/sw_000000.png",
        "conversations": turns,
    }
    assert [r["id"] for r in records] == [f"sw_00000{i}" for i in range(5)]


def test_images_decode_to_the_rendered_arrays(tmp_path):
    """PNG is lossless: each file decodes to render(scene, cfg), pixel noise included."""
    write_llava_dataset(SCENES, CFG, tmp_path)
    for index, scene in enumerate(SCENES):
        with Image.open(tmp_path / "images" / f"sw_{index:06d}.png") as image:
            assert image.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(image), render(scene, CFG))


def test_scenes_jsonl_holds_the_exact_ground_truth_and_round_trips(tmp_path):
    write_llava_dataset(SCENES, CFG, tmp_path)
    lines = (tmp_path / "scenes.jsonl").read_text().splitlines()
    assert len(lines) == 5
    assert json.loads(lines[1]) == {
        "id": "sw_000001",
        "image": "images/sw_000001.png",
        "grid": 3,
        "seed": 101,
        "objects": [{"shape": "square", "colour": "blue", "row": 1, "col": 2, "alpha": 0.35}],
    }
    assert read_scenes(tmp_path / "scenes.jsonl") == SCENES


def test_sampled_scenes_round_trip(tmp_path):
    """Sampled scenes (several objects, 3-decimal alphas, large seeds) come back equal."""
    cfg = WorldConfig(grid=4, cell_size=4, min_objects=1, max_objects=4)
    rng = np.random.default_rng(8)
    scenes = [sample_scene(rng, cfg) for _ in range(20)]
    write_llava_dataset(scenes, cfg, tmp_path)
    assert read_scenes(tmp_path / "scenes.jsonl") == scenes


def test_without_questions_one_caption_sample_per_record_with_the_given_prompt(tmp_path):
    """One assistant turn per record: the id has no '#turn' suffix."""
    path = write_llava_dataset(
        SCENES[:2], CFG, tmp_path, with_questions=False, prompt="List the shapes."
    )
    assert list(read_llava(path, image_root=tmp_path)) == [
        Sample(
            id=f"sw_00000{i}",
            image=f"images/sw_00000{i}.png",
            messages=[{"role": "user", "content": "<image>\nList the shapes."}],
            answer=caption,
            has_image_placeholder=True,
            meta={"file": str(path), "line": i + 1, "turn": 0},
        )
        for i, caption in enumerate(["a red circle.", "a blue square."])
    ]


def test_output_is_deterministic_given_the_seed(tmp_path):
    """Same scenes and seed: identical bytes. Another seed: other question choices (six shapes,
    1..4 objects, so most records have several shapes to ask about)."""
    cfg = WorldConfig(grid=4, cell_size=4, min_objects=1, max_objects=4)
    rng = np.random.default_rng(9)
    scenes = [sample_scene(rng, cfg) for _ in range(10)]
    a = write_llava_dataset(scenes, cfg, tmp_path / "a", seed=1)
    b = write_llava_dataset(scenes, cfg, tmp_path / "b", seed=1)
    c = write_llava_dataset(scenes, cfg, tmp_path / "c", seed=2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    for i in range(10):
        name = f"images/sw_{i:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_scene_on_another_grid_is_refused(tmp_path):
    scene = Scene((ShapeObject("circle", "red", 3, 3),), grid=4)
    with pytest.raises(ValueError, match=r"scene 0 \(sw_000000\) has grid 4 .* grid 3"):
        write_llava_dataset([scene], CFG, tmp_path)


def test_an_existence_share_of_records_asks_one_question_answered_by_the_scene(tmp_path):
    """existence_share=1: every record is one existence question, about a present shape or an
    absent one, answered "ring yes." or "ring no." by the scene; over 200 scenes both kinds occur, about
    half each (the draw is a fair coin: 100 +- 3 sd of 7 is 79..121)."""
    rng = np.random.default_rng(5)
    scenes = [sample_scene(rng, WORLD) for _ in range(200)]
    path = write_llava_dataset(scenes, WORLD, tmp_path, with_questions=False, existence_share=1.0)
    records = json.loads(path.read_text())
    yes = 0
    for record, scene in zip(records, scenes, strict=True):
        (ask, answer) = record["conversations"]
        shape = ask["value"].removeprefix("<image>\nIs there a ").removesuffix(" in the image?")
        assert shape in WORLD.shapes
        assert answer["value"] == f"{shape} " + ("yes." if shape in scene.shapes else "no.")
        yes += answer["value"].endswith(" yes.")
    assert 79 <= yes <= 121


def test_a_share_of_records_are_questions_the_rest_captions(tmp_path):
    """existence_share=0.25 over 200 scenes: about 50 questions (binomial sd 6.1: 32..68), every
    other record the scene's caption."""
    rng = np.random.default_rng(6)
    scenes = [sample_scene(rng, WORLD) for _ in range(200)]
    path = write_llava_dataset(scenes, WORLD, tmp_path, with_questions=False, existence_share=0.25)
    answers = [r["conversations"][-1]["value"] for r in json.loads(path.read_text())]
    asked = sum(a.endswith((" yes.", " no.")) for a in answers)
    assert 32 <= asked <= 68
    assert sum(a == caption(s) for a, s in zip(answers, scenes, strict=True)) == 200 - asked
