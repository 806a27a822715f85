"""`bpo eval`: answer the benchmarks a config lists, score them, write what a person compares.

Layout of the output folder:

- `{benchmark}/answers.jsonl`: one line per question (question_id, answer), appended as batches
  finish; a rerun reuses every answer already there and generates only the missing ones;
- `{benchmark}/answers.meta.json`: what generated them (model, generation settings, prompt), so a
  rerun with other settings is refused instead of mixing answers;
- `{benchmark}/judgments.jsonl`: the per-question scoring (parsed answer, mentions, grades, the
  judge's reply), rewritten on every run;
- `judge_cache/judgments.jsonl`: the judge's parsed replies by hash; a rerun asks nothing twice;
- `results.json`: metrics per benchmark, the model, the config, library versions;
- `results.md`: the metrics as a markdown table; `bpo compare RUN...` sets runs side by side.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bpo.bootstrap.generate import (
    GenerateConfig,
    GenerationRequest,
    check_backend,
    generate_with_config,
)
from bpo.data import vocab
from bpo.data.store import truncate_partial_line
from bpo.endpoint import ChatClient, EndpointConfig, Reply
from bpo.evaluate import chair, datasets, judges, pope
from bpo.evaluate.datasets import EvalItem, load_item_image
from bpo.models.load import ModelConfig

BenchmarkName = Literal[
    "pope", "object_halbench", "mmvet", "llava_bench", "shapeworld_chair", "shapeworld_pope"
]
JUDGED = ("mmvet", "llava_bench")
# LLaVA-1.5's evaluation appends this to POPE questions so that answers are one word.
POPE_SUFFIX = "Answer the question using a single word or phrase."
DEFAULT_SUFFIX = {"pope": POPE_SUFFIX, "shapeworld_pope": POPE_SUFFIX}
DEFAULT_MAX_NEW_TOKENS = {"pope": 16, "shapeworld_pope": 16}


@dataclass
class BenchmarkConfig:
    """One benchmark of a run: which, where its data is, and how to ask it."""

    name: BenchmarkName
    # A local folder or file in the release's layout, or a Hugging Face dataset id (online).
    data: str
    label: str | None = None  # the run's name for it (default `name`); names its output folder
    image_root: str | None = None  # folder the data's image paths are relative to
    split: str | None = None  # Hugging Face datasets only; default the benchmark's usual split
    limit: int | None = None  # only the first N questions (a smoke run)
    # A JSON Lines file of {question_id, answer} to score instead of generating.
    answers: str | None = None
    prompt_suffix: str | None = None  # appended to each question; null: the benchmark's default
    max_new_tokens: int | None = None  # null: the benchmark's default, else generation's
    # object_halbench: COCO annotation files the ground truth comes from (train and val 2014).
    coco_instances: list[str] = field(default_factory=list)
    coco_captions: list[str] = field(default_factory=list)
    judge_objects: bool = False  # object_halbench: the judge lists the objects (RLHF-V style)
    # shapeworld_pope: how questions are built from the scenes.
    pope_strategies: list[str] = field(default_factory=lambda: list(pope.STRATEGIES))
    pope_per_image: int = 3
    seed: int = 0

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class EvalConfig:
    """A run of `bpo eval`: the model (or answer files), the benchmarks, generation and judge."""

    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    model: ModelConfig | None = None  # null when every benchmark has an `answers` file
    generation: GenerateConfig = field(default_factory=GenerateConfig)
    judge: EndpointConfig | None = None  # needed by mmvet, llava_bench, judge_objects
    name: str | None = None  # the run's column title in `bpo compare`; default the folder name


class AnswersMismatchError(ValueError):
    """Stored answers were generated with other settings than the ones asked for now."""


def read_items(bench: BenchmarkConfig) -> list[EvalItem]:
    """The benchmark's questions, in the data's order (the first `limit` of them)."""
    split = {"split": bench.split} if bench.split else {}
    if bench.name == "pope":
        items = datasets.read_pope(bench.data, bench.image_root, **split)
    elif bench.name == "object_halbench":
        items = datasets.read_object_halbench(bench.data, bench.image_root)
    elif bench.name == "mmvet":
        items = datasets.read_mmvet(bench.data, bench.image_root, **split)
    elif bench.name == "llava_bench":
        items = datasets.read_llava_bench(bench.data, bench.image_root, **split)
    elif bench.name == "shapeworld_chair":
        items = datasets.read_shapeworld_captions(bench.data)
    elif bench.name == "shapeworld_pope":
        items = datasets.read_shapeworld_pope(
            bench.data, bench.pope_strategies, bench.pope_per_image, bench.seed
        )
    else:
        raise ValueError(f"unknown benchmark {bench.name!r}; use one of {BenchmarkName.__args__}")
    seen: set[str] = set()
    for item in items:
        if item.question_id in seen:
            raise ValueError(
                f"{bench.data}: question id {item.question_id!r} appears twice; answers are "
                "stored by question id, so ids must be unique"
            )
        seen.add(item.question_id)
    return items[: bench.limit] if bench.limit is not None else items


def question_text(bench: BenchmarkConfig, item: EvalItem) -> str:
    suffix = (
        bench.prompt_suffix if bench.prompt_suffix is not None else DEFAULT_SUFFIX.get(bench.name)
    )
    return f"{item.prompt}\n{suffix}" if suffix else item.prompt


# --- answers ----------------------------------------------------------------------------------


def _read_answers(path: Path) -> dict[str, str]:
    answers: dict[str, str] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                answers[str(record["question_id"])] = str(record.get("answer", record.get("text")))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path} line {number}: not an answer record ({type(exc).__name__}: {exc}); "
                    "each line must be a JSON object with question_id and answer"
                ) from None
    return answers


def _append(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _generation_meta(config: EvalConfig, bench: BenchmarkConfig) -> dict[str, Any]:
    generation = asdict(config.generation)
    generation["max_new_tokens"] = _max_new_tokens(config, bench)
    generation.pop("batch_size")  # batching does not change greedy answers
    if generation["backend"] == "transformers":
        # Engine options matter only to vLLM; leaving them out keeps older answer folders valid.
        generation.pop("vllm", None)
    suffix = (
        bench.prompt_suffix if bench.prompt_suffix is not None else DEFAULT_SUFFIX.get(bench.name)
    )
    model = asdict(config.model) if config.model else None
    if model:
        model.pop("device")
    return {
        "model": model,
        "answers_file": bench.answers,
        "generation": generation,
        "prompt_suffix": suffix,
    }


def _max_new_tokens(config: EvalConfig, bench: BenchmarkConfig) -> int:
    if bench.max_new_tokens is not None:
        return bench.max_new_tokens
    return DEFAULT_MAX_NEW_TOKENS.get(bench.name, config.generation.max_new_tokens)


class ModelHolder:
    """Loads the model on first use, so runs that only score answer files never load one.

    With generation backend "vllm" the model is a `VllmGenerator` (the engine and the processor;
    no image encoder, since evaluation images are clean), which `generate_with_config` expects.
    """

    def __init__(self, config: ModelConfig | None, generation: GenerateConfig | None = None):
        self.config = config
        self.generation = generation
        self._loaded: tuple[Any, Any] | None = None

    def get(self, bench: BenchmarkConfig) -> tuple[Any, Any]:
        if self._loaded is None:
            if self.config is None:
                raise ValueError(
                    f"benchmark {bench.key} needs answers but the config has no `model:` section "
                    "and the benchmark no `answers:` file; add one of the two"
                )
            if self.generation is not None and self.generation.backend == "vllm":
                from bpo.bootstrap.vllm_backend import VllmGenerator

                generator = VllmGenerator.from_config(
                    self.config, self.generation.vllm, with_encoder=False
                )
                self._loaded = (generator, generator.processor)
            else:
                from bpo.models.load import load_from_config

                self._loaded = load_from_config(self.config)
        return self._loaded


def ensure_answers(
    config: EvalConfig,
    bench: BenchmarkConfig,
    items: Sequence[EvalItem],
    folder: Path,
    model: ModelHolder,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """{question_id: answer} for every item: stored ones reused, the missing ones generated."""
    folder.mkdir(parents=True, exist_ok=True)
    path, meta_path = folder / "answers.jsonl", folder / "answers.meta.json"
    meta = _generation_meta(config, bench)
    if path.exists():
        stored_meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if stored_meta != meta:
            raise AnswersMismatchError(
                f"{path} holds answers made with other settings ({meta_path}: {stored_meta}) than "
                f"this run's ({meta}); use another --out, or delete {path} to answer again"
            )
        # A crash mid-write leaves half a line: drop it, that answer is generated again.
        truncate_partial_line(path)
    else:
        path.touch()
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    answers = _read_answers(path)
    missing = [item for item in items if item.question_id not in answers]
    if not missing:
        log(f"{bench.key}: all {len(items)} answers reused from {path}")
        return answers
    if bench.answers is not None:
        given = _read_answers(Path(bench.answers))
        absent = [item.question_id for item in missing if item.question_id not in given]
        if absent:
            raise ValueError(
                f"{bench.answers}: no answer for {len(absent)} of the {len(items)} questions of "
                f"{bench.key} (first: {absent[:3]}); answer them all, or set `limit`"
            )
        records = [{"question_id": i.question_id, "answer": given[i.question_id]} for i in missing]
        _append(path, records)
        answers.update({r["question_id"]: r["answer"] for r in records})
        return answers
    loaded_model, processor = model.get(bench)
    log(f"{bench.key}: generating {len(missing)} answers ({len(items) - len(missing)} reused)")
    # Written a chunk at a time, so an interrupted run loses at most one chunk.
    chunk = max(1, config.generation.batch_size) * 8
    for start in range(0, len(missing), chunk):
        part = missing[start : start + chunk]
        requests = [
            GenerationRequest(
                [{"role": "user", "content": question_text(bench, item)}], load_item_image(item)
            )
            for item in part
        ]
        texts = generate_with_config(
            loaded_model,
            processor,
            requests,
            config.generation,
            max_new_tokens=_max_new_tokens(config, bench),
        )
        records = [
            {"question_id": item.question_id, "answer": text}
            for item, text in zip(part, texts, strict=True)
        ]
        _append(path, records)
        answers.update({r["question_id"]: r["answer"] for r in records})
    return answers


# --- scoring ----------------------------------------------------------------------------------


def _judgment_fields(j: Reply) -> dict[str, Any]:
    return {
        "judge_reply": j.raw,
        "judge_attempts": j.attempts,
        "judge_cached": j.cached,
        "judge_error": j.error,
    }


def score_pope(items: Sequence[EvalItem], answers: dict[str, str]) -> tuple[dict, list[dict]]:
    """POPE metrics over all questions and per strategy, and one record per question."""
    records, by_strategy = [], {}
    for item in items:
        predicted = pope.parse_yes_no(answers[item.question_id])
        strategy = item.fields["strategy"]
        by_strategy.setdefault(strategy, ([], []))
        by_strategy[strategy][0].append(predicted)
        by_strategy[strategy][1].append(item.fields["label"])
        records.append(
            {
                "question_id": item.question_id,
                "answer": answers[item.question_id],
                "prediction": "yes" if predicted else "no",
                "label": "yes" if item.fields["label"] else "no",
                "strategy": strategy,
            }
        )
    predictions = [r["prediction"] == "yes" for r in records]
    labels = [r["label"] == "yes" for r in records]
    metrics = {"all": pope.pope_metrics(predictions, labels)}
    for strategy, (p, y) in sorted(by_strategy.items()):
        metrics[strategy] = pope.pope_metrics(p, y)
    return metrics, records


def _chair_records(
    items: Sequence[EvalItem],
    answers: dict[str, str],
    mentions: list[list[str]],
    truth: list[set[str]],
) -> tuple[dict, list[dict]]:
    records = []
    for item, said, true in zip(items, mentions, truth, strict=True):
        records.append(
            {
                "question_id": item.question_id,
                "answer": answers[item.question_id],
                "mentions": said,
                "hallucinated": [m for m in said if m not in true],
                "ground_truth": sorted(true),
            }
        )
    return chair.chair_scores(mentions, truth), records


def score_object_halbench(
    bench: BenchmarkConfig,
    items: Sequence[EvalItem],
    answers: dict[str, str],
    client: ChatClient | None,
) -> tuple[dict, list[dict]]:
    """CHAIR against COCO ground truth (segmentations + captions), words or judge-listed objects."""
    if not bench.coco_instances:
        raise ValueError(
            f"benchmark {bench.key} needs `coco_instances` (and `coco_captions`): the COCO 2014 "
            "annotation files its ground truth comes from"
        )
    image_ids = [item.fields["image_id"] for item in items]
    truth_by_image = chair.coco_ground_truth(bench.coco_instances, bench.coco_captions, image_ids)
    truth = [truth_by_image.get(i, set()) for i in image_ids]
    texts = [answers[item.question_id] for item in items]
    if not bench.judge_objects:
        mentions = [vocab.extract_objects(text) for text in texts]
        metrics, records = _chair_records(items, answers, mentions, truth)
    else:
        assert client is not None
        prompts = [
            judges.object_messages(item.prompt, t) for item, t in zip(items, texts, strict=True)
        ]
        judged = client.ask_all(prompts, judges.parse_object_list)
        mentions = [vocab.objects_to_categories(j.value or []) for j in judged]
        metrics, records = _chair_records(items, answers, mentions, truth)
        for record, j in zip(records, judged, strict=True):
            record.update({"objects": j.value, **_judgment_fields(j)})
        metrics["unparsable"] = sum(j.value is None for j in judged)
    for record, item in zip(records, items, strict=True):
        record["image_id"] = item.fields["image_id"]
    return metrics, records


def score_shapeworld_chair(
    items: Sequence[EvalItem], answers: dict[str, str]
) -> tuple[dict, list[dict]]:
    """CHAIR (and the prior-partner share) against the scenes' exact shapes."""
    from bpo.shapeworld.metrics import partner_scores
    from bpo.shapeworld.world import mentioned_shapes

    mentions = [mentioned_shapes(answers[item.question_id]) for item in items]
    truth = [item.fields["scene"].shapes for item in items]
    metrics, records = _chair_records(items, answers, mentions, truth)
    return {**metrics, **partner_scores(mentions, truth)}, records


