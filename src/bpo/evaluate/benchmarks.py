"""The benchmarks `bpo eval` runs: one table from a benchmark's name to how it is read, asked, scored.

A `BenchmarkConfig` is one entry of a config's `benchmarks:` list; `BENCHMARKS[config.name]` is
the `Benchmark` that says what to do with it: its reader (`datasets`, `shapeworld`), its scorer
(`scores`, `shapeworld`), the prompt suffix and answer length it asks with by default, and whether
it needs the judge. `BenchmarkConfig` is defined here, beside the table, because the table's
readers and scorers take it; `config` builds the run's schema from it and checks a config against
the table.

A benchmark also names the options it reads beyond the common ones (`data`, `label`, `limit`,
`answers`, `prompt_suffix`, `max_new_tokens`), so that an option set on a benchmark that ignores
it is refused rather than silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Literal

from bpo.endpoint import ChatClient
from bpo.evaluate import datasets, pope, scores, shapeworld
from bpo.evaluate.datasets import EvalItem
from bpo.evaluate.scores import Scored

BenchmarkName = Literal[
    "pope", "object_halbench", "mmvet", "llava_bench", "shapeworld_chair", "shapeworld_pope"
]
# LLaVA-1.5's evaluation appends this to POPE questions so that answers are one word.
POPE_SUFFIX = "Answer the question using a single word or phrase."


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
    # shapeworld_pope: a scenes.jsonl whose object counts rank the popular and adversarial
    # negatives (a text corpus's scenes, as POPE ranks by COCO's); null: the benchmark's scenes.
    pope_rank_scenes: str | None = None

    @property
    def key(self) -> str:
        return self.label or self.name


Reader = Callable[[BenchmarkConfig], list[EvalItem]]
Scorer = Callable[[BenchmarkConfig, Sequence[EvalItem], dict[str, str], ChatClient | None], Scored]


def _never(bench: BenchmarkConfig) -> bool:
    return False


def _always(bench: BenchmarkConfig) -> bool:
    return True


def _nothing_to_check(bench: BenchmarkConfig) -> None:
    return None


@dataclass(frozen=True)
class Benchmark:
    """How `bpo eval` reads, asks and scores one kind of benchmark."""

    read: Reader  # the questions, in the data's order
    score: Scorer  # (metrics, per-question records); the client is None without a judge
    options: frozenset[str] = frozenset()  # the BenchmarkConfig fields it reads beyond the common
    prompt_suffix: str | None = None  # appended to every question unless the config sets one
    max_new_tokens: int | None = None  # None: the generation section's
    needs_judge: Callable[[BenchmarkConfig], bool] = _never
    check: Callable[[BenchmarkConfig], None] = _nothing_to_check  # raises on a setting it refuses


def judge_missing(bench: BenchmarkConfig) -> str:
    """The message for a judged benchmark in a config without a judge."""
    return (
        f"benchmark {bench.key} needs a judge: add a `judge:` section (base_url, model, "
        "api_key_env) to the config"
    )


def _judge(bench: BenchmarkConfig, client: ChatClient | None) -> ChatClient:
    if client is None:
        raise ValueError(judge_missing(bench))
    return client


def _split(bench: BenchmarkConfig) -> dict[str, str]:
    return {"split": bench.split} if bench.split else {}


def _answers_only(scorer: Callable[[Sequence[EvalItem], dict[str, str]], Scored]) -> Scorer:
    """A scorer that needs neither options nor a judge, in the table's signature."""
    return lambda bench, items, answers, client: scorer(items, answers)


def _judged(judged: scores.JudgedBenchmark) -> Scorer:
    return lambda bench, items, answers, client: scores.score_judged(
        judged, items, answers, _judge(bench, client)
    )


def _score_object_halbench(
    bench: BenchmarkConfig,
    items: Sequence[EvalItem],
    answers: dict[str, str],
    client: ChatClient | None,
) -> Scored:
    judge = _judge(bench, client) if bench.judge_objects else None
    return scores.score_object_halbench(
        items, answers, bench.coco_instances, bench.coco_captions, judge
    )


def _check_object_halbench(bench: BenchmarkConfig) -> None:
    if not bench.coco_instances:
        raise ValueError(
            f"benchmark {bench.key} needs `coco_instances` (and `coco_captions`): the COCO 2014 "
            "annotation files its ground truth comes from"
        )


