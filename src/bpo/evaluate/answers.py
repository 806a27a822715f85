"""The answers cache of `bpo eval`: every question answered once, reused by every rerun.

In a benchmark's output folder:

- `answers.jsonl`: one line per question (question_id, answer), appended a chunk at a time as
  generation goes; a rerun reuses every answer there and generates only the missing ones (a line
  cut short by a kill is dropped first, and that answer generated again);
- `answers.meta.json`: what generated them (model, generation settings, prompt suffix, answers
  file), so that a rerun with other settings is refused instead of mixing answers.

Answers come from the benchmark's `answers` file when it has one, else from the model, loaded on
first use (`ModelHolder`), so a run that only scores answer files never loads a model. With a
`ray:` section the chunks are answered by model replicas on a Ray cluster (`answer_chunk` in
each) and written here in order: the same answers, file and resume as a run in this process.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bpo.data.files import (
    append_json_lines,
    read_json_lines,
    truncate_partial_line,
    write_atomic,
)
from bpo.evaluate.benchmarks import BenchmarkConfig, benchmark, prompt_suffix, question_text
from bpo.evaluate.config import EvalConfig
from bpo.evaluate.datasets import EvalItem, load_item_image
from bpo.generate import GenerateConfig, GenerationRequest, Generator, load_generator, stream_seed
from bpo.generate.config import Decoding
from bpo.generate.ray_cluster import ordered_map
from bpo.models.load import ModelConfig
from bpo.utils.console import progress_bar

ANSWER_RECORD = "each line must be a JSON object with question_id and answer (a string)"


class AnswersMismatchError(ValueError):
    """Stored answers were generated with other settings than the ones asked for now."""


def _read_answers(path: Path, appended: bool) -> dict[str, str]:
    """{question_id: answer} of an answers file.

    appended: the run's own answers.jsonl, which it appends to (a cut last line is skipped); a
        file handed in by the user is read strictly.
    """
    answers: dict[str, str] = {}
    for number, record in read_json_lines(path, appended=appended, fix=ANSWER_RECORD):
        answer = record.get("answer", record.get("text")) if isinstance(record, dict) else None
        qid = record.get("question_id") if isinstance(record, dict) else None
        if answer is None or not isinstance(qid, str | int) or isinstance(qid, bool):
            # Scored as the text "None", a missing answer would be a silent wrong number.
            raise ValueError(f"{path} line {number}: not an answer record; {ANSWER_RECORD}")
        if not isinstance(answer, str):
            # Likewise a number or an object, scored as the text "5" or "{...}".
            shown = json.dumps(answer, ensure_ascii=False)[:60]
            raise ValueError(
                f"{path} line {number} (question_id={qid!r}): the answer is {shown}, not text; "
                f"{ANSWER_RECORD}"
            )
        answers[str(qid)] = answer
    return answers


def _max_new_tokens(config: EvalConfig, bench: BenchmarkConfig) -> int:
    if bench.max_new_tokens is not None:
        return bench.max_new_tokens
    default = benchmark(bench).max_new_tokens
    return default if default is not None else config.generation.max_new_tokens


def _generation_meta(config: EvalConfig, bench: BenchmarkConfig) -> dict[str, Any]:
    generation = asdict(config.generation)
    generation["max_new_tokens"] = _max_new_tokens(config, bench)
    generation.pop("batch_size")  # batching does not change greedy answers
    if generation["backend"] == "transformers":
        # Engine options matter only to vLLM; leaving them out keeps older answer folders valid.
        generation.pop("vllm", None)
    model = asdict(config.model) if config.model else None
    if model:
        model.pop("device")
    return {
        "model": model,
        "answers_file": bench.answers,
        "generation": generation,
        "prompt_suffix": prompt_suffix(bench),
    }


class ModelHolder:
    """Loads the generator on first use, so runs that only score answer files never load a model.

    With generation backend "vllm" it is a `VllmGenerator` (the engine and the processor; no
    image encoder, since evaluation images are clean), else the model in transformers.
    """

    def __init__(self, config: ModelConfig | None, generation: GenerateConfig | None = None):
        self.config = config
        self.generation = generation or GenerateConfig()
        self._loaded: Generator | None = None

    def get(self, bench: BenchmarkConfig) -> Generator:
        if self._loaded is None:
            if self.config is None:
                raise ValueError(
                    f"benchmark {bench.key} needs answers but the config has no `model:` section "
                    "and the benchmark no `answers:` file; add one of the two"
                )
            g = self.generation
            self._loaded = load_generator(self.config, g.backend, g.batch_size, g.vllm)
        return self._loaded


def _same_questions(
    config: EvalConfig, bench: BenchmarkConfig, items: Sequence[EvalItem]
) -> list[list[EvalItem]]:
    """The items in groups that are one question: the same text about the same image file.

    Greedy answers to one question are one answer, so each group is generated once (POPE asks
    the same question of an image under several strategies). Sampled answers, and images that
    are not files, are never grouped.
    """
    if config.generation.do_sample:
        return [[item] for item in items]
    groups: dict[object, list[EvalItem]] = {}
    for item in items:
        image = item.image
        known = image is None or isinstance(image, str | Path)
        key = (str(image), question_text(bench, item)) if known else item.question_id
        groups.setdefault(key, []).append(item)
    return list(groups.values())


def _requests(config: EvalConfig, bench: BenchmarkConfig, items: Sequence[EvalItem]):
    """One request per question; sampled ones keyed by the question's id (batch-independent)."""
    seed = config.generation.seed if config.generation.do_sample else None
    return [
        GenerationRequest(
            [{"role": "user", "content": question_text(bench, item)}],
            load_item_image(item),
            seed=None if seed is None else stream_seed(seed, item.question_id, 0, "sample"),
        )
        for item in items
    ]


