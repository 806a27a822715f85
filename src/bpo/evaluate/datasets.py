"""Benchmark readers: POPE, Object HalBench, MM-Vet and LLaVA-Bench, as EvalItems.

Every benchmark reads from a local folder (offline) in its release's own layout; POPE, MM-Vet and
LLaVA-Bench also read a Hugging Face dataset id (`lmms-lab/POPE`, `whyu/mm-vet`,
`lmms-lab/llava-bench-in-the-wild`, ...) through `datasets.load_dataset` for users online. Images
named by path must stay under their image root (`bpo.data.resolve_image_path`). The ShapeWorld
benchmarks read theirs in `bpo.evaluate.shapeworld`, with these helpers.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from bpo.data.files import read_json_lines
from bpo.data.images import load_image, load_image_bytes, resolve_image_path
from bpo.evaluate.pope import STRATEGIES


@dataclass
class EvalItem:
    """One benchmark question: its id, the user's text, its image, and what scoring needs."""

    question_id: str
    prompt: str
    image: Any = None  # a Path, encoded bytes, a PIL image, or None
    fields: dict[str, Any] = field(default_factory=dict)


def load_item_image(item: EvalItem) -> Image.Image | None:
    """The item's image as RGB, decoded now (images are read lazily, one batch at a time)."""
    image = item.image
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, bytes):
        return load_image_bytes(image, label=f"of question {item.question_id}")
    if isinstance(image, dict) and image.get("bytes"):
        return load_image_bytes(image["bytes"], label=f"of question {item.question_id}")
    return load_image(image)


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists()


def _looks_like_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not source.startswith((".", "/"))


def _hf_rows(source: str, split: str) -> Iterator[dict[str, Any]]:
    if not _looks_like_hub_id(source):
        raise FileNotFoundError(
            f"benchmark data {source!r} is neither an existing local path nor a Hugging Face "
            "dataset id like 'lmms-lab/POPE'; check the path"
        )
    import datasets

    yield from datasets.load_dataset(source, split=split)


def json_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each line of a benchmark's JSON Lines file; every line an object.

    Benchmark files are only read, never appended to, so a line that does not parse is damage
    wherever it is, the last line included.
    """
    for number, record in read_json_lines(path, appended=False, fix="fix or drop the line"):
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number}: expected a JSON object per line")
        yield number, record


def _field(record: dict[str, Any], names: tuple[str, ...], where: str) -> Any:
    for name in names:
        if name in record and record[name] is not None:
            return record[name]
    raise ValueError(
        f"{where}: no {' / '.join(repr(n) for n in names)} field; is this the right file?"
    )


def image_path(root: Path, relative: str, where: str) -> Path:
    """`relative` under `root`; an error names `where` (file and line) when it leaves the root."""
    try:
        return resolve_image_path(root, relative)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


# --- POPE -------------------------------------------------------------------------------------


def _pope_strategy(path: Path) -> str:
    """`coco_pope_adversarial.json` -> adversarial; any other name -> the file's stem."""
    tail = path.stem.rsplit("_", 1)[-1]
    return tail if tail in STRATEGIES else path.stem


def read_pope(source: str, image_root: str | None = None, split: str = "test") -> list[EvalItem]:
    """POPE questions from a release file or folder of them (`coco_pope_{strategy}.json`, JSON Lines
    of question_id, image, text, label) or a Hugging Face dataset (lmms-lab/POPE's columns).

    image_root: the folder the `image` names are relative to (COCO val2014); default the
        folder of the question files.
    """
    if not _is_local(source):
        items = []
        for row in _hf_rows(source, split):
            strategy = str(row.get("category", "pope"))
            qid = f"{strategy}/{row['question_id']}"
            answer = str(row["answer"]).strip().lower()
            fields = {"label": answer == "yes", "strategy": strategy}
            items.append(EvalItem(qid, row["question"], row["image"], fields))
        return items
    path = Path(source)
    files = (
        sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        if path.is_dir()
        else [path]
    )
    if not files:
        raise FileNotFoundError(f"no POPE question files (*.json, *.jsonl) in {path}")
    root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
    items = []
    for file in files:
        strategy = _pope_strategy(file)
        for number, record in json_records(file):
            where = f"{file} line {number}"
            label = str(_field(record, ("label", "answer"), where)).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"{where}: label {label!r} is not 'yes' or 'no'")
            qid = f"{strategy}/{_field(record, ('question_id',), where)}"
            image = image_path(root, str(_field(record, ("image",), where)), where)
            fields = {"label": label == "yes", "strategy": strategy}
            items.append(
                EvalItem(qid, str(_field(record, ("text", "question"), where)), image, fields)
            )
    return items


# --- Object HalBench --------------------------------------------------------------------------