def _check_shapeworld_pope(bench: BenchmarkConfig) -> None:
    unknown = [s for s in bench.pope_strategies if s not in pope.STRATEGIES]
    if unknown or not bench.pope_strategies:
        raise ValueError(
            f"benchmark {bench.key}: pope_strategies {bench.pope_strategies} must be some of "
            f"{', '.join(pope.STRATEGIES)}"
        )
    if bench.pope_per_image < 1:
        raise ValueError(
            f"benchmark {bench.key}: pope_per_image is {bench.pope_per_image}; ask at least 1 "
            "question per image"
        )


BENCHMARKS: dict[str, Benchmark] = {
    "pope": Benchmark(
        read=lambda bench: datasets.read_pope(bench.data, bench.image_root, **_split(bench)),
        score=_answers_only(scores.score_pope),
        options=frozenset({"image_root", "split"}),
        prompt_suffix=POPE_SUFFIX,
        max_new_tokens=16,
    ),
    "object_halbench": Benchmark(
        read=lambda bench: datasets.read_object_halbench(bench.data, bench.image_root),
        score=_score_object_halbench,
        options=frozenset({"image_root", "coco_instances", "coco_captions", "judge_objects"}),
        needs_judge=lambda bench: bench.judge_objects,
        check=_check_object_halbench,
    ),
    "mmvet": Benchmark(
        read=lambda bench: datasets.read_mmvet(bench.data, bench.image_root, **_split(bench)),
        score=_judged(scores.MMVET),
        options=frozenset({"image_root", "split"}),
        needs_judge=_always,
    ),
    "llava_bench": Benchmark(
        read=lambda bench: datasets.read_llava_bench(bench.data, bench.image_root, **_split(bench)),
        score=_judged(scores.LLAVA_BENCH),
        options=frozenset({"image_root", "split"}),
        needs_judge=_always,
    ),
    "shapeworld_chair": Benchmark(
        read=lambda bench: shapeworld.read_shapeworld_captions(bench.data),
        score=_answers_only(shapeworld.score_shapeworld_chair),
    ),
    "shapeworld_pope": Benchmark(
        read=lambda bench: shapeworld.read_shapeworld_pope(
            bench.data,
            bench.pope_strategies,
            bench.pope_per_image,
            bench.seed,
            bench.pope_rank_scenes,
        ),
        score=_answers_only(scores.score_pope),
        options=frozenset({"pope_strategies", "pope_per_image", "seed", "pope_rank_scenes"}),
        prompt_suffix=POPE_SUFFIX,
        max_new_tokens=16,
        check=_check_shapeworld_pope,
    ),
}
# The fields some benchmark reads and others ignore; the rest every benchmark reads.
SPECIFIC_OPTIONS = frozenset().union(*(b.options for b in BENCHMARKS.values()))


def benchmark(bench: BenchmarkConfig) -> Benchmark:
    """The table's entry for `bench`; an unknown name fails naming the known ones."""
    try:
        return BENCHMARKS[bench.name]
    except KeyError:
        raise ValueError(
            f"unknown benchmark {bench.name!r}; use one of {', '.join(BENCHMARKS)}"
        ) from None


def _default(option: Field) -> Any:
    if option.default_factory is not MISSING:
        return option.default_factory()
    return option.default


def ignored_options(bench: BenchmarkConfig) -> list[str]:
    """The options set (away from their defaults) that this benchmark does not read."""
    spec = benchmark(bench)
    return [
        option.name
        for option in fields(BenchmarkConfig)
        if option.name in SPECIFIC_OPTIONS - spec.options
        and getattr(bench, option.name) != _default(option)
    ]


def needs_judge(bench: BenchmarkConfig) -> bool:
    return benchmark(bench).needs_judge(bench)


def prompt_suffix(bench: BenchmarkConfig) -> str | None:
    """What is appended to every question: the config's suffix, else the benchmark's."""
    return (
        bench.prompt_suffix if bench.prompt_suffix is not None else benchmark(bench).prompt_suffix
    )


def question_text(bench: BenchmarkConfig, item: EvalItem) -> str:
    suffix = prompt_suffix(bench)
    return f"{item.prompt}\n{suffix}" if suffix else item.prompt


def read_items(bench: BenchmarkConfig) -> list[EvalItem]:
    """The benchmark's questions, in the data's order (the first `limit` of them)."""
    items = benchmark(bench).read(bench)
    seen: set[str] = set()
    for item in items:
        if item.question_id in seen:
            raise ValueError(
                f"{bench.data}: question id {item.question_id!r} appears twice; answers are "
                "stored by question id, so ids must be unique"
            )
        seen.add(item.question_id)
    return items[: bench.limit] if bench.limit is not None else items