def _stored_meta(path: Path) -> dict[str, Any] | None:
    """What generated the stored answers (None when the file is missing)."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AnswersMismatchError(
            f"{path} is not valid JSON ({exc}); delete it and the answers.jsonl beside it to "
            "answer again"
        ) from None


def ensure_answers(
    config: EvalConfig,
    bench: BenchmarkConfig,
    items: Sequence[EvalItem],
    folder: Path,
    model: ModelHolder,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, str]:
    """{question_id: answer} for every item: stored ones reused, the missing ones generated.

    progress: show a progress bar while answers are generated.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path, meta_path = folder / "answers.jsonl", folder / "answers.meta.json"
    meta = _generation_meta(config, bench)
    if path.exists():
        stored_meta = _stored_meta(meta_path)
        if stored_meta != meta:
            raise AnswersMismatchError(
                f"{path} holds answers made with other settings ({meta_path}: {stored_meta}) than "
                f"this run's ({meta}); use another --out, or delete {path} to answer again"
            )
        # A crash mid-write leaves half a line: drop it, that answer is generated again.
        truncate_partial_line(path)
    else:
        # The settings first, whole: a kill between the two files leaves no answers without them.
        write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
        path.touch()
    answers = _read_answers(path, appended=True)
    missing = [item for item in items if item.question_id not in answers]
    if not missing:
        log(f"{bench.key}: all {len(items)} answers reused from {path}")
        return answers
    if bench.answers is not None:
        given = _read_answers(Path(bench.answers), appended=False)
        absent = [item.question_id for item in missing if item.question_id not in given]
        if absent:
            raise ValueError(
                f"{bench.answers}: no answer for {len(absent)} of the {len(items)} questions of "
                f"{bench.key} (first: {absent[:3]}); answer them all, or set `limit`"
            )
        records = [{"question_id": i.question_id, "answer": given[i.question_id]} for i in missing]
        append_json_lines(path, records)
        answers.update({r["question_id"]: r["answer"] for r in records})
        return answers
    log(f"{bench.key}: generating {len(missing)} answers ({len(items) - len(missing)} reused)")
    decoding = config.generation.decoding(_max_new_tokens(config, bench))
    # Written a chunk at a time, so an interrupted run loses at most one chunk.
    chunk = max(1, config.generation.batch_size) * 8
    # Groups over all items, not only the missing ones, and only missing members written: a
    # resumed file then continues the records of an uninterrupted run in their order (a kill
    # leaves a prefix of them), so it ends up the same bytes.
    missing_ids = {item.question_id for item in missing}
    groups = [
        group
        for group in _same_questions(config, bench, items)
        if any(item.question_id in missing_ids for item in group)
    ]
    parts = [groups[start : start + chunk] for start in range(0, len(groups), chunk)]
    answered = _answered(config, bench, parts, decoding, model)
    with progress_bar(f"answers ({bench.key})", len(groups), enabled=progress) as advance:
        for part, texts in zip(parts, answered, strict=True):
            records = [
                {"question_id": item.question_id, "answer": text}
                for group, text in zip(part, texts, strict=True)
                for item in group
                if item.question_id in missing_ids
            ]
            append_json_lines(path, records)
            answers.update({r["question_id"]: r["answer"] for r in records})
            for _ in part:
                advance(0)
    return answers


def _answered(
    config: EvalConfig,
    bench: BenchmarkConfig,
    parts: Sequence[Sequence[Sequence[EvalItem]]],
    decoding: Decoding,
    model: ModelHolder,
):
    """The answer texts of each chunk of question groups, chunk by chunk in order."""
    asked = [[group[0] for group in part] for part in parts]
    if config.ray is not None:
        yield from ordered_map(asked, answer_chunk, (config, bench, decoding), config.ray)
        return
    yield from map(_chunk_answerer(model.get(bench), config, bench, decoding), asked)


def _chunk_answerer(
    generator: Generator, config: EvalConfig, bench: BenchmarkConfig, decoding: Decoding
) -> Callable[[Sequence[EvalItem]], list[str]]:
    """The answer texts of a chunk of questions, one generator call (local run or replica)."""

    def answer(items: Sequence[EvalItem]) -> list[str]:
        return [g.text for g in generator.generate(_requests(config, bench, items), decoding)]

    return answer


def answer_chunk(
    config: EvalConfig, bench: BenchmarkConfig, decoding: Decoding
) -> Callable[[Sequence[EvalItem]], list[str]]:
    """A Ray replica's worker: loads the model once, then answers a chunk of questions.

    The images load in the replica, from the items' paths, so only text crosses the cluster.
    """
    generator = ModelHolder(config.model, config.generation).get(bench)
    return _chunk_answerer(generator, config, bench, decoding)