def _decode_base64(text: str) -> bytes | None:
    """The bytes of a base64 image (a `data:image/...;base64,` prefix allowed), else None."""
    payload = text.split("base64,", 1)[-1]
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def read_object_halbench(source: str, image_root: str | None = None) -> list[EvalItem]:
    """Object HalBench prompts from the RLHF-V release's JSON Lines (image_id, question, image).

    `image` is the encoded image (base64) or a path under image_root; without either, the image is
    `COCO_val2014_{image_id:012d}.jpg` under image_root. Question ids are `question_id` when the
    file has them, else the line number.
    """
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"Object HalBench question file {path} not found; check the path")
    root = Path(image_root) if image_root else path.parent
    items = []
    for number, record in json_records(path):
        where = f"{path} line {number}"
        image_id = int(_field(record, ("image_id",), where))
        prompt = str(_field(record, ("question", "prompt", "text"), where))
        image: Any = record.get("image")
        if isinstance(image, str) and len(image) > 256 and (decoded := _decode_base64(image)):
            image = decoded
        elif isinstance(image, str) and image:
            image = image_path(root, image, where)
        else:
            image = image_path(root, f"COCO_val2014_{image_id:012d}.jpg", where)
        qid = str(record.get("question_id", number))
        items.append(EvalItem(qid, prompt, image, {"image_id": image_id}))
    return items


# --- MM-Vet -----------------------------------------------------------------------------------


def _capabilities(value: Any) -> list[str]:
    if isinstance(value, str):
        return [c.strip() for c in value.split(",") if c.strip()]
    return [str(c) for c in value]


def read_mmvet(source: str, image_root: str | None = None, split: str = "test") -> list[EvalItem]:
    """MM-Vet from its release folder (`mm-vet.json` + `images/`) or a Hugging Face dataset.

    Each item keeps the ground truth (`answer`, with <AND>/<OR>) and its `capability` list.
    """
    if not _is_local(source):
        items = []
        for number, row in enumerate(_hf_rows(source, split)):
            qid = str(row.get("question_id", row.get("id", f"v1_{number}")))
            fields = {"answer": row["answer"], "capability": _capabilities(row["capability"])}
            items.append(EvalItem(qid, row["question"], row["image"], fields))
        return items
    path = Path(source)
    file = path / "mm-vet.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; point `data` at the MM-Vet release folder")
    root = Path(image_root) if image_root else file.parent / "images"
    with file.open(encoding="utf-8") as f:
        records = json.load(f)
    items = []
    for qid, record in records.items():
        where = f"{file} item {qid}"
        image = image_path(root, str(_field(record, ("imagename", "image"), where)), where)
        fields = {
            "answer": str(_field(record, ("answer",), where)),
            "capability": _capabilities(_field(record, ("capability",), where)),
        }
        items.append(EvalItem(str(qid), str(_field(record, ("question",), where)), image, fields))
    return items


# --- LLaVA-Bench in-the-wild ------------------------------------------------------------------


def _reference_answers(path: Path) -> dict[str, str]:
    """{question_id: reference answer} of LLaVA-Bench's answers_gpt4.jsonl; every answer text.

    The judge reads the reference beside the model's answer: a null or a number would reach it
    as the text "None" or "5" and score the model against nothing.
    """
    references = {}
    for number, record in json_records(path):
        where = f"{path} line {number}"
        qid, text = _field(record, ("question_id",), where), _field(record, ("text",), where)
        if not isinstance(text, str):
            raise ValueError(
                f"{where} (question_id={qid!r}): the reference answer `text` is "
                f"{json.dumps(text)[:60]}, not text; fix the line"
            )
        references[str(qid)] = text
    return references


def read_llava_bench(
    source: str, image_root: str | None = None, split: str = "train"
) -> list[EvalItem]:
    """LLaVA-Bench in-the-wild from its release folder or a Hugging Face dataset.

    The folder holds questions.jsonl (question_id, image, text, category), context.jsonl (image,
    caption), answers_gpt4.jsonl (question_id, text: the reference answers) and images/.
    """
    if not _is_local(source):
        items = []
        for row in _hf_rows(source, split):
            fields = {
                "category": row["category"],
                "context": row.get("caption", ""),
                "reference": row["gpt_answer"],
            }
            items.append(EvalItem(str(row["question_id"]), row["question"], row["image"], fields))
        return items
    folder = Path(source)
    files = {name: folder / f"{name}.jsonl" for name in ("questions", "context", "answers_gpt4")}
    for file in files.values():
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} not found; point `data` at the LLaVA-Bench release folder"
            )
    root = Path(image_root) if image_root else folder / "images"
    context = {r["image"]: r.get("caption", "") for _, r in json_records(files["context"])}
    references = _reference_answers(files["answers_gpt4"])
    items = []
    for number, record in json_records(files["questions"]):
        where = f"{files['questions']} line {number}"
        qid = str(_field(record, ("question_id",), where))
        name = str(_field(record, ("image",), where))
        if qid not in references:
            raise ValueError(
                f"{where} (question_id={qid}): no reference answer in answers_gpt4.jsonl"
            )
        fields = {
            "category": str(_field(record, ("category",), where)),
            "context": context.get(name, ""),
            "reference": references[qid],
        }
        image = image_path(root, name, where)
        items.append(EvalItem(qid, str(_field(record, ("text",), where)), image, fields))
    return items