def score_mmvet(
    items: Sequence[EvalItem], answers: dict[str, str], client: ChatClient
) -> tuple[dict, list[dict]]:
    """MM-Vet grades by the judge, then the total and per-capability scores."""
    prompts = [
        judges.mmvet_messages(item.prompt, item.fields["answer"], answers[item.question_id])
        for item in items
    ]
    judged = client.ask_all(prompts, judges.parse_mmvet_grade)
    grades = [j.value for j in judged]
    metrics = judges.mmvet_scores(grades, [item.fields["capability"] for item in items])
    metrics["unparsable_ids"] = [
        i.question_id for i, g in zip(items, grades, strict=True) if g is None
    ]
    records = [
        {
            "question_id": item.question_id,
            "answer": answers[item.question_id],
            "ground_truth": item.fields["answer"],
            "capability": item.fields["capability"],
            "grade": j.value,
            **_judgment_fields(j),
        }
        for item, j in zip(items, judged, strict=True)
    ]
    return metrics, records


def score_llava_bench(
    items: Sequence[EvalItem], answers: dict[str, str], client: ChatClient
) -> tuple[dict, list[dict]]:
    """LLaVA-Bench reviews by the judge, then relative scores per category and overall."""
    prompts = [
        judges.llava_bench_messages(
            item.prompt,
            item.fields["context"],
            item.fields["reference"],
            answers[item.question_id],
            item.fields["category"],
        )
        for item in items
    ]
    judged = client.ask_all(prompts, judges.parse_review_scores)
    reviews = [j.value for j in judged]
    metrics = judges.llava_bench_scores(reviews, [item.fields["category"] for item in items])
    metrics["unparsable_ids"] = [
        i.question_id for i, r in zip(items, reviews, strict=True) if r is None
    ]
    records = [
        {
            "question_id": item.question_id,
            "category": item.fields["category"],
            "answer": answers[item.question_id],
            "reference_score": j.value[0] if j.value else None,
            "model_score": j.value[1] if j.value else None,
            **_judgment_fields(j),
        }
        for item, j in zip(items, judged, strict=True)
    ]
    return metrics, records


