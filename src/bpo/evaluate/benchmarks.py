"""The benchmarks `bpo eval` runs: one table from a benchmark's name to how it is read, asked, scored.

A `BenchmarkConfig` is one entry of a config's `benchmarks:` list; `BENCHMARKS[config.name]` is
the `Benchmark` that says what to do with it: its reader (`datasets`, `shapeworld`), its scorer
(`scores`, `shapeworld`), the prompt suffix and answer length it asks with by default, and whether
it needs the judge. `BenchmarkConfig` is defined here, beside the table, because the table's
readers and scorers take it; `config` builds the run's schema from it and checks a config against
the table.

A judged benchmark declares its judge's request settings (`JudgeSettings`: temperature,
max_tokens, parse retries), equal to its reference script's, and the judge model its published
numbers used; a config's benchmark can override each (`judge:`), and can name a file holding the
reference protocol's prompt (`judge_prompt`) to be asked with instead of bpo's own.

A benchmark also names the options it reads beyond the common ones (`data`, `label`, `limit`,
`answers`, `prompt_suffix`, `max_new_tokens`), so that an option set on a benchmark that ignores
it is refused rather than silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Literal

from bpo.endpoint import ChatClient, EndpointConfig
from bpo.evaluate import amber, datasets, judges, mmhal, pope, scores, shapeworld
from bpo.evaluate.amber_match import check_available, check_similarity_name
from bpo.evaluate.datasets import EvalItem
from bpo.evaluate.scores import Scored

BenchmarkName = Literal[
    "pope",
    "object_halbench",
    "mmvet",
    "llava_bench",
    "shapeworld_chair",
    "shapeworld_pope",
    "amber_generative",
    "amber_discriminative",
    "mmhal",
]
# LLaVA-1.5's evaluation appends this to POPE questions so that answers are one word.
POPE_SUFFIX = "Answer the question using a single word or phrase."


@dataclass
class JudgeSettings:
    """The judge's request settings for one benchmark; null: the benchmark's default (its
    reference script's), else the config's `judge:` section's."""

    model: str | None = None  # the benchmark's reference model is recorded, not defaulted to
    temperature: float | None = None
    max_tokens: int | None = None
    parse_retries: int | None = None  # extra asks, each 0.5 warmer, when a reply does not parse


JUDGE_SETTINGS = ("model", "temperature", "max_tokens", "parse_retries")


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
    # Judged benchmarks: the judge's settings for this benchmark (null fields: the defaults).
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    # Judged benchmarks: a file of the reference protocol's judge prompt, asked instead of bpo's:
    # llava_bench LLaVA's rule.json; mmvet MM-Vet's grading prompt; object_halbench (with
    # judge_objects) RLHF-V's extraction prompt with {question} and {answer}. See
    # docs/evaluation.md.
    judge_prompt: str | None = None
    # shapeworld_pope: how questions are built from the scenes.
    pope_strategies: list[str] = field(default_factory=lambda: list(pope.STRATEGIES))
    pope_per_image: int = 3
    seed: int = 0
    # shapeworld_pope: a scenes.jsonl whose object counts rank the popular and adversarial
    # negatives (a text corpus's scenes, as POPE ranks by COCO's); null: the benchmark's scenes.
    pope_rank_scenes: str | None = None
    # amber_generative: how descriptions are read (bpo.evaluate.amber_match): nltk is the
    # reference's noun extraction, vocabulary its offline approximation; the similarity is
    # spacy:MODEL (spacy:en_core_web_lg is the reference's), vectors:PATH or exact.
    amber_nouns: Literal["nltk", "vocabulary"] = "nltk"
    amber_similarity: str = "spacy:en_core_web_lg"
    amber_threshold: float = 0.8  # near-synonyms: similarity above it
    # amber_discriminative: the dimensions asked (existence, attribute, relation).
    amber_dimensions: list[str] = field(default_factory=lambda: list(amber.DIMENSIONS))

    @property
    def key(self) -> str:
        return self.label or self.name


# The options every judged benchmark reads.
JUDGE_OPTIONS = ("judge", "judge_prompt")
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
    # The judge's default request settings (its reference's); model None: the run's judge model.
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    reference_judge: str | None = None  # the judge model the published numbers used
    own_prompt: str | None = None  # bpo's judge prompt, whose SHA-256 results.json records


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


def _prompt_file(bench: BenchmarkConfig) -> judges.PromptFile | None:
    if bench.judge_prompt is None:
        return None
    return judges.read_prompt_file(bench.judge_prompt, f"benchmark {bench.key}: judge_prompt")


def _judged(judged: scores.JudgedBenchmark) -> Scorer:
    return lambda bench, items, answers, client: scores.score_judged(
        judged, items, answers, _judge(bench, client), _prompt_file(bench)
    )


def _score_object_halbench(
    bench: BenchmarkConfig,
    items: Sequence[EvalItem],
    answers: dict[str, str],
    client: ChatClient | None,
) -> Scored:
    judge = _judge(bench, client) if bench.judge_objects else None
    return scores.score_object_halbench(
        items, answers, bench.coco_instances, bench.coco_captions, judge, _prompt_file(bench)
    )


def _check_object_halbench(bench: BenchmarkConfig) -> None:
    judged = [o for o in ("judge_prompt", "judge") if getattr(bench, o) != _default_of(o)]
    if judged and not bench.judge_objects:
        raise ValueError(
            f"benchmark {bench.key}: {', '.join(judged)} set, but without judge_objects the "
            "objects are read from the words and no judge is asked; set judge_objects: true or "
            "remove them"
        )
    if not bench.coco_instances:
        raise ValueError(
            f"benchmark {bench.key} needs `coco_instances` (and `coco_captions`): the COCO 2014 "
            "annotation files its ground truth comes from"
        )


def _check_some_of(bench: BenchmarkConfig, option: str, allowed: Sequence[str]) -> None:
    """Raise ValueError unless the list option is non-empty and holds only `allowed` values."""
    chosen = getattr(bench, option)
    if not chosen or any(value not in allowed for value in chosen):
        raise ValueError(
            f"benchmark {bench.key}: {option} {chosen} must be some of {', '.join(allowed)}"
        )


def _check_shapeworld_pope(bench: BenchmarkConfig) -> None:
    _check_some_of(bench, "pope_strategies", pope.STRATEGIES)
    if bench.pope_per_image < 1:
        raise ValueError(
            f"benchmark {bench.key}: pope_per_image is {bench.pope_per_image}; ask at least 1 "
            "question per image"
        )


def _read_amber_generative(bench: BenchmarkConfig) -> list[EvalItem]:
    # The matcher is checked before any description is generated, not after.
    check_available(bench.amber_nouns, bench.amber_similarity)
    return amber.read_generative(bench.data, bench.image_root)


def _score_amber_generative(
    bench: BenchmarkConfig,
    items: Sequence[EvalItem],
    answers: dict[str, str],
    client: ChatClient | None,
) -> Scored:
    return amber.score_generative(
        items, answers, bench.amber_nouns, bench.amber_similarity, bench.amber_threshold, bench.data
    )


def _check_amber_generative(bench: BenchmarkConfig) -> None:
    check_similarity_name(bench.amber_similarity)
    if not 0.0 <= bench.amber_threshold <= 1.0:
        raise ValueError(
            f"benchmark {bench.key}: amber_threshold is {bench.amber_threshold}; use a "
            "similarity between 0 and 1 (the reference's is 0.8)"
        )


def _check_amber_discriminative(bench: BenchmarkConfig) -> None:
    _check_some_of(bench, "amber_dimensions", amber.DIMENSIONS)


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
        options=frozenset(
            {"image_root", "coco_instances", "coco_captions", "judge_objects", *JUDGE_OPTIONS}
        ),
        needs_judge=lambda bench: bench.judge_objects,
        check=_check_object_halbench,
        # RLHF-V's eval_gpt_obj_halbench.py: its chat helper's 0.2 and 512 tokens.
        judge=JudgeSettings(temperature=0.2, max_tokens=512, parse_retries=2),
        reference_judge="gpt-3.5-turbo-0613",
        own_prompt=judges.OBJECTS_INSTRUCTIONS,
    ),
    "mmvet": Benchmark(
        read=lambda bench: datasets.read_mmvet(bench.data, bench.image_root, **_split(bench)),
        score=_judged(scores.MMVET),
        options=frozenset({"image_root", "split", *JUDGE_OPTIONS}),
        needs_judge=_always,
        # mm-vet_evaluator.py: 3 tokens at temperature 0, five tries 0.5 warmer each.
        judge=JudgeSettings(temperature=0.0, max_tokens=3, parse_retries=4),
        reference_judge="gpt-4-0613",
        own_prompt=f"{judges.MMVET_SYSTEM}\n{judges.MMVET_INSTRUCTIONS}",
    ),
    "llava_bench": Benchmark(
        read=lambda bench: datasets.read_llava_bench(bench.data, bench.image_root, **_split(bench)),
        score=_judged(scores.LLAVA_BENCH),
        options=frozenset({"image_root", "split", *JUDGE_OPTIONS}),
        needs_judge=_always,
        # LLaVA's eval_gpt_review_bench.py: temperature 0.2, up to 1024 tokens, asked once.
        judge=JudgeSettings(temperature=0.2, max_tokens=1024, parse_retries=0),
        reference_judge="gpt-4-0314",
        own_prompt="\n".join(
            [
                judges.LLAVA_BENCH_SYSTEM,
                judges.LLAVA_BENCH_INSTRUCTIONS,
                *judges.LLAVA_BENCH_FOCUS.values(),
            ]
        ),
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
    "amber_generative": Benchmark(
        read=_read_amber_generative,
        score=_score_amber_generative,
        options=frozenset({"image_root", "amber_nouns", "amber_similarity", "amber_threshold"}),
        check=_check_amber_generative,
    ),
    "amber_discriminative": Benchmark(
        read=lambda bench: amber.read_discriminative(
            bench.data, bench.image_root, bench.amber_dimensions
        ),
        score=_answers_only(amber.score_discriminative),
        options=frozenset({"image_root", "amber_dimensions"}),
        # AMBER scores one-word answers; POPE's suffix asks for them.
        prompt_suffix=POPE_SUFFIX,
        max_new_tokens=16,
        check=_check_amber_discriminative,
    ),
    "mmhal": Benchmark(
        read=lambda bench: mmhal.read_mmhal(bench.data, bench.image_root),
        score=_judged(mmhal.MMHAL),
        options=frozenset({"image_root", *JUDGE_OPTIONS}),
        needs_judge=_always,
        # LLaVA-RLHF's eval_gpt4.py: temperature 0, asked once (an unparsable reply scores 0).
        judge=JudgeSettings(**mmhal.JUDGE_DEFAULTS),
        reference_judge="gpt-4-0314",
        own_prompt=mmhal.MMHAL_INSTRUCTIONS,
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


def _default_of(name: str) -> Any:
    return _default(next(f for f in fields(BenchmarkConfig) if f.name == name))


def needs_judge(bench: BenchmarkConfig) -> bool:
    return benchmark(bench).needs_judge(bench)


def judge_settings(bench: BenchmarkConfig, endpoint: EndpointConfig) -> dict[str, Any]:
    """The judge's settings for `bench`: each the benchmark config's, else the benchmark's
    default (its reference's), else the `judge:` section's."""
    spec = benchmark(bench)
    resolved = {}
    for name in JUDGE_SETTINGS:
        values = (getattr(bench.judge, name), getattr(spec.judge, name), getattr(endpoint, name))
        resolved[name] = next(v for v in values if v is not None)
    return resolved


def judge_protocol(bench: BenchmarkConfig, endpoint: EndpointConfig) -> dict[str, Any]:
    """What results.json records of how a judged benchmark was judged: whose prompts (bpo's or a
    file's), the prompt's SHA-256, the judge's settings and the reference's judge model."""
    spec = benchmark(bench)
    prompt = _prompt_file(bench)
    own = spec.own_prompt
    return {
        "prompts": "file" if prompt else "bpo",
        "prompt_file": prompt.path if prompt else None,
        "prompt_sha256": prompt.sha256 if prompt else (judges.sha256(own) if own else None),
        "judge": judge_settings(bench, endpoint),
        "reference_judge": spec.reference_judge,
    }


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
