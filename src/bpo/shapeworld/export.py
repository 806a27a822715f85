"""Write ShapeWorld scenes as a LLaVA conversation dataset, with the exact ground truth beside it.

Layout of `out_dir`:

- `images/sw_000000.png`, ...: each scene rendered by `world.render` (PNG, so lossless);
- `data.json`: LLaVA records, `<image>` + a caption prompt answered by the gold caption, then the
  scene's questions as further turns (or, for a chosen share of records, one existence question);
  `bpo.data.read_llava(data.json, image_root=out_dir)` reads it;
- `scenes.jsonl`: one line per record, in the same order, with the scene's objects, grid and seed;
  `read_scenes` loads them back as equal `Scene`s (`write_scenes` writes one for scenes alone).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bpo.data.files import read_json_lines, write_atomic
from bpo.shapeworld.world import (
    CAPTION_PROMPTS,
    Scene,
    ShapeObject,
    WorldConfig,
    caption,
    existence_qa,
    questions,
    render,
)


def record_id(index: int) -> str:
    """The id of the `index`-th exported scene, e.g. 'sw_000123'."""
    return f"sw_{index:06d}"


def scene_to_json(scene: Scene) -> dict[str, Any]:
    """The scene's exact ground truth as a JSON-ready dict (objects in caption order)."""
    return {
        "grid": scene.grid,
        "seed": scene.seed,
        "objects": [asdict(o) for o in scene.objects],
    }


def scene_from_json(data: dict[str, Any]) -> Scene:
    """The Scene a `scene_to_json` dict (or a scenes.jsonl line) describes."""
    objects = tuple(ShapeObject(**o) for o in data["objects"])
    return Scene(objects, int(data["grid"]), int(data["seed"]))


def _conversation(
    scene: Scene,
    rng: np.random.Generator,
    cfg: WorldConfig,
    prompt: str,
    with_questions: bool,
    existence_share: float,
) -> list[dict[str, str]]:
    # No draw when the share is 0, so exports without existence records stay as they were.
    if existence_share and rng.random() < existence_share:
        question, answer = existence_qa(scene, rng, cfg)
        return [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ]
    turns = [
        {"from": "human", "value": f"<image>\n{prompt}"},
        {"from": "gpt", "value": caption(scene)},
    ]
    if with_questions:
        for question, answer in questions(scene, rng, cfg):
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def write_llava_dataset(
    scenes: Iterable[Scene],
    cfg: WorldConfig,
    out_dir: str | Path,
    seed: int = 0,
    with_questions: bool = True,
    prompt: str = CAPTION_PROMPTS[0],
    existence_share: float = 0.0,
) -> Path:
    """Render `scenes` and write images, data.json and scenes.jsonl under `out_dir`; returns data.json.

    Args:
        scenes: any iterable (a generator is fine); record k gets id `record_id(k)`.
        seed: seeds the question choice; record k's questions use `default_rng((seed, k))`, so
            the output is the same for the same scenes and seed, whatever came before.
        prompt: the user turn before the caption (after `<image>\\n`).
        existence_share: the share of records that are one existence question instead ("Is
            there a ring in the image?" about a present or an absent shape, equal odds), drawn
            per record from the same keyed generator.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, truth = [], []
    for index, scene in enumerate(scenes):
        sample_id = record_id(index)
        if scene.grid != cfg.grid:
            raise ValueError(
                f"scene {index} ({sample_id}) has grid {scene.grid} but the config has grid "
                f"{cfg.grid}; render with the WorldConfig the scenes were sampled from"
            )
        image = f"images/{sample_id}.png"
        Image.fromarray(render(scene, cfg)).save(out / image, format="PNG")
        rng = np.random.default_rng((seed, index))
        turns = _conversation(scene, rng, cfg, prompt, with_questions, existence_share)
        records.append({"id": sample_id, "image": image, "conversations": turns})
        truth.append({"id": sample_id, "image": image, **scene_to_json(scene)})
    # Each file written whole, then renamed: a crash never leaves a truncated one behind.
    write_atomic(out / "scenes.jsonl", "".join(json.dumps(line) + "\n" for line in truth))
    write_atomic(out / "data.json", json.dumps(records, indent=1) + "\n")
    return out / "data.json"


def write_scenes(scenes: Iterable[Scene], path: str | Path) -> Path:
    """Scenes alone as a scenes.jsonl (no images): e.g. a text corpus's scenes, whose object
    statistics rank POPE's popular and adversarial questions."""
    lines = [
        json.dumps({"id": record_id(i), **scene_to_json(scene)}) + "\n"
        for i, scene in enumerate(scenes)
    ]
    write_atomic(Path(path), "".join(lines))
    return Path(path)


def read_scenes(path: str | Path) -> list[Scene]:
    """The scenes of a scenes.jsonl file (`write_llava_dataset`, `write_scenes`), in order."""
    fix = "re-export the dataset with write_llava_dataset"
    scenes = []
    for number, data in read_json_lines(path, appended=False, fix=fix):
        try:
            scenes.append(scene_from_json(data))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{path} line {number}: not a scene ({type(exc).__name__}: {exc}); {fix}"
            ) from exc
    return scenes