def score(
    bench: BenchmarkConfig,
    items: Sequence[EvalItem],
    answers: dict[str, str],
    client: ChatClient | None,
) -> tuple[dict, list[dict]]:
    """(metrics, per-question records) of one benchmark's answers."""
    if bench.name in ("pope", "shapeworld_pope"):
        return score_pope(items, answers)
    if bench.name == "object_halbench":
        return score_object_halbench(bench, items, answers, client)
    if bench.name == "shapeworld_chair":
        return score_shapeworld_chair(items, answers)
    assert client is not None
    if bench.name == "mmvet":
        return score_mmvet(items, answers, client)
    return score_llava_bench(items, answers, client)


# --- the run ----------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import datasets as hf_datasets
    import torch
    import transformers

    import bpo

    return {
        "bpo": bpo.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": hf_datasets.__version__,
    }


def _needs_judge(bench: BenchmarkConfig) -> bool:
    return bench.name in JUDGED or (bench.name == "object_halbench" and bench.judge_objects)


def check_config(config: EvalConfig) -> None:
    """Fail before any work on a config that cannot run to the end."""
    if not config.benchmarks:
        raise ValueError("the config lists no benchmarks; add a `benchmarks:` list")
    keys = [b.key for b in config.benchmarks]
    if len(set(keys)) != len(keys):
        raise ValueError(f"benchmark labels repeat ({keys}); give each a distinct `label`")
    for bench in config.benchmarks:
        if _needs_judge(bench) and config.judge is None:
            raise ValueError(
                f"benchmark {bench.key} needs a judge: add a `judge:` section (base_url, model, "
                "api_key_env) to the config"
            )
        if bench.answers is None and config.model is None:
            raise ValueError(
                f"benchmark {bench.key} has no `answers:` file and the config no `model:`; add one"
            )


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, key + "/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[key] = value
    return flat


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1.5 else f"{value:.2f}"


def markdown_table(runs: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Runs side by side: a row per (benchmark, metric), a column per run ('-' where absent).

    runs: {run name: {benchmark: metrics}} (metrics nested as results.json holds them).
    """
    names = list(runs)
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for name, benchmarks in runs.items():
        for bench, metrics in benchmarks.items():
            for metric, value in _flatten(metrics).items():
                rows.setdefault((bench, metric), {})[name] = value
    lines = [
        "| benchmark | metric | " + " | ".join(names) + " |",
        "|---|---|" + "---:|" * len(names),
    ]
    for (bench, metric), values in rows.items():
        cells = " | ".join(_cell(values.get(n)) for n in names)
        lines.append(f"| {bench} | {metric} | {cells} |")
    return "\n".join(lines) + "\n"


def run_eval(config: EvalConfig, out: str | Path, log: Callable[[str], None] = print) -> dict:
    """Run every benchmark of `config` into `out`; returns what results.json holds."""
    started = time.time()
    check_config(config)
    check_backend(config.generation.backend)  # a missing vllm fails before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = ModelHolder(config.model, config.generation)
    client = None
    if config.judge is not None and any(_needs_judge(b) for b in config.benchmarks):
        client = ChatClient(
            config.judge, cache_dir=out / "judge_cache", cache_name="judgments.jsonl"
        )
    results: dict[str, Any] = {}
    try:
        for bench in config.benchmarks:
            folder = out / bench.key
            items = read_items(bench)
            answers = ensure_answers(config, bench, items, folder, model, log)
            metrics, records = score(bench, items, answers, client)
            with (folder / "judgments.jsonl").open("w", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            results[bench.key] = metrics
            log(f"{bench.key}: scored {len(items)} questions")
    finally:
        if client is not None:
            client.close()
    name = config.name or out.resolve().name
    summary = {
        "name": name,
        "model": config.model.name_or_path if config.model else None,
        "benchmarks": results,
        "config": asdict(config),
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(f"# {name}\n\n" + markdown_table({name: results}))
    return summary


def compare_runs(runs: Sequence[str | Path]) -> str:
    """The markdown table of several runs' results.json, side by side."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        path = Path(run)
        path = path / "results.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; pass the output folder of a `bpo eval` run")
        data = json.loads(path.read_text())
        name = data.get("name") or path.parent.name
        while name in table:  # two runs of one name stay two columns
            name += "'"
        table[name] = data["benchmarks"]
    return markdown_table(table)
